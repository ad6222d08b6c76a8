"""A CLIP tokenizer and text encoder built from configs, for text-to-image pipelines in tests and toy runs: nothing
can be downloaded offline, and diffusers' fast tests' ``hf-internal-testing/tiny-random-clip`` is a download.

The tokenizer is CLIP's byte-level BPE with no merges: every byte of a word is a token (``"a"`` and ``"a</w>"``
differ, as in CLIP), so any text tokenizes, and prompts that share words share tokens."""

from __future__ import annotations

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

START_TOKEN, END_TOKEN = "<|startoftext|>", "<|endoftext|>"
TINY_TEXT_LENGTH = 16
TINY_TEXT_WIDTH = 32


def tiny_clip_tokenizer(max_length: int = TINY_TEXT_LENGTH) -> CLIPTokenizer:
    """514 tokens: the two specials, the 256 byte symbols, and each of them ending a word."""
    symbols = list(bytes_to_unicode().values())
    vocabulary = {START_TOKEN: 0, END_TOKEN: 1}
    for suffix in ("", "</w>"):
        vocabulary |= {symbol + suffix: len(vocabulary) + i for i, symbol in enumerate(symbols)}
    return CLIPTokenizer(vocab=vocabulary, merges=[], model_max_length=max_length)


def tiny_clip_text_encoder(seed: int = 0, hidden_size: int = TINY_TEXT_WIDTH, max_length: int = TINY_TEXT_LENGTH,
                           with_projection: bool = False) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A random 2-layer ``CLIPTextModel`` for ``tiny_clip_tokenizer``'s ids, the same for the same ``seed``;
    ``with_projection=True`` gives ``CLIPTextModelWithProjection`` (SDXL's second encoder, pooled embeddings)."""
    config = CLIPTextConfig(vocab_size=2 + 2 * 256, hidden_size=hidden_size, intermediate_size=37,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=max_length,
                            projection_dim=hidden_size, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()
