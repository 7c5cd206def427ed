"""The data contract of the three tables, written out from the ORM columns (table_*.py).

The README's "Your own tables" section and `main_script.py import-csv --help` print what this module
derives from the columns' types, nullability, `info={"values": ...}` and `doc=`, so the statement a user
reads cannot drift from what validation (get_features_table) enforces; tests/test_own_data.py holds the
README's copy equal to `contract_markdown()`. Light on purpose (no pandas): --help imports it.
"""

from __future__ import annotations

from sqlalchemy import Column, DateTime, Integer

import table_feed  # noqa: F401  (registers the three tables on Base.metadata)
from database import Base

TABLES = ("user_data", "post_text_df", "feed_data")  # load order: users and posts before the feed
# The timestamp forms a CSV may use (strptime); the first is the one the tables store and print.
TIMESTAMP_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%dT%H:%M:%S.%f")
TIMESTAMP_FORMS = "`2021-12-01 12:00:00`, `2021-12-01T12:00:00`, either with fractional seconds (`.5`)"
HEADER_RULE = "| --- | --- | --- | --- | --- |"
CSV_FORM = "CSV with a header row naming the columns (any order), UTF-8 (a byte-order mark is fine)"


def _type(column: Column) -> str:
    if isinstance(column.type, Integer):
        return "integer"
    if isinstance(column.type, DateTime):
        return "timestamp"
    return "text"


def columns(table: str) -> list[dict[str, str]]:
    """One dict per column of `table`: name, type, null (whether empty is allowed), values, meaning."""
    rows = []
    for column in Base.metadata.tables[table].columns:
        values = column.info.get("values")
        rows.append(
            {
                "name": column.name,
                "type": _type(column),
                "null": "allowed" if column.nullable else "no",
                "values": ", ".join(repr(v) for v in values) if values else "any",
                "meaning": column.doc or "",
            }
        )
    return rows


def contract_markdown() -> str:
    """The contract as Markdown tables, one per table (the README's copy)."""
    out = []
    for table in TABLES:
        out += [f"`{table}`:", "", "| column | type | empty | allowed values | meaning |", HEADER_RULE]
        for c in columns(table):
            out.append(f"| `{c['name']}` | {c['type']} | {c['null']} | {c['values']} | {c['meaning']} |")
        out.append("")
    out.append(f"Timestamps: {TIMESTAMP_FORMS}; range 1678-01-01 00:00:00 to 2261-12-31 23:59:59.")
    return "\n".join(out)


def contract_text() -> str:
    """The contract as plain text for --help (shown with argparse's RawDescriptionHelpFormatter)."""
    out = [f"Files: {CSV_FORM}."]
    for table in TABLES:
        out.append(f"{table}:")
        for c in columns(table):
            allowed = f", one of {c['values']}" if c["values"] != "any" else ""
            empty = ", may be empty" if c["null"] == "allowed" else ""
            out.append(f"  {c['name']} ({c['type']}{allowed}{empty}): {c['meaning']}")
    out.append(f"Timestamps: {TIMESTAMP_FORMS.replace('`', '')}.")
    return "\n".join(out)
