"""Reference-model modes (method.md section 6): online, frozen_base, ema.

The reference serves the objectives' no-grad auxiliary passes. `online` is the student itself
(no copy; the objectives take reference=None). `frozen_base` is the starting weights, frozen:
for LoRA models the base with adapters disabled (free), otherwise a frozen copy. `ema` is an
exponential moving average of the trainable weights whose decay warms up as
d <- d + (1 - d) * (d_target - d) / 2 per step. `ema_update_` works on any lists of matching
tensors, so the engine can apply it to each rank's own ZeRO partition without gathering.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Optional

import torch
from torch import Tensor, nn


def warmed_up_decay(decay: float, target_decay: float) -> float:
    """One warm-up step of the EMA decay: d + (1 - d) * (d_target - d) / 2."""
    return decay + (1 - decay) * (target_decay - decay) / 2


@torch.no_grad()
def ema_update_(averages: Iterable[Tensor], values: Iterable[Tensor], decay: float) -> None:
    """average <- decay * average + (1 - decay) * value, in place, tensor by tensor."""
    averages, values = list(averages), list(values)
    if len(averages) != len(values):
        raise ValueError(f"EMA has {len(averages)} tensors but the model has {len(values)}")
    for average, value in zip(averages, values, strict=True):
        average.lerp_(value.detach().to(average.dtype), 1.0 - decay)


class FrozenReference(nn.Module):
    """A frozen copy of the model at construction time (frozen_base without LoRA)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model).requires_grad_(False).eval()

    def forward(self, *inputs, **named):
        return self.model(*inputs, **named)

    def update(self, model: nn.Module) -> None:  # the frozen base never changes
        del model


class EmaReference(FrozenReference):
    """An EMA copy of the model's trainable parameters with a warmed-up decay."""

    def __init__(self, model: nn.Module, target_decay: float):
        super().__init__(model)
        if not 0 < target_decay < 1:
            raise ValueError(f"method.reference.ema_decay must be in (0, 1) (got {target_decay})")
        self.target_decay = target_decay
        self.decay = 0.0
        self.names = [
            name for name, parameter in model.named_parameters() if parameter.requires_grad
        ]

    def update(self, model: nn.Module) -> None:
        """Advance the decay one warm-up step and average the trainable parameters."""
        self.decay = warmed_up_decay(self.decay, self.target_decay)
        current = dict(model.named_parameters())
        averages = dict(self.model.named_parameters())
        ema_update_(
            (averages[name] for name in self.names),
            (current[name] for name in self.names),
            self.decay,
        )

    def state_dict(self, *args, **named):
        state = super().state_dict(*args, **named)
        state["ema_decay_current"] = torch.tensor(self.decay, dtype=torch.float64)
        return state

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        state = dict(state)
        self.decay = float(state.pop("ema_decay_current", self.decay))
        return super().load_state_dict(state, strict=strict, assign=assign)


def build_reference(mode: str, model: nn.Module, ema_decay: float = 0.999) -> Optional[nn.Module]:
    """None for online (the model itself), else a FrozenReference or EmaReference."""
    if mode == "online":
        return None
    if mode == "frozen_base":
        return FrozenReference(model)
    if mode == "ema":
        return EmaReference(model, ema_decay)
    raise ValueError(f"method.reference.mode must be online, frozen_base or ema (got {mode!r})")
