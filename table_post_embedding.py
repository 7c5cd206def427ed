"""ORM table post_embedding: the text embedding of each post, written by `main_script.py embed-posts`.

Not one of the users' tables: the pipeline's own. The service reads it for posts that appear after
training (the model file's autoencoder turns the vector into the item tower's text code), so the
service itself needs no text encoder, and one job embeds each post once for every worker and replica.
A row is valid for the post's current text (text_sha256 = text_key(clean_text(text))) and one encoder
(its name and max_length); deployments that use different encoders keep their own rows side by side.
"""

import hashlib
import math

from sqlalchemy import Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from database import Base


class PostEmbedding(Base):
    __tablename__ = "post_embedding"

    post_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    encoder: Mapped[str] = mapped_column(String, primary_key=True)  # encoder_key(): name;max_length
    text_sha256: Mapped[str] = mapped_column(String(64))
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # float32, little-endian, the encoder's width


def clean_text(text: object) -> str:
    """None and NaN (a missing value in pandas) become "", so they embed as an empty text; else str()."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return ""
    return str(text)


def text_key(text: str) -> str:
    """Hex SHA-256 of the text: the cache key, so an edited post text is embedded again.

    Hex, not the raw digest: numpy's fixed-width bytes drop trailing NUL bytes, which would lose keys.
    """
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()
