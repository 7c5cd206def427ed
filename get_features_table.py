"""Moving the three tables between SQL, pandas and CSV.

- Reads stream in chunks. On PostgreSQL the rows come through `COPY (SELECT ...) TO STDOUT` into a pipe
  that pandas parses while the server is still sending (bounded memory, both cores busy); on SQLite
  through `pd.read_sql` in chunks. Database errors surface as SQLAlchemy exceptions
  (DBAPIError and subclasses) on both paths.
- Writes happen in ONE transaction: (drop and) create the tables, bulk-load them (`COPY FROM STDIN` fed
  chunk by chunk on PostgreSQL, `executemany` of plain tuples on SQLite), build the feed indexes after
  the rows are in, commit. Any failure rolls everything back, DDL included (see database.make_engine).
- Every frame is validated before the database is touched: columns, types, NULLs, value domains,
  duplicate ids, and feed rows naming unknown users or posts. Problems are reported with the file (or
  frame), the row and the column.

Rules that are decisions rather than facts of the data:
- Text columns (country, city, os, source, text, topic) must be non-empty: NULL, "" and blank text are
  errors, because a post without text cannot be embedded and the categoricals have no "missing" level.
  Topics are free text: any non-empty topic is accepted.
- `target` is 0 or 1 on views; on likes it is 0 or NULL (the data contract), so NULL on a view or 1 on a like
  is an error.
- Row numbers count as a spreadsheet shows a CSV file: header = row 1, first data row = 2, and a quoted
  multi-line text is one row. For frames handed to `write_tables` the row is the 0-based position.
- The feed may come in any order; it is stored sorted by time (stable, so equal times keep their order).
  Reads return rows in storage order, which is not guaranteed: sort if order matters.
- Duplicate feed rows are allowed (the real table has no key).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sqlalchemy import (
    Column,
    Connection,
    DateTime,
    Engine,
    Integer,
    Table,
    func,
    insert,
    inspect,
    select,
    type_coerce,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.schema import CreateTable
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import String
from tqdm import tqdm

import database
import table_feed  # noqa: F401  (registers the three tables on Base.metadata)
from data_contract import TABLES, TIMESTAMP_FORMATS
from database import INT32_MAX, INT32_MIN
from times import TIME_HINT, TIME_RANGE


def _dtype(column: Column) -> str:
    """The pandas dtype of an ORM column: what reads return and validation converts to."""
    if isinstance(column.type, Integer):
        return "Int64" if column.nullable else "int64"
    if isinstance(column.type, DateTime):
        return "datetime64[ns]"
    return "str"


# Everything below is derived from the ORM tables (table_user.py, table_post.py, table_feed.py): each
# column's dtype, the primary keys, which columns may be NULL, the allowed values (info["values"]) and
# the low-cardinality text read as categories (info["category"]).
_ORM = {name: database.Base.metadata.tables[name] for name in TABLES}
COLUMNS: dict[str, dict[str, str]] = {
    name: {c.name: _dtype(c) for c in t.columns} for name, t in _ORM.items()
}
PRIMARY_KEYS = {name: t.primary_key.columns[0].name for name, t in _ORM.items() if t.primary_key.columns}
DOMAINS: dict[tuple[str, str], tuple[object, ...]] = {
    (name, c.name): c.info["values"] for name, t in _ORM.items() for c in t.columns if "values" in c.info
}
NULLABLE = {(name, c.name) for name, t in _ORM.items() for c in t.columns if c.nullable}
CATEGORICAL = {(name, c.name) for name, t in _ORM.items() for c in t.columns if c.info.get("category")}
MAX_PROBLEMS = 10
READ_CHUNK_ROWS = 500_000
WRITE_CHUNK_ROWS = 250_000
COPY_BUFFER_BYTES = 1 << 20
# Keyword arguments for every CSV read: only an empty field is NULL, so a post whose text is "NA" or
# "null" stays text; utf-8-sig swallows the byte-order mark spreadsheet programs write.
CSV_READ_OPTIONS: dict[str, object] = {"keep_default_na": False, "na_values": [""], "encoding": "utf-8-sig"}


@dataclass(frozen=True)
class Problem:
    source: str  # file name or "<table> frame"
    row: int | None  # as in the CSV file (header = 1); None when the problem is the whole file
    column: str | None
    message: str

    def __str__(self) -> str:
        where = [self.source]
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.column is not None:
            where.append(f"column {self.column!r}")
        return f"{', '.join(where)}: {self.message}"


class TableValidationError(ValueError):
    """One or more problems in a table; `file`, `row`, `column`, `message` describe the first one."""

    def __init__(self, problems: list[Problem], *, total: int = 0) -> None:
        if not problems:
            raise ValueError("TableValidationError needs at least one problem")
        self.problems = problems[:MAX_PROBLEMS]
        self.total = max(total, len(problems))
        first = self.problems[0]
        self.file, self.row, self.column, self.message = first.source, first.row, first.column, first.message
        lines = [str(problem) for problem in self.problems]
        if self.total > len(self.problems):
            lines.append(f"... and {self.total - len(self.problems):,} more problems")
        super().__init__("\n".join(lines))

    @classmethod
    def merge(cls, errors: list[TableValidationError]) -> TableValidationError:
        """One error for several files, so the user fixes them all in one pass."""
        return cls([p for e in errors for p in e.problems], total=sum(e.total for e in errors))


@dataclass
class _Report:
    """Problems found so far in one frame; checks add masks, never loop over rows."""

    source: str
    first_row: int
    order: list[str]
    problems: list[Problem] = field(default_factory=list)
    total: int = 0

    def flag(self, mask: np.ndarray, column: str | None, describe: Callable[[int], str]) -> None:
        positions = np.flatnonzero(mask)
        self.total += len(positions)
        for position in positions[:MAX_PROBLEMS]:  # messages for the first few only
            row = int(position) + self.first_row
            self.problems.append(Problem(self.source, row, column, describe(int(position))))

    def raise_if_any(self) -> None:
        if not self.problems:
            return
        rank = {name: i for i, name in enumerate(self.order)}
        self.problems.sort(key=lambda p: (p.row if p.row is not None else -1, rank.get(p.column or "", -1)))
        raise TableValidationError(self.problems, total=self.total)


@dataclass
class _CsvStream:
    """A read()-able file over CSV text made one chunk at a time, for psycopg2's copy_expert."""

    chunks: Iterator[str]
    buffer: str = ""
    offset: int = 0

    def read(self, size: int = -1) -> str:
        while self.offset >= len(self.buffer):
            chunk = next(self.chunks, None)
            if chunk is None:
                return ""
            self.buffer, self.offset = chunk, 0
        end = len(self.buffer) if size < 0 else self.offset + size
        piece = self.buffer[self.offset : end]
        self.offset += len(piece)
        return piece


# --- validation ---------------------------------------------------------------------------------


def _columns(table: str) -> dict[str, str]:
    if table not in COLUMNS:
        raise ValueError(f"unknown table {table!r}; expected one of {', '.join(TABLES)}")
    return COLUMNS[table]


def _show(value: object) -> str:
    if isinstance(value, np.generic):
        value = value.item()
    text = repr(value)
    return text if len(text) <= 40 else text[:36] + "...'"


def _clean_integers(raw: pd.Series, column: str, report: _Report) -> tuple[pd.Series, np.ndarray]:
    """The column as Int64 plus the mask of usable cells; bad cells are flagged."""
    present = raw.notna().to_numpy(dtype=bool)
    numeric = pd.api.types.is_numeric_dtype(raw.dtype) and not pd.api.types.is_bool_dtype(raw.dtype)
    numbers = raw if numeric else pd.to_numeric(raw, errors="coerce")
    values = numbers.to_numpy(dtype="float64", na_value=np.nan)
    parsed = ~np.isnan(values)
    with np.errstate(invalid="ignore"):
        integral = parsed & (values == np.floor(values))
        in_range = integral & (values >= INT32_MIN) & (values <= INT32_MAX)
    report.flag(present & ~integral, column, lambda i: f"{_show(raw.iloc[i])} is not an integer")
    report.flag(
        integral & ~in_range, column, lambda i: f"{_show(raw.iloc[i])} is outside the 32-bit integer range"
    )
    whole = np.where(in_range, values, 0).astype("int64")
    return pd.Series(pd.arrays.IntegerArray(whole, ~in_range)), in_range


def _clean_strings(raw: pd.Series) -> tuple[pd.Series, np.ndarray]:
    text = raw.astype("str")  # non-string objects become their str(); NULL stays NULL
    return text, text.notna().to_numpy(dtype=bool)


def _clean_timestamps(raw: pd.Series, column: str, report: _Report) -> tuple[pd.Series, np.ndarray]:
    if isinstance(raw.dtype, pd.DatetimeTZDtype):
        raise TableValidationError(
            [Problem(report.source, None, column, "timestamps carry a time zone; store naive local times")]
        )
    if pd.api.types.is_datetime64_dtype(raw.dtype):
        parsed = raw
    else:
        text = raw.astype("str")
        parsed = pd.Series(pd.NaT, index=raw.index, dtype="datetime64[us]")
        todo = text.notna()
        for pattern in TIMESTAMP_FORMATS:  # the strict fast format first; the rest only for leftovers
            if not todo.any():
                break
            parsed[todo] = pd.to_datetime(text[todo], format=pattern, errors="coerce")
            todo &= parsed.isna()
    present = raw.notna().to_numpy(dtype=bool)
    found = parsed.notna().to_numpy(dtype=bool)
    first, last = (pd.Timestamp(t) for t in TIME_RANGE)
    in_range = found & (parsed >= first).to_numpy() & (parsed < last + pd.Timedelta(seconds=1)).to_numpy()
    report.flag(present & ~found, column, lambda i: f"{_show(raw.iloc[i])} is not a timestamp ({TIME_HINT})")
    outside = f"is outside {TIME_RANGE[0]}..{TIME_RANGE[1]}"
    report.flag(found & ~in_range, column, lambda i: f"{_show(raw.iloc[i])} {outside}")
    return parsed.where(in_range).astype("datetime64[ns]"), in_range


def validate_frame(df: pd.DataFrame, table: str, *, source: str, first_row: int = 2) -> pd.DataFrame:
    """`df` checked and converted to the canonical columns and dtypes of `table` (see COLUMNS).

    Raises TableValidationError naming `source`, the row (position + `first_row`) and the column of at
    most MAX_PROBLEMS problems plus a count of the rest. Accepts text cells (a CSV read as strings) as
    well as typed columns; integral floats such as 3.0 count as integers.
    """
    spec = _columns(table)
    order = list(spec)
    header_row = first_row - 1 if first_row >= 2 else None
    report = _Report(source=source, first_row=first_row, order=order)
    names = [str(c) for c in df.columns]
    expected = f"expected columns: {', '.join(order)}"
    twice = sorted({n for n in names if names.count(n) > 1})
    header = [Problem(source, header_row, c, f"column appears more than once ({expected})") for c in twice]
    header += [
        Problem(source, header_row, c, f"missing column ({expected})") for c in order if c not in names
    ]
    header += [
        Problem(source, header_row, c, f"unexpected column ({expected})") for c in names if c not in spec
    ]
    if header:
        raise TableValidationError(header)

    frame = df.reset_index(drop=True)
    frame.columns = names
    clean: dict[str, pd.Series] = {}
    usable: dict[str, np.ndarray] = {}
    for column, dtype in spec.items():
        raw = frame[column]
        if dtype in ("int64", "Int64"):
            clean[column], usable[column] = _clean_integers(raw, column, report)
        elif dtype == "str":
            clean[column], usable[column] = _clean_strings(raw)
        else:
            clean[column], usable[column] = _clean_timestamps(raw, column, report)
        present = raw.notna().to_numpy(dtype=bool)
        domain = DOMAINS.get((table, column))
        if domain is not None:
            shown = ", ".join(_show(v) for v in domain)
            inside = usable[column] & clean[column].isin(domain).to_numpy(dtype=bool)
            report.flag(
                usable[column] & ~inside,
                column,
                lambda i, c=column, s=shown: f"{_show(frame[c].iloc[i])} is not one of {s}",
            )
            usable[column] = inside
        elif dtype == "str":
            blank = usable[column] & clean[column].str.strip().eq("").to_numpy(dtype=bool)
            report.flag(
                blank, column, lambda i, c=column: f"{_show(frame[c].iloc[i])} is blank; {c} needs a value"
            )
            usable[column] = usable[column] & ~blank
        if (table, column) not in NULLABLE:
            report.flag(~present, column, lambda i, c=column: f"empty, but {c} cannot be NULL")

    key = PRIMARY_KEYS.get(table)
    if key is not None:
        ids = clean[key]
        repeated = usable[key] & ids.duplicated(keep="first").to_numpy(dtype=bool)
        if repeated.any():
            positions = pd.Series(np.arange(len(ids)))
            first_seen = positions.groupby(ids, dropna=False).transform("first").to_numpy()
            report.flag(
                repeated,
                key,
                lambda i: f"duplicate {key} {ids.iloc[i]} (first in row {first_seen[i] + first_row})",
            )

    if table == "feed_data":
        like = clean["action"].eq("like").to_numpy(dtype=bool) & usable["action"]
        view = clean["action"].eq("view").to_numpy(dtype=bool) & usable["action"]
        target_null = frame["target"].isna().to_numpy(dtype=bool)
        target_one = clean["target"].eq(1).fillna(False).to_numpy(dtype=bool)
        report.flag(view & target_null, "target", lambda i: "empty (NULL) on a 'view' row; views need 0 or 1")
        report.flag(like & target_one, "target", lambda i: "1 on a 'like' row; likes carry 0 or NULL")

    report.raise_if_any()
    out = pd.DataFrame({column: clean[column] for column in order})
    return out.astype({c: d for c, d in spec.items() if d == "int64"})


def validate_references(
    users: pd.DataFrame,
    posts: pd.DataFrame,
    feed: pd.DataFrame,
    *,
    source: str = "feed",
    first_row: int = 2,
) -> None:
    """Raise TableValidationError for feed rows naming a user or post that is not in the tables."""
    report = _Report(source=source, first_row=first_row, order=list(COLUMNS["feed_data"]))
    for column, known, table in (("user_id", users, "user_data"), ("post_id", posts, "post_text_df")):
        ids = feed[column].reset_index(drop=True)
        unknown = ~ids.isin(known[column]).to_numpy(dtype=bool)
        report.flag(unknown, column, lambda i, c=column, t=table, v=ids: f"{c} {v.iloc[i]} is not in {t}")
    report.raise_if_any()


def _as_sqlalchemy_error(exc: BaseException, dialect: Dialect, statement: str) -> BaseException:
    """A driver error from a raw-cursor fast path as the SQLAlchemy exception callers already catch."""
    driver_error = dialect.loaded_dbapi.Error
    if isinstance(exc, driver_error):
        return DBAPIError.instance(statement, None, exc, driver_error)
    return exc


# --- reading --------------------------------------------------------------------------------------


def _table(name: str) -> Table:
    _columns(name)
    return database.Base.metadata.tables[name]


def _select(table: str, columns: list[str] | None, where: ColumnElement[bool] | None):
    spec = _columns(table)
    names = list(spec) if columns is None else list(columns)
    unknown = [c for c in names if c not in spec]
    if unknown or not names:
        raise ValueError(f"{table} has no columns {unknown}; choose from {', '.join(spec)}")
    sql_table = _table(table)
    # Timestamps come as text and are parsed in one vectorised call, not row by row by the driver.
    picked = [
        type_coerce(sql_table.c[c], String).label(c) if spec[c].startswith("datetime") else sql_table.c[c]
        for c in names
    ]
    stmt = select(*picked)
    return (stmt if where is None else stmt.where(where)), names


def _read_dtypes(table: str, names: list[str]) -> dict[str, str]:
    """dtypes for pd.read_csv: timestamps stay text (parsed after), low-cardinality text as category."""
    spec = _columns(table)
    return {
        c: "category" if (table, c) in CATEGORICAL else ("str" if spec[c].startswith("datetime") else spec[c])
        for c in names
    }


def _with_dtypes(chunk: pd.DataFrame, table: str) -> pd.DataFrame:
    spec = _columns(table)
    converted = {}
    for column in chunk.columns:
        dtype = spec[column]
        if dtype.startswith("datetime"):
            parsed = pd.to_datetime(chunk[column], format="ISO8601")
            if getattr(parsed.dt, "tz", None) is not None:  # a timestamptz column (PostgreSQL): naive UTC
                parsed = parsed.dt.tz_convert("UTC").dt.tz_localize(None)
            converted[column] = parsed.astype(dtype)
        else:
            converted[column] = chunk[column].astype(dtype)
    return pd.DataFrame(converted).reset_index(drop=True)


def _empty_frame(table: str, names: list[str]) -> pd.DataFrame:
    spec = _columns(table)
    return pd.DataFrame({c: pd.Series(dtype=spec[c]) for c in names})


def _postgres_chunks(
    engine: Engine, stmt, table: str, names: list[str], chunksize: int, connection: Connection | None = None
) -> Iterator[pd.DataFrame]:
    """COPY (stmt) TO STDOUT into a pipe from a thread, parsed by pandas from the other end.

    The server formats and pandas parses at the same time, and the pipe bounds the memory. With
    `connection`, the COPY runs in that connection's transaction (and leaves the connection open).
    """
    try:
        raw = engine.raw_connection() if connection is None else connection.connection
    except engine.dialect.loaded_dbapi.Error as exc:  # raw_connection does not wrap a failed connect
        raise _as_sqlalchemy_error(exc, engine.dialect, "connect") from exc
    read_fd, write_fd = os.pipe()
    reader = os.fdopen(read_fd, "rb", buffering=COPY_BUFFER_BYTES)
    # A text file makes psycopg2 decode with the connection's encoding; the pipe then carries UTF-8.
    writer = io.TextIOWrapper(
        os.fdopen(write_fd, "wb", buffering=COPY_BUFFER_BYTES), encoding="utf-8", newline=""
    )
    failures: list[BaseException] = []
    complete = False

    def produce(cursor, copy_sql: bytes) -> None:
        try:
            cursor.copy_expert(copy_sql, writer, size=COPY_BUFFER_BYTES)
        except BaseException as exc:  # handed to the reading side, which raises it
            failures.append(exc)
        finally:
            with contextlib.suppress(OSError):  # the reader stopped early and closed its end
                writer.close()

    thread = None
    try:
        cursor = raw.cursor()
        compiled = stmt.compile(dialect=engine.dialect, compile_kwargs={"render_postcompile": True})
        query = cursor.mogrify(str(compiled), compiled.params)  # the driver quotes the bound values
        # COPY prints timestamps in the session's DateStyle; pin ISO so the parser never sees 01/10/2021.
        cursor.execute("SET LOCAL DateStyle = 'ISO, YMD'")
        copy_sql = b"COPY (" + query + b") TO STDOUT WITH (FORMAT csv, HEADER)"
        thread = threading.Thread(target=produce, args=(cursor, copy_sql), name=f"copy-{table}", daemon=True)
        thread.start()
        try:
            parts = pd.read_csv(
                reader, chunksize=chunksize, dtype=_read_dtypes(table, names), **CSV_READ_OPTIONS
            )
            for part in parts:
                yield _with_dtypes(part, table)
        except Exception:
            reader.close()
            thread.join()
            if failures:  # the database's error says more than the parser's
                raise _as_sqlalchemy_error(failures[0], engine.dialect, copy_sql.decode()) from failures[0]
            raise
        complete = True
    finally:
        reader.close()  # unblocks the producer when the caller stopped iterating early
        if thread is None:
            writer.close()
        else:
            thread.join()
        if connection is not None:
            pass  # the caller's connection: its transaction goes on (or is rolled back by the caller)
        elif complete and not failures:
            raw.close()
        else:
            raw.invalidate()  # a COPY cut short leaves the connection unusable
    if failures:
        raise _as_sqlalchemy_error(failures[0], engine.dialect, copy_sql.decode()) from failures[0]


def _sqlite_chunks(
    engine: Engine, stmt, table: str, chunksize: int, connection: Connection | None = None
) -> Iterator[pd.DataFrame]:
    with contextlib.nullcontext(connection) if connection is not None else engine.connect() as conn:
        try:
            for part in pd.read_sql(stmt, conn, chunksize=chunksize):
                yield _with_dtypes(part, table)
        except pd.errors.DatabaseError as exc:
            # pandas wraps SQLAlchemy's error; unwrap it so callers catch the same type on both backends
            if isinstance(exc.__cause__, DBAPIError):
                raise exc.__cause__ from None
            raise


def iter_table_chunks(
    engine: Engine,
    table: str,
    *,
    columns: list[str] | None = None,
    where: ColumnElement[bool] | None = None,
    chunksize: int = READ_CHUNK_ROWS,
    connection: Connection | None = None,
) -> Iterator[pd.DataFrame]:
    """`table` (optionally some `columns`, rows matching `where`) as frames of at most `chunksize` rows;
    within `connection`'s transaction when given (a read consistent with other reads made there)."""
    if chunksize < 1:
        raise ValueError(f"chunksize must be at least 1, got {chunksize}")
    stmt, names = _select(table, columns, where)
    if database.is_postgres(engine):
        yield from _postgres_chunks(engine, stmt, table, names, chunksize, connection)
    else:
        yield from _sqlite_chunks(engine, stmt, table, chunksize, connection)


def read_table(
    engine: Engine,
    table: str,
    *,
    columns: list[str] | None = None,
    where: ColumnElement[bool] | None = None,
    chunksize: int = READ_CHUNK_ROWS,
    progress: bool = False,
    connection: Connection | None = None,
) -> pd.DataFrame:
    """The whole of `table` (or `columns`, rows matching `where`) with the dtypes of COLUMNS."""
    parts = []
    chunks = iter_table_chunks(
        engine, table, columns=columns, where=where, chunksize=chunksize, connection=connection
    )
    with tqdm(desc=f"read {table}", unit=" rows", disable=not progress) as bar:
        for part in chunks:
            parts.append(part)
            bar.update(len(part))
    names = list(_columns(table)) if columns is None else list(columns)
    if not parts:
        return _empty_frame(table, names)
    return pd.concat(parts, ignore_index=True)


# --- writing --------------------------------------------------------------------------------------


def _csv_chunks(frame: pd.DataFrame, *, quote_all: bool, bar: tqdm) -> Iterator[str]:
    # Text columns are quoted so that a post reading "\." is data, not COPY's end-of-data marker; the
    # feed cannot be quoted wholesale because an unquoted empty field is how CSV COPY spells NULL.
    quoting = csv.QUOTE_ALL if quote_all else csv.QUOTE_MINIMAL
    for start in range(0, len(frame), WRITE_CHUNK_ROWS):
        part = frame.iloc[start : start + WRITE_CHUNK_ROWS]
        text = part.to_csv(index=False, header=False, quoting=quoting, lineterminator="\n")
        bar.update(len(part))
        yield text


def _copy_in(conn: Connection, table: Table, frame: pd.DataFrame, bar: tqdm) -> None:
    quote = conn.dialect.identifier_preparer.quote
    columns = ", ".join(quote(c) for c in frame.columns)
    sql = f"COPY {quote(table.name)} ({columns}) FROM STDIN WITH (FORMAT csv)"
    stream = _CsvStream(_csv_chunks(frame, quote_all=table.name != "feed_data", bar=bar))
    with conn.connection.cursor() as cursor:
        cursor.copy_expert(sql, stream, size=COPY_BUFFER_BYTES)


def _sqlite_values(series: pd.Series, dtype: str) -> list[object]:
    if dtype.startswith("datetime"):
        # SQLAlchemy's SQLite DateTime stores 'YYYY-mm-dd HH:MM:SS.ffffff' and compares as text, so the
        # rows must use exactly that form for `timestamp < :t` to work.
        text = np.datetime_as_string(series.to_numpy().astype("datetime64[us]"), unit="us")
        text.view(np.uint32).reshape(len(text), -1)[:, 10] = ord(" ")  # the 'T' of ISO 8601
        return text.tolist()
    if dtype == "Int64":
        return series.astype(object).where(series.notna(), None).tolist()
    return series.tolist()


def _insert_many(conn: Connection, table: Table, frame: pd.DataFrame, bar: tqdm) -> None:
    compiled = insert(table).compile(dialect=conn.dialect)
    order = compiled.positiontup or list(frame.columns)
    spec = _columns(table.name)
    cursor = conn.connection.cursor()
    try:
        for start in range(0, len(frame), WRITE_CHUNK_ROWS):
            part = frame.iloc[start : start + WRITE_CHUNK_ROWS]
            values = [_sqlite_values(part[c], spec[c]) for c in order]
            cursor.executemany(str(compiled), list(zip(*values, strict=True)))
            bar.update(len(part))
    finally:
        cursor.close()


def _load_rows(conn: Connection, table: Table, frame: pd.DataFrame, bar: tqdm) -> None:
    try:
        if database.is_postgres(conn.engine):
            _copy_in(conn, table, frame, bar)
        else:
            _insert_many(conn, table, frame, bar)
    except conn.dialect.loaded_dbapi.Error as exc:
        raise _as_sqlalchemy_error(exc, conn.dialect, f"bulk load into {table.name}") from exc


def _known_ids(
    conn: Connection, table: str, column: str, given: pd.DataFrame | None, replace: bool
) -> pd.Series:
    """Ids a feed may name: the given frame's, plus the stored ones unless the given frame replaces them."""
    parts = [] if given is None else [given[column]]
    if (given is None or not replace) and inspect(conn).has_table(table):
        stored = conn.execute(select(_table(table).c[column])).scalars().all()
        parts.append(pd.Series(stored, dtype="int64"))
    return pd.concat(parts, ignore_index=True) if parts else pd.Series([], dtype="int64")


def _write(
    engine: Engine,
    frames: dict[str, pd.DataFrame],
    *,
    replace: bool,
    progress: bool,
    check_references: bool,
) -> dict[str, int]:
    """Write already validated frames in one transaction; `frames` maps table name -> frame."""
    counts: dict[str, int] = {}
    # SQLite: take the write lock at BEGIN; a deferred transaction that reads first and writes after
    # fails at once (database is locked) when another writer committed meanwhile
    with engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn, conn.begin():
        feed = frames.get("feed_data")
        if feed is not None:
            if check_references:
                users = _known_ids(conn, "user_data", "user_id", frames.get("user_data"), replace)
                posts = _known_ids(conn, "post_text_df", "post_id", frames.get("post_text_df"), replace)
                validate_references(
                    users.to_frame("user_id"),
                    posts.to_frame("post_id"),
                    feed,
                    source="feed_data frame",
                    first_row=0,
                )
            if not feed["timestamp"].is_monotonic_increasing:
                frames = {
                    **frames,
                    "feed_data": feed.sort_values("timestamp", kind="stable", ignore_index=True),
                }
        for name in TABLES:
            if name not in frames:
                continue
            table = _table(name)
            if replace:
                table.drop(conn, checkfirst=True)
                conn.execute(CreateTable(table))  # without its indexes: they are built after the load
            else:
                table.create(conn, checkfirst=True)
            with tqdm(
                total=len(frames[name]), desc=f"write {name}", unit=" rows", disable=not progress
            ) as bar:
                _load_rows(conn, table, frames[name], bar)
            if replace:
                for index in sorted(table.indexes, key=lambda ix: ix.name or ""):
                    index.create(conn)  # (not CreateIndex: a dialect-only index, ddl_if, is skipped)
            if database.is_postgres(engine):
                conn.exec_driver_sql(f"ANALYZE {conn.dialect.identifier_preparer.quote(name)}")
            counts[name] = len(frames[name])
    return counts


def write_tables(
    engine: Engine,
    *,
    users: pd.DataFrame | None = None,
    posts: pd.DataFrame | None = None,
    feed: pd.DataFrame | None = None,
    replace: bool = True,
    progress: bool = True,
) -> dict[str, int]:
    """Validate and store the given tables in one transaction; returns rows written per table.

    replace=True drops and recreates each given table (tables not given are untouched); replace=False
    appends, creating a missing table. Feed rows must name users and posts that exist after the write
    (the given frames, or the stored tables for those not given); replacing users or posts alone does
    not re-check the stored feed. Rows of the frames are named by 0-based position in errors. A
    failure anywhere rolls back all, so the database is either fully written or as it was.
    """
    given = {"user_data": users, "post_text_df": posts, "feed_data": feed}
    frames = {
        name: validate_frame(frame, name, source=f"{name} frame", first_row=0)
        for name, frame in given.items()
        if frame is not None
    }
    if not frames:
        raise ValueError("write_tables needs at least one of users, posts, feed")
    return _write(engine, frames, replace=replace, progress=progress, check_references=True)


# --- CSV files ------------------------------------------------------------------------------------


def read_csv_table(path: Path, table: str) -> pd.DataFrame:
    """The CSV file at `path` validated as `table`; problems name the file, row and column."""
    path = Path(path)
    _columns(table)
    if not path.is_file():
        raise FileNotFoundError(f"CSV file for {table} not found: {path}")
    try:
        header = pd.read_csv(path, nrows=0, dtype="str", **CSV_READ_OPTIONS)
    except pd.errors.EmptyDataError:
        expected = ", ".join(COLUMNS[table])
        raise TableValidationError(
            [Problem(path.name, 1, None, f"file is empty; expected a header: {expected}")]
        ) from None
    validate_frame(header, table, source=path.name)  # wrong columns fail before the body is read
    try:
        try:
            frame = pd.read_csv(path, dtype=_read_dtypes(table, list(header.columns)), **CSV_READ_OPTIONS)
        except (ValueError, OverflowError):
            # Some cell does not fit its type; read every cell as text so validation can point at it.
            frame = pd.read_csv(path, dtype="str", **CSV_READ_OPTIONS)
    except pd.errors.ParserError as exc:
        raise TableValidationError(
            [Problem(path.name, None, None, f"not a readable CSV file: {exc}")]
        ) from None
    return validate_frame(frame, table, source=path.name)


class TablesHoldRowsError(RuntimeError):
    """import_csv would replace tables that hold rows, and was not told to (replace=False)."""


def rows_held(engine: Engine) -> dict[str, int]:
    """Rows in each of the three tables that exists and is not empty."""
    held = {}
    with engine.connect() as conn:
        existing = set(inspect(conn).get_table_names())
        for name in TABLES:
            if name in existing:
                count = conn.execute(select(func.count()).select_from(_table(name))).scalar_one()
                if count:
                    held[name] = int(count)
    return held


def import_csv(
    engine: Engine,
    *,
    users: Path,
    posts: Path,
    feed: Path,
    replace: bool = False,
    progress: bool = True,
) -> dict[str, int]:
    """Replace the three tables with the CSV files; all files are validated before the database is touched.

    Tables that hold rows are replaced only with replace=True (TablesHoldRowsError otherwise), so an
    import never drops someone's data by surprise."""
    frames: dict[str, pd.DataFrame] = {}
    errors: list[TableValidationError] = []
    for name, path in (("user_data", users), ("post_text_df", posts), ("feed_data", feed)):
        try:
            frames[name] = read_csv_table(Path(path), name)
        except TableValidationError as exc:
            errors.append(exc)
    if errors:
        raise TableValidationError.merge(errors)
    validate_references(
        frames["user_data"], frames["post_text_df"], frames["feed_data"], source=Path(feed).name
    )
    held = {} if replace else rows_held(engine)
    if held:
        where = engine.url.render_as_string(hide_password=True)
        tables = ", ".join(f"{name} ({count:,} rows)" for name, count in held.items())
        raise TablesHoldRowsError(
            f"{where} already holds {tables}; add --replace to drop them and load the files instead"
        )
    return _write(engine, frames, replace=True, progress=progress, check_references=False)
