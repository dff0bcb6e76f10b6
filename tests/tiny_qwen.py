"""Tiny random Qwen2.5-VL text encoder, tokenizer and Qwen-Image VAE for the tests.

The builders live in `apex_dist.models.tiny` (the quickstart uses them too); this module keeps
the names the tests import.
"""

from apex_dist.models.tiny import (
    TEMPLATE_SPECIAL_TOKENS,
    TINY_VOCAB_SIZE,
    TRAINING_REPEATS,
    TRAINING_SENTENCES,
    build_tiny_text_encoder,
    build_tiny_text_pair,
    build_tiny_tokenizer,
    build_tiny_vae,
    write_text_snapshot,
    write_vae_snapshot,
)

__all__ = [
    "TEMPLATE_SPECIAL_TOKENS",
    "TINY_VOCAB_SIZE",
    "TRAINING_REPEATS",
    "TRAINING_SENTENCES",
    "build_tiny_text_encoder",
    "build_tiny_text_pair",
    "build_tiny_tokenizer",
    "build_tiny_vae",
    "write_text_snapshot",
    "write_vae_snapshot",
]
