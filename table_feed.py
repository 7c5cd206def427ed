"""ORM table feed_data: views and likes, as in the users' existing table.

The real table has no primary key and no foreign keys, so none is created here either: the ORM maps
(timestamp, user_id, post_id, action) as its identity, and the joins to users and posts are declared
on the relationship only. The columns here are the one statement of the table (see table_user.py).
Two indexes serve "a user's feed" and "a post's feed", newest first; the third, on timestamp alone,
lets the service's refresh read the rows of a recent window without a scan.
"""

from datetime import datetime

from sqlalchemy import DateTime, Index, Integer, String, func
from sqlalchemy.orm import Mapped, mapped_column, relationship

from database import Base
from table_post import Post
from table_user import User


class Feed(Base):
    __tablename__ = "feed_data"
    __table_args__ = (
        Index("ix_feed_data_user_id_timestamp", "user_id", "timestamp"),
        Index("ix_feed_data_post_id_timestamp", "post_id", "timestamp"),
        Index("ix_feed_data_timestamp", "timestamp"),
    )

    timestamp: Mapped[datetime] = mapped_column(
        DateTime, doc="when the post was shown or liked: naive local time, no time zone"
    )
    user_id: Mapped[int] = mapped_column(Integer, doc="a user_id of user_data")
    post_id: Mapped[int] = mapped_column(Integer, doc="a post_id of post_text_df")
    # "category": few distinct values, read as a pandas category (two shared strings, not one per row)
    action: Mapped[str] = mapped_column(
        String,
        info={"values": ("view", "like"), "category": True},
        doc="'view': the post was shown to the user; 'like': the user liked it",
    )
    target: Mapped[int | None] = mapped_column(
        Integer,
        nullable=True,
        info={"values": (0, 1)},
        doc="on a 'view' row: 1 when the user liked the post after this view, else 0 (never NULL); "
        "on a 'like' row: 0 or NULL (the like itself is the row), never 1",
    )

    user: Mapped[User] = relationship(
        primaryjoin="foreign(Feed.user_id) == User.user_id", lazy="joined", innerjoin=True, viewonly=True
    )
    post: Mapped[Post] = relationship(
        primaryjoin="foreign(Feed.post_id) == Post.post_id", lazy="joined", innerjoin=True, viewonly=True
    )

    __mapper_args__ = {"primary_key": [timestamp, user_id, post_id, action]}  # noqa: RUF012


# SQLite stores timestamps as text, in whatever form a writer used ('2021-12-20 10:00:00.000000' from
# SQLAlchemy, '2021-12-20 10:00:00' from Python's sqlite3, '2021-12-20T10:00:00'); the refresh compares
# datetime(timestamp), which is one form, and this index serves those comparisons.
Index("ix_feed_data_sqlite_time", func.datetime(Feed.__table__.c.timestamp)).ddl_if(dialect="sqlite")
