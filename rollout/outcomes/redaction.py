"""What the prediction log keeps of a request: which features (`serving.log_features`) and never a PII column
in clear (`data.pii_columns`: dropped, or a keyed hash that stays joinable, as the unit id must).

The service applies it before a row is queued, so nothing unkept ever reaches the store, a shadow child or
the dead-letter table. The sample of `log_features: 0.1` is chosen by request id (the same requests on
every replica).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rollout.config import Policy

HASH_CHARS = 32  # hex digits of a hashed value (128 bits): fits the unit id column


class ConfigurationError(RuntimeError):
    """The environment lacks what the policy needs (the PII key)."""


class Redaction:
    """Decides what of a record and its unit id the log keeps."""

    def __init__(self, log_features: Any = "all", pii_columns: tuple[str, ...] = (), pii_action: str = "drop",
                 key: bytes | None = None, unit_column: str | None = None) -> None:
        if pii_action == "hash" and pii_columns and not key:
            raise ConfigurationError("data.pii_action is hash but no key was given")
        self.pii = frozenset(pii_columns)
        self.hash = pii_action == "hash"
        self.key = key or b""
        self.unit_is_pii = unit_column is not None and unit_column in self.pii
        self.all = log_features == "all"
        self.none = log_features == "none"
        self.fraction = float(log_features) if isinstance(log_features, int | float) else None
        self.columns = frozenset(log_features) if isinstance(log_features, list) else None
        self.identity = self.all and not self.pii  # the common case: the record as it came

    @classmethod
    def for_policy(cls, policy: Policy, environ: Mapping[str, str] | None = None,
                   require_key: bool = True) -> Redaction:
        """The policy's redaction; without `require_key` (to describe it, not to hash) the key may be absent."""
        data = policy.data
        env = os.environ if environ is None else environ
        key = env.get(data.pii_key_env, "").encode() or (None if require_key else b"-")
        if data.pii_columns and data.pii_action == "hash" and key is None:
            raise ConfigurationError(f"data.pii_action is hash: set the key in the environment variable "
                                     f"{data.pii_key_env} (the same on every replica, kept secret)")
        return cls(policy.serving.log_features, tuple(data.pii_columns), data.pii_action, key, data.unit_column)

    def hashed(self, value: Any) -> str:
        return hmac.new(self.key, str(value).encode(), hashlib.sha256).hexdigest()[:HASH_CHARS]

    def sampled(self, request_id: str) -> bool:
        """Whether a request is in the `log_features` fraction (by a hash of its id: the same on every replica)."""
        assert self.fraction is not None
        digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") < self.fraction * 2**64

    def features(self, record: Mapping[str, Any], request_id: str) -> Mapping[str, Any] | None:
        """The features the log keeps of a served record, or None."""
        if self.identity:
            return record
        if self.none or (self.fraction is not None and not self.sampled(request_id)):
            return None
        kept = record if self.columns is None else {k: v for k, v in record.items() if k in self.columns}
        if not self.pii:
            return kept
        if not self.hash:
            return {k: v for k, v in kept.items() if k not in self.pii}
        return {k: (self.hashed(v) if k in self.pii and v is not None else v) for k, v in kept.items()}

    def unit(self, unit_id: str | None) -> str | None:
        """The unit id as the log keeps it: hashed when the unit column is a PII column."""
        return self.hashed(unit_id) if self.unit_is_pii and unit_id is not None else unit_id

    def describe(self) -> str:
        """What the logged features are, for a drift or training report ('' when every feature of every request)."""
        parts = []
        if self.none:
            return "features are not logged (serving.log_features: none)"
        if self.fraction is not None:
            parts.append(f"features of {self.fraction:.0%} of requests (serving.log_features: {self.fraction:g})")
        if self.columns is not None:
            parts.append(f"only the columns {sorted(self.columns)}")
        if self.pii:
            parts.append(f"PII columns {'hashed' if self.hash else 'left out'}: {sorted(self.pii)}")
        return "; ".join(parts)
