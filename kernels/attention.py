"""One attention entry point for every model in apex_dist.

The reference path is PyTorch's scaled_dot_product_attention; faster backends (flash-attn,
cuDNN) plug in behind the same signature.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def attention(
    query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None
) -> Tensor:
    """Softmax attention over (B, heads, L, head_dim) tensors.

    key_padding_mask: optional (B, L_key) bool, True where a key is a real token; None means
    no padding, which keeps the fused kernels usable.
    """
    if query.dim() != 4 or key.shape != value.shape or query.shape[:2] != key.shape[:2]:
        raise ValueError(
            "attention expects (batch, heads, tokens, head_dim) tensors with matching batch and "
            f"heads; got query {tuple(query.shape)}, key {tuple(key.shape)}, "
            f"value {tuple(value.shape)}"
        )
    mask = None
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (key.shape[0], key.shape[2]):
            raise ValueError(
                f"key_padding_mask {tuple(key_padding_mask.shape)} must be (batch, key tokens) = "
                f"({key.shape[0]}, {key.shape[2]})"
            )
        mask = key_padding_mask[:, None, None, :].to(torch.bool)
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask)
