"""ORM table user_data: one row per user, as in the users' existing table."""

from sqlalchemy import Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from database import Base


class User(Base):
    __tablename__ = "user_data"

    user_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    gender: Mapped[int] = mapped_column(Integer)  # 0 / 1
    age: Mapped[int] = mapped_column(Integer)
    country: Mapped[str] = mapped_column(String)
    city: Mapped[str] = mapped_column(String)
    exp_group: Mapped[int] = mapped_column(Integer)  # 0..4
    os: Mapped[str] = mapped_column(String)
    source: Mapped[str] = mapped_column(String)
