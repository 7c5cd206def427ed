"""ORM table user_data: one row per user, as in the users' existing table.

The columns here are the one statement of the table: CSV validation, reads and writes
(get_features_table) and the response model (schema.UserGet, held to it by a test) derive from them.
`info={"values": ...}` lists a column's allowed values.
"""

from sqlalchemy import Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from database import Base


class User(Base):
    __tablename__ = "user_data"

    user_id: Mapped[int] = mapped_column(
        Integer, primary_key=True, autoincrement=False, doc="the user's id, unique, 32-bit"
    )
    gender: Mapped[int] = mapped_column(Integer, info={"values": (0, 1)}, doc="0 or 1")
    age: Mapped[int] = mapped_column(Integer, doc="years")
    country: Mapped[str] = mapped_column(String, doc="free text, not empty")
    city: Mapped[str] = mapped_column(String, doc="free text, not empty; new cities are fine")
    exp_group: Mapped[int] = mapped_column(
        Integer, info={"values": (0, 1, 2, 3, 4)}, doc="experimental group of the user"
    )
    os: Mapped[str] = mapped_column(String, doc="free text, not empty (e.g. 'Android', 'iOS')")
    source: Mapped[str] = mapped_column(String, doc="free text, not empty (e.g. 'ads', 'organic')")
