"""The two additions APEX makes to a pretrained flow model (method.md sections 1 and 2).

- A second time embedding E2 next to the pretrained E1, combined as
  temb = E1(t) + E2(tt) * (t - tt) (`combine_time_embeddings`). Every backbone names them
  `time_text_embed` (E1, diffusers' name) and `time_text_embed_2` (E2, the name of the method's
  released code) and builds E2 as a module of its own; `init_apex_weights` then sets E2 to E1,
  so at tt = t the model is exactly the pretrained one.
- `ConditionShift`: c_fake = a*c + b on the text tokens of the rows flagged fake, applied after
  the model's text input projection (a shift before an RMSNorm would be normalised away).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Optional

import torch
from torch import Tensor, nn

from apex_dist.config import ConditionShiftConfig

# Qwen-Image feeds t in [0, 1] to a sinusoidal embedding of 1000 * t.
TIME_EMBEDDING_SCALE = 1000.0
# Lowest frequency period of the sinusoidal embedding, as in DDPM/DiT-style embedders.
MAX_PERIOD = 10000.0
# Module names of E1 and E2 in every backbone (see the module doc).
PRIMARY_TIME_EMBEDDING = "time_text_embed"
TARGET_TIME_EMBEDDING = "time_text_embed_2"
# State-dict prefixes of the APEX additions: the only keys a pretrained checkpoint lacks.
APEX_STATE_PREFIXES = (f"{TARGET_TIME_EMBEDDING}.", "condition_shift.")
# The condition shift's defaults have one source: the config schema (YAML `method.condition_shift`).
DEFAULT_CONDITION_SHIFT = ConditionShiftConfig()

ParameterContext = Callable[[nn.Parameter], AbstractContextManager]


def is_apex_key(key: str) -> bool:
    """True for state-dict keys of the APEX additions (E2, the condition shift)."""
    return key.startswith(APEX_STATE_PREFIXES)


def sinusoidal_embedding(t: Tensor, dim: int, scale: float = TIME_EMBEDDING_SCALE) -> Tensor:
    """(B,) times -> (B, dim) [cos | sin] features of scale*t; signed t stays distinguishable."""
    half = dim // 2
    exponent = (
        -math.log(MAX_PERIOD) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )
    angles = scale * t.float()[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def combine_time_embeddings(
    primary: Tensor, target: Tensor, t: Tensor, target_time: Tensor
) -> Tensor:
    """temb = E1(t) + E2(tt) * (t - tt): primary = E1(t) and target = E2(tt), each (B, D).

    The gap is taken in fp32 and cast to the embeddings' dtype, so it is exactly 0 where
    tt = t and the model is then the pretrained one.
    """
    gap = (t.float() - target_time.float()).to(primary.dtype)  # (B,)
    return primary + target * gap[:, None]


@contextlib.contextmanager
def _fill_everywhere(parameter: nn.Parameter) -> Iterator[bool]:
    del parameter
    yield True


@torch.no_grad()
def init_apex_weights(model: nn.Module, parameter_context: Optional[ParameterContext] = None):
    """E2 <- E1: the one place where the second time embedding gets its starting value.

    Runs once per model, after construction (random weights) or after loading a snapshot
    that has no E2. Parameters are copied one pair at a time, each inside
    `parameter_context(parameter)` (a context manager whose value says whether this process
    writes the parameter; ZeRO-3 passes one that gathers the partitioned parameter and
    broadcasts what rank 0 wrote), so memory stays near one full tensor. Parameters on the
    meta device hold no values and are left alone (the loader materialises them first).

    Raises:
        ValueError: the model lacks E1 or E2, or their parameters differ in names or shapes.
    """
    context = parameter_context or _fill_everywhere
    try:
        primary = dict(model.get_submodule(PRIMARY_TIME_EMBEDDING).named_parameters())
        target = dict(model.get_submodule(TARGET_TIME_EMBEDDING).named_parameters())
    except AttributeError as error:
        raise ValueError(
            f"{type(model).__name__} has no {PRIMARY_TIME_EMBEDDING} (E1) and "
            f"{TARGET_TIME_EMBEDDING} (E2) modules: every APEX backbone builds both "
            f"(apex_dist.models.conditioning) ({error})"
        ) from None
    shapes = {
        name: tuple(getattr(parameter, "ds_shape", parameter.shape))
        for name, parameter in primary.items()
    }
    target_shapes = {
        name: tuple(getattr(parameter, "ds_shape", parameter.shape))
        for name, parameter in target.items()
    }
    if shapes != target_shapes:
        raise ValueError(
            f"{TARGET_TIME_EMBEDDING} must have the parameters of {PRIMARY_TIME_EMBEDDING} "
            f"(E2 starts as a copy of E1): E1 {shapes}, E2 {target_shapes}"
        )
    for name, source in primary.items():
        destination = target[name]
        if source.device.type == "meta" or destination.device.type == "meta":
            continue
        with context(source):
            value = source.data.detach().clone()  # one tensor, held between the two gathers
        with context(destination) as fill_here:
            if fill_here:
                destination.data.copy_(value)


class ConditionShift(nn.Module):
    """c_fake = scale * c + bias on the rows flagged fake; other rows pass unchanged.

    The two values are created where tensors are created by default (the device context, or
    zero.Init's device), except on the meta device: there they are created on the CPU, so that
    a model built on meta keeps them (they come from the config, never from a snapshot).

    Args:
        scale: a of Eq. 9 (default: `method.condition_shift.scale` of the config schema).
        bias: b of Eq. 9 (default: `method.condition_shift.bias`).
        learnable: make a and b trainable parameters (of shape (1,)) instead of constants.
    """

    def __init__(
        self,
        scale: float = DEFAULT_CONDITION_SHIFT.scale,
        bias: float = DEFAULT_CONDITION_SHIFT.bias,
        learnable: bool = DEFAULT_CONDITION_SHIFT.learnable,
    ):
        super().__init__()
        on_meta = torch.empty(0).device.type == "meta"  # where the current context creates
        device = torch.device("cpu") if on_meta else None
        scale_tensor = torch.tensor(float(scale), device=device)
        bias_tensor = torch.tensor(float(bias), device=device)
        if learnable:
            # one-element vectors, not 0-dim: DeepSpeed's start-up broadcast views every
            # parameter as bytes, which a 0-dim tensor cannot be
            self.scale = nn.Parameter(scale_tensor.reshape(1))
            self.bias = nn.Parameter(bias_tensor.reshape(1))
        else:
            self.register_buffer("scale", scale_tensor)
            self.register_buffer("bias", bias_tensor)

    def forward(self, text: Tensor, fake_rows: Tensor | None) -> Tensor:
        """text (B, S, D), fake_rows (B,) bool -> text with fake rows shifted."""
        if fake_rows is None:
            return text
        shifted = self.scale.to(text.dtype) * text + self.bias.to(text.dtype)
        return torch.where(fake_rows.reshape(-1, *([1] * (text.dim() - 1))), shifted, text)
