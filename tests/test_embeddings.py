"""Text embeddings (tiny offline RoBERTa and the bundled MiniLM), the embedding cache and the autoencoder."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_text import build_tiny_roberta, realistic_texts

import get_post_embeddings as gpe
from learn_model import train_autoencoder
from model import Autoencoder

TEXTS = [
    "A short one.",
    "The striker scored twice in the final and the fans celebrated long after the match ended.",
    "",
    "Shares fell.",
    "The minister said the new law on elections would be put to a vote in parliament next week.",
]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_tiny_roberta_loads_as_roberta(tiny_encoder: str) -> None:
    tokenizer, model = gpe.load_encoder(tiny_encoder)
    assert type(tokenizer).__name__.startswith("RobertaTokenizer")
    assert [tokenizer.bos_token, tokenizer.pad_token, tokenizer.eos_token] == ["<s>", "<pad>", "</s>"]
    assert [tokenizer.unk_token, tokenizer.mask_token] == ["<unk>", "<mask>"]
    ids = tokenizer("the match")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert model.config.hidden_size == 32 and not model.training


def test_embed_texts_shape_dtype_and_missing_texts(tiny_encoder: str) -> None:
    out = gpe.embed_texts([*TEXTS, None, float("nan")], encoder=tiny_encoder, progress=False)
    assert out.shape == (7, 32) and out.dtype == np.float32
    assert np.isfinite(out).all()
    # None and NaN are documented to embed as the empty text.
    np.testing.assert_allclose(out[5], out[2], atol=1e-6)
    np.testing.assert_allclose(out[6], out[2], atol=1e-6)
    assert gpe.embed_texts([], encoder=tiny_encoder, progress=False).shape == (0, 32)


def test_length_sorting_keeps_the_input_order(tiny_encoder: str) -> None:
    alone = np.vstack([gpe.embed_texts([t], encoder=tiny_encoder, progress=False) for t in TEXTS])
    batched = gpe.embed_texts(TEXTS, encoder=tiny_encoder, batch_size=2, progress=False)
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    assert not np.allclose(alone[0], alone[1], atol=1e-3), "distinct texts must give distinct rows"


def test_mean_pooling_ignores_padding(tiny_encoder: str) -> None:
    long_text = " ".join(realistic_texts(1, min_words=90, max_words=90))
    short = "Shares fell."
    alone = gpe.embed_texts([short], encoder=tiny_encoder, progress=False)[0]
    padded = gpe.embed_texts([long_text, short], encoder=tiny_encoder, progress=False)[1]
    np.testing.assert_allclose(padded, alone, atol=1e-5)

    hidden = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    pooled = gpe.mean_pool(hidden, mask)
    torch.testing.assert_close(pooled[0], hidden[0, :2].mean(dim=0))
    torch.testing.assert_close(pooled[1], hidden[1].mean(dim=0))


def test_truncation_to_max_length(tiny_encoder: str) -> None:
    base = realistic_texts(1, min_words=60, max_words=60)[0]
    a, b = gpe.embed_texts(
        [base, base + " extra words at the end"], encoder=tiny_encoder, max_length=16, progress=False
    )
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_unavailable_encoder_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="TEXT_ENCODER"):
        gpe.load_encoder(str(tmp_path / "no-such-model"))


def test_minilm_default_is_semantic() -> None:
    assert Path(gpe.resolve_encoder("")) == Path(gpe.default_encoder())
    texts = [
        "The striker scored two goals and his team won the football final.",
        "A late goal gave the club victory in the championship match.",
        "The central bank raised interest rates to fight rising inflation.",
        "Doctors say the new vaccine cut hospital admissions for the virus.",
    ]
    out = gpe.embed_texts(texts, progress=False)
    assert out.shape == (4, 384) and out.dtype == np.float32
    assert cosine(out[0], out[1]) > cosine(out[0], out[2]) + 0.1
    assert cosine(out[0], out[1]) > cosine(out[0], out[3]) + 0.1


@pytest.fixture
def count_embedded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Wrap embed_texts so a test sees how many texts each embed_posts call really embedded."""
    calls: list[int] = []
    original = gpe.embed_texts

    def counting(texts, **kwargs):
        calls.append(len(texts))
        return original(texts, **kwargs)

    monkeypatch.setattr(gpe, "embed_texts", counting)
    return calls


def test_cache_embeds_only_new_or_changed_texts(
    tiny_encoder: str, tmp_path: Path, count_embedded: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    ids = np.array([10, 11, 12, 13, 14])
    kwargs = {"encoder": tiny_encoder, "cache_dir": tmp_path, "progress": False}
    first = gpe.embed_posts(ids, TEXTS, **kwargs)
    assert count_embedded == [5] and first.shape == (5, 32)
    np.testing.assert_allclose(first, gpe.embed_texts(TEXTS, encoder=tiny_encoder, progress=False), atol=1e-5)
    count_embedded.clear()

    with caplog.at_level(logging.INFO, logger="get_post_embeddings"):
        again = gpe.embed_posts(ids, TEXTS, **kwargs)
    assert count_embedded == [], "a rerun on unchanged texts must not embed anything"
    assert "5 cached, 0 distinct texts to embed" in caplog.text
    np.testing.assert_array_equal(again, first)

    changed = [*TEXTS[:3], "Shares rose sharply after the report.", TEXTS[4]]
    updated = gpe.embed_posts(ids, changed, **kwargs)
    assert count_embedded == [1], "only the edited text is embedded again"
    np.testing.assert_array_equal(np.delete(updated, 3, axis=0), np.delete(first, 3, axis=0))
    assert not np.allclose(updated[3], first[3])

    # Rows follow the given post order, and duplicate texts are embedded once.
    count_embedded.clear()
    order = [4, 0, 2, 1, 3]
    np.testing.assert_array_equal(
        gpe.embed_posts(ids[order], [changed[i] for i in order], **kwargs), updated[order]
    )
    dupes = gpe.embed_posts(np.array([1, 2, 3]), ["same new text"] * 3, **kwargs)
    assert count_embedded == [1] and np.allclose(dupes, dupes[0])


def test_cache_keeps_every_key(tiny_encoder: str, tmp_path: Path, count_embedded: list[int]) -> None:
    # "post 69" has a SHA-256 digest ending in a NUL byte, which numpy's fixed-width bytes would drop.
    texts = [*realistic_texts(200, seed=7, min_words=3, max_words=8), "post 69"]
    ids = np.arange(len(texts))
    gpe.embed_posts(ids, texts, encoder=tiny_encoder, cache_dir=tmp_path, progress=False)
    gpe.embed_posts(ids, texts, encoder=tiny_encoder, cache_dir=tmp_path, progress=False)
    assert count_embedded == [len(set(texts))], "the rerun must find every text in the cache"


def test_cache_is_per_encoder(tiny_encoder: str, tmp_path: Path, count_embedded: list[int]) -> None:
    other = str(build_tiny_roberta(tmp_path / "other_model", seed=1))
    cache = tmp_path / "cache"
    ids = np.arange(len(TEXTS))
    a = gpe.embed_posts(ids, TEXTS, encoder=tiny_encoder, cache_dir=cache, progress=False)
    b = gpe.embed_posts(ids, TEXTS, encoder=other, cache_dir=cache, progress=False)
    c = gpe.embed_posts(ids, TEXTS, encoder=tiny_encoder, cache_dir=cache, max_length=8, progress=False)
    assert count_embedded == [5, 5, 5], "another encoder or max_length must not reuse vectors"
    assert not np.allclose(a, b) and not np.allclose(a, c)
    assert len(list(cache.glob("*.npz"))) == 3


def test_cache_write_is_atomic(tiny_encoder: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = np.arange(len(TEXTS))
    kwargs = {"encoder": tiny_encoder, "cache_dir": tmp_path, "progress": False}
    gpe.embed_posts(ids, TEXTS, **kwargs)
    (path,) = tmp_path.glob("*.npz")
    before = path.read_bytes()

    replaced: list[tuple[str, str]] = []
    real_replace = os.replace

    def recording_replace(src, dst):
        replaced.append((str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(gpe.os, "replace", recording_replace)
    gpe.embed_posts(np.arange(6), [*TEXTS, "one more"], **kwargs)
    assert len(replaced) == 1 and replaced[0][1] == str(path)
    assert Path(replaced[0][0]).parent == tmp_path, "the temporary file must be on the same filesystem"
    after = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gpe.np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        gpe.embed_posts(np.arange(6), [*TEXTS, "yet another"], **kwargs)
    assert path.read_bytes() == after != before, "a failed write leaves the last good cache intact"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name], "no temporary file is left behind"


def low_rank_data(n: int = 600, dim: int = 384, rank: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.normal(size=(n, rank)) @ rng.normal(size=(rank, dim)) + 0.1 * rng.normal(size=(n, dim))
    return (data + 3.0).astype(np.float32)


def test_autoencoder_learns_and_is_deterministic() -> None:
    data = low_rank_data()
    _, _, untrained_mse = train_autoencoder(data, code_dim=128, epochs=0, progress=False)
    model, codes, mse = train_autoencoder(data, code_dim=128, epochs=30, progress=False)
    assert isinstance(model, Autoencoder) and not model.training
    assert codes.shape == (600, 128) and codes.dtype == np.float32
    assert mse < 0.5 * untrained_mse and mse < 0.2, (
        f"reconstruction MSE {mse:.3f} vs untrained {untrained_mse:.3f}"
    )

    _, codes_again, mse_again = train_autoencoder(data, code_dim=128, epochs=30, progress=False)
    np.testing.assert_array_equal(codes_again, codes)
    assert mse_again == mse
    _, other_codes, _ = train_autoencoder(data, code_dim=128, epochs=30, seed=1, progress=False)
    assert not np.allclose(other_codes, codes)

    # The scaling lives in the module, so a restored one encodes raw embeddings into the same codes.
    restored = Autoencoder(384, hidden_dim=256, code_dim=128)
    restored.load_state_dict(model.state_dict())
    with torch.inference_mode():
        np.testing.assert_allclose(restored.encode(torch.from_numpy(data)).numpy(), codes, atol=1e-6)
