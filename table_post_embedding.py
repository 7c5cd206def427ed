"""ORM table post_embedding: the text embedding of each post, written by `main_script.py embed-posts`.

Not one of the users' tables: the pipeline's own. The service reads it for posts that appear after
training (the model file's autoencoder turns the vector into the item tower's text code), so the
service itself needs no text encoder, and one job embeds each post once for every worker and replica.
A row is valid for the post's current text (text_sha256) and one encoder (its name and max_length);
deployments that use different encoders keep their own rows side by side.
"""

from sqlalchemy import Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from database import Base


class PostEmbedding(Base):
    __tablename__ = "post_embedding"

    post_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    encoder: Mapped[str] = mapped_column(String, primary_key=True)  # encoder_key(): name;max_length
    text_sha256: Mapped[str] = mapped_column(String(64))
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # float32, little-endian, the encoder's width
