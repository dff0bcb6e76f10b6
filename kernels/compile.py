"""torch.compile of transformer blocks, switched on by `model.kernels.compile_blocks`.

Compiling block by block (not the whole model) keeps compile time to one block's graph, shared
by all blocks of the same shape, and leaves activation checkpointing, which runs outside the
blocks, unchanged.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def compile_blocks(model: nn.Module, attribute: str = "transformer_blocks", **options: Any) -> int:
    """Compile every module of `model.<attribute>` in place; return how many were compiled.

    Args:
        model: a model with a ModuleList of blocks (Qwen-Image: `transformer_blocks`).
        attribute: name of that ModuleList.
        options: passed to `nn.Module.compile` (for example backend="inductor", mode=...).
    """
    blocks = getattr(model, attribute, None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(
            f"compile_blocks: {type(model).__name__}.{attribute} is not an nn.ModuleList of "
            "blocks; pass attribute= the name of the model's block list"
        )
    for block in blocks:
        block.compile(**options)
    return len(blocks)
