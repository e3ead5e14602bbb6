"""Tables of your own database that rollout writes: batch answers (`rollout score --output-table`) and label
requests (the label-requests flow's `output_table`). One place checks their names and database URLs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from rollout.config import ConfigError

TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,53}")  # 54 characters, so "<name>__partial" fits PostgreSQL's 63


@dataclass(frozen=True)
class SqlTable:
    """A table of a database, by the database's SQLAlchemy URL and the table's name."""

    url: str
    name: str

    def __str__(self) -> str:
        return f"table {self.name} on {safe_url(self.url)}"


def safe_url(url: str) -> str:
    """A database URL as it may be shown: its password masked."""
    return make_url(url).render_as_string(hide_password=True)


def database_url(url: str, field: str = "--database") -> str:
    """`url` when SQLAlchemy can parse it; else a ConfigError naming `field`."""
    try:
        make_url(url)
    except ArgumentError:
        raise ConfigError(f"{field} {url!r}: not a database URL (postgresql://user@host/db, sqlite:///file.db)") \
            from None
    return url


def table_of(name: str, database: str | None, field: str = "--output-table",
             database_field: str = "--database") -> SqlTable:
    """The table `name` of `database`, both checked; errors name the settings they came from."""
    if not TABLE_NAME.fullmatch(name):
        raise ConfigError(f"{field} {name!r}: a table name of letters, digits and underscores (at most 54)")
    if not database:
        raise ConfigError(f"{database_field}: {field} needs the database URL it is written to")
    return SqlTable(database_url(database, database_field), name)


def destination(output: str | Path | None, table: str | None, database: str | None, what: str,
                prefix: str = "--", suffixes: tuple[str, ...] = ()) -> Path | SqlTable:
    """Exactly one of a file and a table of a database, checked; `what` the rows that go there, `prefix` how
    the settings are named ("--" on the command line, "params." in a Run form), `suffixes` a file's allowed."""
    out, tab, db = (f"{prefix}{n}" for n in ("output", "output_table" if prefix != "--" else "output-table",
                                             "database"))
    if (output is None) == (table is None):
        raise ConfigError(f"{out} or {tab}: name one place for the {what} (a file or a table)")
    if table is not None:
        return table_of(table, database, tab, db)
    path = Path(str(output))
    if suffixes and path.suffix.lower() not in suffixes:
        raise ConfigError(f"{out} {path.name!r}: write a {' or '.join(suffixes[:2])} file")
    return path
