"""Tiny random Mask2Former (COCO labels) and CLIP snapshots, built in-process for the tests.

They have the layout of the real snapshots (`config.json`, `model.safetensors`,
`preprocessor_config.json`, and the CLIP tokenizer's files), so the evaluation's loaders run end
to end on them; their weights are random, so their verdicts mean nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch

# COCO's instance category names in COCO's order, as transformers' COCO checkpoints spell them
# in id2label (GenEval's names differ for three of them: mouse, remote, keyboard).
COCO_LABELS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
# Input side of the tiny detector in the tests (a multiple of Swin's 32-pixel stride).
TINY_DETECTOR_EDGE = 64
# Image side of the tiny CLIP.
TINY_CLIP_IMAGE = 32


def write_detector_snapshot(path: Path, labels=COCO_LABELS, seed: int = 0) -> Path:
    """A random Mask2Former (Swin backbone of width 16, 10 queries) with `labels`."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessorPil,
        SwinConfig,
    )

    backbone = SwinConfig(
        image_size=TINY_DETECTOR_EDGE,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone,
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=64,
        dim_feedforward=64,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        num_queries=10,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: index for index, label in enumerate(labels)},
        use_pretrained_backbone=False,
    )
    torch.manual_seed(seed)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    path = Path(path)
    model.save_pretrained(path)
    Mask2FormerImageProcessorPil().save_pretrained(path)
    return path


def build_clip_tokenizer():
    """A CLIP tokenizer whose vocabulary is the byte alphabet (no merges: one token per
    character), which is enough for a random model."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocabulary = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(f"{c}</w>" for c in alphabet)]
    return CLIPTokenizer(vocab={token: index for index, token in enumerate(vocabulary)}, merges=[])


def write_clip_snapshot(path: Path, seed: int = 0) -> Path:
    """A random CLIP (one text and one vision layer of width 32, 32x32 images)."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    tokenizer = build_clip_tokenizer()
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": TINY_CLIP_IMAGE,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessorPil(
        size={"shortest_edge": TINY_CLIP_IMAGE},
        crop_size={"height": TINY_CLIP_IMAGE, "width": TINY_CLIP_IMAGE},
    ).save_pretrained(path)
    return path
