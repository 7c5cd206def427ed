"""The impression log: every answered recommendation becomes a row of recommendation_log, off the
request path.

A request only appends a tuple to a bounded in-process queue (no I/O, never blocks). One background
thread per worker process takes the queue in batches every IMPRESSION_FLUSH_SECONDS (or at once while
a backlog remains) and writes each batch in one transaction: COPY on PostgreSQL, an executemany INSERT
elsewhere. When the database is down, the batch in hand is retried every RETRY_SECONDS and new rows
wait in the queue; once the queue holds IMPRESSION_QUEUE_SIZE rows, further rows are dropped and
counted (the log warns with the count, /health reports it), so memory stays bounded and no request
ever waits for the database. Closing (the service's lifespan exit) writes what is queued, for up to
`timeout` seconds; rows still unwritten then are counted as lost and logged.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg2
from sqlalchemy import Engine, insert
from sqlalchemy.exc import DataError, IntegrityError

from database import is_postgres
from table_recommendation_log import RecommendationLog, format_post_ids

_INVALID = (IntegrityError, DataError, psycopg2.IntegrityError, psycopg2.DataError)
RETRY_SECONDS = 1.0  # between two attempts at a batch the database refused
log = logging.getLogger("recommender")
_EPOCH = datetime(1970, 1, 1)
_COLUMNS = ("served_at", "request_time", "user_id", "experiment", "arm", "model_version", "post_ids")
_TEXT = ", ".join(_COLUMNS[3:])  # in CSV an unquoted empty field is NULL; experiment "" is a value
_COPY = (
    f"COPY {RecommendationLog.__tablename__} ({', '.join(_COLUMNS)}) FROM STDIN "
    f"WITH (FORMAT csv, FORCE_NOT_NULL ({_TEXT}))"
)


@dataclass
class LogCounts:
    """What the log did so far (one worker process)."""

    accepted: int = 0  # rows put in the queue
    written: int = 0  # rows committed to recommendation_log
    dropped: int = 0  # rows refused because the queue was full (never written)
    failed_batches: int = 0  # write attempts the database refused (each retried)
    lost_at_shutdown: int = 0  # rows still unwritten when close() gave up
    rejected: int = 0  # rows of batches the database refused as invalid (no retry can help)
    queued: int = 0  # rows waiting now (queue and the batch in hand)


class ImpressionLog:
    """A bounded queue of impressions and the thread that writes them (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        *,
        queue_size: int = 100_000,
        batch_size: int = 1000,
        flush_seconds: float = 1.0,
        retry_seconds: float = RETRY_SECONDS,
    ):
        self.engine, self.batch_size = engine, batch_size
        self.flush_seconds, self.retry_seconds = flush_seconds, retry_seconds
        self._queue: queue.Queue[tuple] = queue.Queue(maxsize=queue_size)
        self._counts = LogCounts()
        self._lock = threading.Lock()  # the counters: record() runs on the event loop and worker threads
        self._in_hand = 0
        self._stop = threading.Event()
        self._deadline = float("inf")  # close() sets when the writer gives up on an unreachable database
        self._table_ready = False
        self._reported_drops = 0
        self._thread = threading.Thread(target=self._run, name="impression-log", daemon=True)

    def start(self) -> ImpressionLog:
        self._thread.start()
        return self

    # --- the request side: no I/O ---

    def record(
        self,
        *,
        user_id: int,
        request_time: int,
        post_ids: Sequence[int],
        experiment: str = "",
        arm: str = "",
        model_version: str = "",
    ) -> bool:
        """Queue one impression (request_time in seconds); False when the queue was full (counted)."""
        row = (
            datetime.now(UTC).replace(tzinfo=None),  # naive UTC, as the tables' timestamps are naive
            _EPOCH + timedelta(seconds=int(request_time)),
            int(user_id),
            experiment,
            arm,
            model_version,
            format_post_ids(post_ids),
        )
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            with self._lock:
                self._counts.dropped += 1
            return False
        with self._lock:
            self._counts.accepted += 1
        return True

    def counts(self) -> LogCounts:
        with self._lock:
            counts = LogCounts(**vars(self._counts))
        counts.queued = self._queue.qsize() + self._in_hand
        return counts

    # --- the writer thread ---

    def close(self, timeout: float = 10.0) -> LogCounts:
        """Write what is queued (for up to `timeout` seconds), stop the thread; the final counts."""
        self._deadline = time.monotonic() + timeout
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout + self.retry_seconds + 1.0)
        counts = self.counts()
        if counts.queued:
            with self._lock:
                self._counts.lost_at_shutdown = counts.queued
            counts.lost_at_shutdown = counts.queued
            log.error("impression log: %d rows not written at shutdown (database unavailable)", counts.queued)
        self._report_drops()
        return counts

    def _run(self) -> None:
        batch: list[tuple] = []
        while True:
            if not batch:
                batch = self._take()
                self._in_hand = len(batch)
            if batch:
                if self._write(batch):
                    batch, self._in_hand = [], 0
                    continue  # a backlog is written without waiting
                if self._stop.is_set() and time.monotonic() >= self._deadline:
                    return
                time.sleep(self.retry_seconds)
                continue
            self._report_drops()
            if self._stop.is_set():
                return
            self._stop.wait(self.flush_seconds)

    def _take(self) -> list[tuple]:
        batch = []
        while len(batch) < self.batch_size:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _write(self, batch: list[tuple]) -> bool:
        try:
            if not self._table_ready:  # created by the first write: the service starts with the DB down
                RecommendationLog.__table__.create(self.engine, checkfirst=True)
                self._table_ready = True
            if is_postgres(self.engine):
                self._copy(batch)
            else:
                with self.engine.begin() as conn:
                    conn.execute(
                        insert(RecommendationLog), [dict(zip(_COLUMNS, row, strict=True)) for row in batch]
                    )
        except _INVALID as exc:  # the rows themselves: retrying would block the log for good
            with self._lock:
                self._counts.rejected += len(batch)
            log.error("impression log: %d rows refused by the database (%s): %s", len(batch), type(exc), exc)
            return True
        except Exception as exc:  # any other database failure (an outage): keep the batch, retry, never raise
            with self._lock:
                self._counts.failed_batches += 1
                failures = self._counts.failed_batches
            if failures == 1 or failures % 10 == 0:
                log.warning(
                    "impression log: writing %d rows failed (%s), %d queued; retrying every %.0f s",
                    len(batch),
                    exc.__class__.__name__,
                    self._queue.qsize() + len(batch),
                    self.retry_seconds,
                )
            return False
        with self._lock:
            self._counts.written += len(batch)
        return True

    def _copy(self, batch: list[tuple]) -> None:
        """COPY ... FROM STDIN (CSV): one round trip per batch, the fastest load PostgreSQL offers."""
        buffer = io.StringIO()
        csv.writer(buffer).writerows(batch)
        buffer.seek(0)
        raw = self.engine.raw_connection()
        try:
            with raw.cursor() as cursor:
                cursor.copy_expert(_COPY, buffer)
            raw.commit()
        except Exception:
            with contextlib.suppress(Exception):  # the connection itself may be gone: nothing to undo
                raw.rollback()
            raise
        finally:
            raw.close()

    def _report_drops(self) -> None:
        dropped = self._counts.dropped
        if dropped > self._reported_drops:
            log.warning(
                "impression log: the queue is full (%d rows): %d impressions dropped so far",
                self._queue.maxsize,
                dropped,
            )
            self._reported_drops = dropped


def summary(counts: LogCounts) -> dict[str, Any]:
    return vars(counts).copy()
