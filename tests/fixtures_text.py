"""Offline text fixtures for tests and benchmarks: a tiny random RoBERTa and realistic post texts.

Plain functions, so any test (or a conftest fixture) can call them; nothing here touches the network.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's ids 0..4, in its order

TOPIC_WORDS = {
    "sport": ["match", "goal", "striker", "coach", "league", "season", "team", "fans", "final", "injury"],
    "business": ["market", "shares", "profit", "company", "investors", "bank", "growth", "deal", "sales"],
    "politics": ["minister", "election", "parliament", "vote", "government", "party", "law", "policy"],
    "tech": ["software", "phone", "startup", "chip", "app", "users", "data", "cloud", "device", "update"],
    "covid": ["vaccine", "cases", "hospital", "virus", "lockdown", "masks", "doctors", "patients"],
    "movie": ["film", "actor", "director", "scene", "plot", "cinema", "story", "characters", "ending"],
    "entertainment": ["singer", "album", "concert", "show", "star", "festival", "music", "tour", "award"],
}
FILLER = ["the", "a", "and", "of", "in", "on", "with", "after", "for", "this", "was", "is", "very", "new"]
VERBS = ["said", "announced", "reported", "expected", "showed", "praised", "criticised", "confirmed"]


def realistic_texts(n: int, *, seed: int = 0, min_words: int = 40, max_words: int = 80) -> list[str]:
    """`n` news-like post texts of min_words..max_words words, each mostly about one topic."""
    rng = random.Random(seed)
    topics = list(TOPIC_WORDS)
    texts = []
    for _ in range(n):
        words = TOPIC_WORDS[rng.choice(topics)]
        sentence: list[str] = []
        for _ in range(rng.randint(min_words, max_words)):
            pool = rng.choices([words, FILLER, VERBS], weights=[4, 5, 1])[0]
            sentence.append(rng.choice(pool))
        sentence[0] = sentence[0].capitalize()
        texts.append(" ".join(sentence) + ".")
    return texts


def build_tiny_roberta(directory: Path, *, seed: int = 0, vocab_size: int = 600) -> Path:
    """Save a randomly initialised 2-layer, 32-wide RoBERTa and its byte-level BPE tokenizer in
    `directory`, loadable with AutoTokenizer/AutoModel.from_pretrained(directory); returns directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        realistic_texts(300, seed=seed, min_words=5, max_words=30),
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    # Wrap the trained object itself: in transformers 5 the vocab_file/merges_file arguments are ignored.
    tokenizer = RobertaTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=256,
    )
    tokenizer.save_pretrained(directory)
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256 + 2,  # RoBERTa positions start after padding_idx=1
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        RobertaModel(config).save_pretrained(directory)
    return directory
