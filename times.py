"""Time in one place: the feed's and the API's timestamp form, its parsing, and seconds since the epoch.

Times are int64 seconds since the Unix epoch everywhere past the tables (naive timestamps, as the feed
stores them). The API accepts exactly the strings TIME_PATTERN describes; a test walks every day of
TIME_RANGE against it.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta

import numpy as np
import pandas as pd

DAY_SECONDS = 86_400
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"  # the feed's timestamps and the API's `time`: naive, one-second steps
TIME_HINT = "YYYY-mm-dd HH:MM:SS"  # the API accepts ISO 8601's "T" for the space too (TIME_PATTERN)
TIME_RANGE = ("1678-01-01 00:00:00", "2261-12-31 23:59:59")  # inside datetime64[ns], which pandas uses
_YEAR = r"(?:16(?:7[89]|[89]\d)|1[7-9]\d\d|2[01]\d\d|22(?:[0-5]\d|6[01]))"  # 1678..2261
_LEAP_YEAR = (  # the leap years among them: 1700, 1800, 1900, 2100 and 2200 are not, 2000 is
    r"(?:16(?:8[048]|9[26])|(?:1[7-9]|2[01])(?:0[48]|[2468][048]|[13579][26])|2000"
    r"|22(?:0[48]|[24][048]|[13][26]|5[26]|60))"
)
# Exactly the strings parse_time accepts (a test walks every day of the range), for the OpenAPI schema.
TIME_PATTERN = (
    rf"^(?:{_YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12]\d|3[01])|(?:0[469]|11)-(?:0[1-9]|[12]\d|30)"
    rf"|02-(?:0[1-9]|1\d|2[0-8]))|{_LEAP_YEAR}-02-29)[ T](?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d$"
)
_EPOCH = datetime(1970, 1, 1)
# The separator: the seed's space, or ISO 8601's "T" (the form the feed endpoints answer with).
_TIME_DIGITS = re.compile(r"(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})", re.ASCII)
_FIRST, _LAST = (datetime.strptime(t, TIME_FORMAT) for t in TIME_RANGE)


def to_seconds(timestamps: pd.Series | np.ndarray | pd.DatetimeIndex) -> np.ndarray:
    """datetime64 values -> int64 seconds since the epoch."""
    values = np.asarray(timestamps, dtype="datetime64[ns]")
    assert not np.isnat(values).any(), "timestamps must not be missing"
    return values.astype("datetime64[s]").astype(np.int64)


def now_seconds() -> int:
    """The server clock's local time as seconds since the epoch, naive like the feed's timestamps."""
    return (datetime.now().replace(microsecond=0) - _EPOCH) // timedelta(seconds=1)


def parse_time(value: str) -> int:
    """'YYYY-mm-dd HH:MM:SS' or 'YYYY-mm-ddTHH:MM:SS' in TIME_RANGE -> int64 seconds since the epoch;
    ValueError otherwise.

    Accepts exactly what TIME_PATTERN describes (a test walks every day of the range), by a shorter
    route: the digits' layout, then datetime's own calendar check, then the range."""
    digits = _TIME_DIGITS.fullmatch(value)
    try:
        moment = datetime(*map(int, digits.groups()))  # type: ignore[union-attr]
        if not _FIRST <= moment <= _LAST:
            raise ValueError(value)
    except (AttributeError, ValueError):
        raise ValueError(
            f"{value!r} is not a time {TIME_HINT} between {TIME_RANGE[0]} and {TIME_RANGE[1]}"
        ) from None
    return (moment - _EPOCH) // timedelta(seconds=1)


def format_time(seconds: int) -> str:
    """int64 seconds since the epoch -> 'YYYY-mm-dd HH:MM:SS'."""
    return (_EPOCH + timedelta(seconds=int(seconds))).strftime(TIME_FORMAT)
