"""Tiny random Qwen2.5-VL text encoder, tokenizer and Qwen-Image VAE, built in-process.

Used by the tests and by the quickstart (`tools/quickstart.py`), where no model hub is
reachable, so everything here is constructed from code: a byte-level
BPE tokenizer trained on a few sentences (with Qwen2's pre-tokenizer, so Qwen-Image's prompt
template splits into the same 34 leading tokens as with the real tokenizer), a Qwen2.5-VL with
two text layers and a one-block vision tower, and an `AutoencoderKLQwenImage` with small
widths. `write_text_snapshot` / `write_vae_snapshot` save them in the Hugging Face snapshot
layout (`text_encoder/`, `tokenizer/`, `vae/`) so loaders can be tested end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# The special tokens Qwen-Image's prompt template uses, plus Qwen2's end-of-text (its padding).
TEMPLATE_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Sentences the tiny BPE is trained on: the template's system text (so its words become single
# tokens, as in the real 151k vocabulary) and the words test prompts use.
TRAINING_SENTENCES = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:",
    "system",
    "user",
    "assistant",
    "A red cat sits on a blue mat next to a small green box.",
    "An old lighthouse at dusk, waves crashing, seagulls in a cloudy sky.",
    "A sign that says hello world in bold letters.",
    "blurry, low quality, watermark",
)
TRAINING_REPEATS = 50  # enough repetitions for every word above to be merged into one token
TINY_VOCAB_SIZE = 600  # 256 byte symbols + merges for every word of the sentences above


def build_tiny_tokenizer(extra_sentences: tuple[str, ...] = ()):
    """A Qwen2 fast tokenizer with a tiny BPE vocabulary trained here (right padding).

    `extra_sentences` are added to the training text, so that their words become single
    tokens as well (the quickstart adds the synthetic dataset's vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    # Train with the exact pre-tokenizer Qwen2Tokenizer installs, so the learned merges apply.
    reference = Qwen2Tokenizer()
    trainer_tokenizer = Tokenizer(models.BPE())
    trainer_tokenizer.pre_tokenizer = reference.backend_tokenizer.pre_tokenizer
    trainer_tokenizer.normalizer = reference.backend_tokenizer.normalizer
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        initial_alphabet=byte_alphabet,
        special_tokens=list(TEMPLATE_SPECIAL_TOKENS),
        show_progress=False,
    )
    trainer_tokenizer.train_from_iterator(
        [*TRAINING_SENTENCES, *extra_sentences] * TRAINING_REPEATS, trainer=trainer
    )
    state = json.loads(trainer_tokenizer.to_str())["model"]
    merges = [
        tuple(pair) if isinstance(pair, list) else tuple(pair.split(" "))
        for pair in state["merges"]
    ]
    tokenizer = Qwen2Tokenizer(vocab=state["vocab"], merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": list(TEMPLATE_SPECIAL_TOKENS[1:])})
    tokenizer.padding_side = "right"
    return tokenizer


def build_tiny_text_encoder(vocab_size: int, seed: int = 0):
    """A random fp32 Qwen2_5_VLForConditionalGeneration with 2 text layers of width 32."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    head_dim = 16
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 2048,
            # mrope sections split head_dim / 2 rotary frequencies over (time, height, width)
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [2, 3, 3],
            },
            "pad_token_id": 0,
            "bos_token_id": 0,
            "eos_token_id": 0,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": 32,
            "fullatt_block_indexes": [0],
        },
        image_token_id=vocab_size - 1,
        video_token_id=vocab_size - 2,
        vision_start_token_id=vocab_size - 3,
        vision_end_token_id=vocab_size - 4,
    )
    assert config.text_config.hidden_size // config.text_config.num_attention_heads == head_dim
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    return model


def build_tiny_text_pair(seed: int = 0, extra_sentences: tuple[str, ...] = ()):
    """(model, tokenizer): a tiny Qwen2.5-VL whose vocabulary covers the tiny tokenizer."""
    tokenizer = build_tiny_tokenizer(extra_sentences)
    model = build_tiny_text_encoder(vocab_size=len(tokenizer) + 8, seed=seed)
    return model, tokenizer


def write_text_snapshot(snapshot_dir: Path, seed: int = 0, extra_sentences: tuple[str, ...] = ()):
    """Save a tiny text encoder and tokenizer as `text_encoder/` and `tokenizer/`."""
    model, tokenizer = build_tiny_text_pair(seed=seed, extra_sentences=extra_sentences)
    snapshot_dir = Path(snapshot_dir)
    model.save_pretrained(snapshot_dir / "text_encoder")
    tokenizer.save_pretrained(snapshot_dir / "tokenizer")
    return model, tokenizer


def build_tiny_vae(z_dim: int = 4, seed: int = 0):
    """A random fp32 AutoencoderKLQwenImage (base width 8, spatial factor 8, z_dim channels).

    The latent statistics are set to distinct non-trivial values so that normalisation is
    visible in tests.
    """
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    model = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        latents_mean=[0.25 * (index - z_dim / 2) for index in range(z_dim)],
        latents_std=[0.5 + 0.25 * index for index in range(z_dim)],
    )
    return model.eval()


def write_vae_snapshot(snapshot_dir: Path, z_dim: int = 4, seed: int = 0):
    """Save a tiny VAE as `vae/` of a snapshot and return it."""
    model = build_tiny_vae(z_dim=z_dim, seed=seed)
    model.save_pretrained(Path(snapshot_dir) / "vae")
    return model


# The transformer of a tiny snapshot: the `qwen-image-tiny` preset (16 packed channels = the
# tiny VAE's 4 latent channels in 2x2 patches, text width 32 = the tiny text encoder's).
TINY_TRANSFORMER_PRESET = "qwen-image-tiny"
# Standard deviation of the noise added to the tiny transformer's weights, so that norm gains
# and biases differ from their constant initialisation and every weight matters.
TINY_WEIGHT_PERTURBATION = 0.1


def write_transformer_snapshot(snapshot_dir: Path, seed: int = 0):
    """Save a random tiny diffusers `QwenImageTransformer2DModel` as `transformer/`."""
    from diffusers import QwenImageTransformer2DModel

    from apex_dist.models.qwen_image import QWEN_IMAGE_PRESETS

    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(**QWEN_IMAGE_PRESETS[TINY_TRANSFORMER_PRESET]).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * TINY_WEIGHT_PERTURBATION)
    model.save_pretrained(Path(snapshot_dir) / "transformer")
    return model


def write_tiny_snapshot(snapshot_dir: Path, seed: int = 0) -> Path:
    """A whole tiny Qwen-Image snapshot (transformer/, text_encoder/, tokenizer/, vae/) in the
    Hugging Face layout, for journeys that run the real loaders end to end."""
    snapshot_dir = Path(snapshot_dir)
    write_transformer_snapshot(snapshot_dir, seed=seed)
    write_text_snapshot(snapshot_dir, seed=seed)
    write_vae_snapshot(snapshot_dir, seed=seed)
    return snapshot_dir
