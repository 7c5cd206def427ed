"""Pydantic response models (the course's conventions, which the original project follows).

Their fields are the ORM tables' columns (table_*.py), renamed where the course names them differently
(`id`, `time`); tests/test_house.py fails when a field and its column drift apart.
"""

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

# The feed's timestamps are naive (no offset), so they are not RFC 3339 `date-time` strings.
NaiveDateTime = Annotated[
    datetime,
    WithJsonSchema(
        {
            "type": "string",
            "pattern": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?$",
            "description": "naive time, ISO 8601 without offset",
            "examples": ["2021-12-01T12:00:00"],
        }
    ),
]


class UserGet(BaseModel):
    model_config = ConfigDict(from_attributes=True, populate_by_name=True)

    id: int = Field(validation_alias="user_id", examples=[200])
    gender: int = Field(examples=[1])
    age: int = Field(examples=[34])
    country: str = Field(examples=["Russia"])
    city: str = Field(examples=["Moscow"])
    exp_group: int = Field(examples=[3])
    os: str = Field(examples=["Android"])
    source: str = Field(examples=["ads"])


class PostGet(BaseModel):
    model_config = ConfigDict(from_attributes=True, populate_by_name=True)

    id: int = Field(validation_alias="post_id", examples=[1])
    text: str
    topic: str = Field(examples=["business"])


class FeedGet(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    user_id: int
    post_id: int
    action: str = Field(examples=["view"])
    time: NaiveDateTime = Field(validation_alias="timestamp")
    user: UserGet
    post: PostGet


class LiveGet(BaseModel):
    status: str = Field(description="'alive' whenever the process answers", examples=["alive"])


class RefreshGet(BaseModel):
    # optional fields: /health leaves out what is unknown (no success yet, no error, no change log)
    last_success: str | None = Field(
        None, description="when the last refresh cycle succeeded (UTC, ISO 8601)"
    )
    consecutive_failures: int = Field(description="refresh cycles failed in a row since then")
    last_error: str | None = Field(None, description="the last failed cycle's error")
    lag_rows: int | None = Field(None, description="feed changes committed, not merged yet (change log only)")


class ArmGet(BaseModel):
    name: str = Field(examples=["likes"])
    share: float = Field(examples=[0.5])
    ranking: str = Field(examples=["likes"])
    model_version: str = Field(description="the first 12 hex digits of the model file's SHA-256")


class ImpressionsGet(BaseModel):
    accepted: int = Field(description="impressions queued by this worker since it started")
    written: int = Field(description="of those, rows committed to recommendation_log")
    queued: int = Field(description="rows waiting for the database now")
    dropped: int = Field(description="impressions refused because the queue was full (never written)")
    failed_batches: int = Field(description="write attempts the database refused (each retried)")


class HealthGet(BaseModel):
    status: str = Field(
        description="'ok' when the database answers and the refresh follows, 'degraded' when the database"
        " does not answer or REFRESH_FAILURES_DEGRADED refresh cycles in a row failed"
    )
    database: str = Field(description="'up' or 'down'")
    model: str = Field(description="'loaded' or 'absent'")
    refresh: RefreshGet | None = Field(None, description="the refresh of the tables, once a cycle ran")
    experiment: str | None = Field(None, description="the running experiment's name (absent: none)")
    arms: list[ArmGet] | None = Field(None, description="the experiment's arms, as this worker serves them")
    impressions: ImpressionsGet | None = Field(None, description="this worker's impression log (when on)")


class ErrorGet(BaseModel):
    detail: str
