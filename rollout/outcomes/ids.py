"""Request ids as the outcome store keeps them.

The service names every request with a ULID (`serving.predict.new_request_ids`): 128 bits written as 26
characters of Crockford's base32. SQLite keeps such an id as its 16 bytes, in the row and in every index entry:
about 21 B a logged row less (the row and its request-id index entry; benchmarks/retention.py). Any other id (a
caller's own, a batch run's) is kept as the text it is.

Only the canonical spelling is packed (capitals, first character 0-7), so unpacking gives back exactly the
string that came in, and a text id and a packed one can never be equal (SQLite compares a BLOB and a TEXT as
different). PostgreSQL keeps every id as text: its column has one type.
"""

from __future__ import annotations

from typing import Any

# RFC 4648's base32 alphabet (A-Z, 2-7) to Crockford's (0-9, A-Z without I, L, O, U), digit by digit value
ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
TO_CROCKFORD = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", ALPHABET.encode())
# Crockford's digits to int(_, 32)'s (0-9, A-V), any other byte to "!", which int() refuses: one C call
# checks and converts (lower case, I, L, O, U, signs, spaces and underscores all refused).
_TO_BASE32 = bytes(ord("0123456789ABCDEFGHIJKLMNOPQRSTUV"[ALPHABET.index(chr(c))]) if chr(c) in ALPHABET
                   else ord("!") for c in range(256))
PAIRS = [a + b for a in ALPHABET for b in ALPHABET]  # two digits by their 10 bits


def pack(request_id: Any) -> Any:
    """The stored form of a request id on SQLite: a canonical ULID's 16 bytes, anything else unchanged."""
    if type(request_id) is str and len(request_id) == 26 and request_id[0] <= "7":
        try:
            return int(request_id.encode().translate(_TO_BASE32), 32).to_bytes(16, "big")
        except ValueError:
            pass  # not Crockford's capitals: kept as text
    return request_id


def unpack(stored: Any) -> Any:
    """The request id of a stored one: 16 bytes back to their ULID text, anything else unchanged."""
    if type(stored) is not bytes:
        return stored
    return ulid_text(int.from_bytes(stored, "big"))


def ulid_text(v: int) -> str:
    """A 128-bit value as ULID text: 130 bits in 13 pairs of digits, the top 2 bits zero."""
    return (PAIRS[v >> 120] + PAIRS[v >> 110 & 1023] + PAIRS[v >> 100 & 1023] + PAIRS[v >> 90 & 1023]
            + PAIRS[v >> 80 & 1023] + PAIRS[v >> 70 & 1023] + PAIRS[v >> 60 & 1023] + PAIRS[v >> 50 & 1023]
            + PAIRS[v >> 40 & 1023] + PAIRS[v >> 30 & 1023] + PAIRS[v >> 20 & 1023] + PAIRS[v >> 10 & 1023]
            + PAIRS[v & 1023])
