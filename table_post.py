"""ORM table post_text_df: one row per post, as in the users' existing table (the one statement of its
columns, see table_user.py). Topics are free text: any non-empty topic is accepted."""

from sqlalchemy import Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from database import Base


class Post(Base):
    __tablename__ = "post_text_df"

    post_id: Mapped[int] = mapped_column(
        Integer, primary_key=True, autoincrement=False, doc="the post's id, unique, 32-bit"
    )
    text: Mapped[str] = mapped_column(Text, doc="the post's text, not empty; any length")
    topic: Mapped[str] = mapped_column(String, doc="free text, not empty (e.g. 'movie', 'covid')")
