"""Built-in text: the documentation topics that ship with Python (``pydoc_data``), and a tokenizer trained on them."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "mask_token": "[MASK]"}


def pydoc_paragraphs(min_characters: int = 40) -> list[str]:
    """The paragraphs of Python's own documentation topics (``pydoc_data.topics``), whitespace-normalised, in a fixed
    order: a text corpus every Python installation has."""
    from pydoc_data.topics import topics

    paragraphs = []
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            text = " ".join(block.split())
            if len(text) >= min_characters:
                paragraphs.append(text)
    return paragraphs


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained with the ``tokenizers`` library, with ``[PAD]``, ``[UNK]`` and ``[MASK]``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 300:
        raise ValueError(f"vocab_size must be at least 300 (256 bytes plus merges and special tokens), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def token_chunks(tokenizer: PreTrainedTokenizerFast, texts: Iterable[str], length: int) -> torch.LongTensor:
    """The texts tokenized, concatenated and cut into ``(N, length)`` chunks (the remainder dropped)."""
    ids = torch.tensor([i for text in texts for i in tokenizer(text, add_special_tokens=False).input_ids])
    return ids[: len(ids) // length * length].reshape(-1, length)


def train_and_held_out(chunks: torch.LongTensor, held_out_fraction: float = 0.05):
    """The last ``held_out_fraction`` of the chunks (at least one) held out, in corpus order."""
    count = max(1, int(len(chunks) * held_out_fraction))
    return chunks[:-count], chunks[-count:]
