"""ORM table recommendation_log: one row per answered recommendation (impressions.py writes it).

Not one of the users' tables: the service's own record of what it showed, to whom, from which arm of
which experiment and which model file. The experiment report (experiment_report.py) reads an
experiment's rows in request-time order on the first index; the second serves "what did this user see
before this moment" (a refresh or an audit joining the log with the feed) without a scan.
"""

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from database import Base


class RecommendationLog(Base):
    __tablename__ = "recommendation_log"
    __table_args__ = (
        Index("ix_recommendation_log_experiment_request_time", "experiment", "request_time"),
        Index("ix_recommendation_log_user_id_request_time", "user_id", "request_time"),
    )

    # BIGINT on PostgreSQL (a busy service passes 2^31 rows); SQLite autoincrements only INTEGER keys
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    served_at: Mapped[datetime] = mapped_column(DateTime)  # the server's clock when it answered
    request_time: Mapped[datetime] = mapped_column(DateTime)  # the request's `time`
    user_id: Mapped[int] = mapped_column(Integer)
    experiment: Mapped[str] = mapped_column(String(200))  # "" when no experiment is running
    arm: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[str] = mapped_column(String(64))  # SHA-256 prefix of the model file
    post_ids: Mapped[str] = mapped_column(Text)  # the answer's post ids, comma-separated, in order


def format_post_ids(post_ids) -> str:
    return ",".join(str(int(pid)) for pid in post_ids)


def parse_post_ids(value: str) -> list[int]:
    return [int(part) for part in value.split(",")] if value else []
