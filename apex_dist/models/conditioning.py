"""The two additions APEX makes to a pretrained flow model (method.md sections 1 and 2).

- `DualTimeEmbedding`: a second time embedding E2, a copy of the pretrained E1, combined as
  temb = E1(t) + E2(tt) * (t - tt). At tt = t the model is exactly the pretrained one.
- `ConditionShift`: c_fake = a*c + b on the text tokens of the rows flagged fake, applied after
  the model's text input projection (a shift before an RMSNorm would be normalised away).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

# Qwen-Image feeds t in [0, 1] to a sinusoidal embedding of 1000 * t.
TIME_EMBEDDING_SCALE = 1000.0
# Lowest frequency period of the sinusoidal embedding, as in DDPM/DiT-style embedders.
MAX_PERIOD = 10000.0


def sinusoidal_embedding(t: Tensor, dim: int, scale: float = TIME_EMBEDDING_SCALE) -> Tensor:
    """(B,) times -> (B, dim) [cos | sin] features of scale*t; signed t stays distinguishable."""
    half = dim // 2
    exponent = (
        -math.log(MAX_PERIOD) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )
    angles = scale * t.float()[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class DualTimeEmbedding(nn.Module):
    """temb = E1(t) + E2(tt) * (t - tt), with E2 initialised as a copy of E1.

    Args:
        embedder: the pretrained time embedder E1, a module mapping (B,) times to (B, D).
    """

    def __init__(self, embedder: nn.Module):
        super().__init__()
        self.primary = embedder
        self.target = copy.deepcopy(embedder)

    def forward(self, t: Tensor, target_time: Tensor) -> Tensor:
        base = self.primary(t)
        gap = (t - target_time).to(base.dtype)
        return base + self.target(target_time) * gap[:, None]


class ConditionShift(nn.Module):
    """c_fake = scale * c + bias on the rows flagged fake; other rows pass unchanged.

    Args:
        scale: a of Eq. 9 (paper's best -0.5).
        bias: b of Eq. 9 (paper's best 1.0).
        learnable: make a and b trainable parameters instead of constants.
    """

    def __init__(self, scale: float = -0.5, bias: float = 1.0, learnable: bool = False):
        super().__init__()
        scale_tensor = torch.tensor(float(scale))
        bias_tensor = torch.tensor(float(bias))
        if learnable:
            self.scale = nn.Parameter(scale_tensor)
            self.bias = nn.Parameter(bias_tensor)
        else:
            self.register_buffer("scale", scale_tensor)
            self.register_buffer("bias", bias_tensor)

    def forward(self, text: Tensor, fake_rows: Tensor | None) -> Tensor:
        """text (B, S, D), fake_rows (B,) bool -> text with fake rows shifted."""
        if fake_rows is None:
            return text
        shifted = self.scale.to(text.dtype) * text + self.bias.to(text.dtype)
        return torch.where(fake_rows.reshape(-1, *([1] * (text.dim() - 1))), shifted, text)
