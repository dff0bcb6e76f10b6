"""Shadow weights kept on each rank's own partition: the EMA, or the frozen starting weights.

Under ZeRO-3 every rank holds a flat 1-D slice of each parameter (`param.ds_tensor`); the
shadow of a parameter is an fp32 tensor of exactly that slice, so an EMA of a 20B model costs
each rank 4 bytes per locally held element and is never gathered. Under ZeRO-2 the parameters
are whole on every rank and so is the shadow (saved by rank 0 only).

To run the model with the shadow weights (the `ema` reference, or `frozen_base` for full
fine-tuning), `swapped_in()` copies the shadow into the local slices, lets ZeRO gather them
layer by layer as for any forward, and copies the training weights back afterwards, bit for
bit. Gathered parameters are released before and after, so no stale gathered copy mixes the
two sets of weights.

On disk (the checkpoint converter reads it): `<tag>/ema_rank_<rank:05d>.pt` (or
`frozen_rank_...` for the frozen copy) = {"format": "apex_dist.ema/1", "zero_stage",
"world_size", "tensors": {parameter name: tensor}, "decay": the current warmed-up decay}.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Optional

import torch
from torch import Tensor, nn

from apex_dist.checkpoint_layout import SHADOW_FORMAT
from apex_dist.method.reference import ema_update_, warmed_up_decay


def local_tensor(parameter: nn.Parameter) -> Tensor:
    """This rank's part of a parameter: the flat ZeRO-3 slice, or the whole tensor."""
    return parameter.ds_tensor if hasattr(parameter, "ds_tensor") else parameter.data


class ShadowWeights:
    """fp32 copies of this rank's part of the trainable parameters.

    Args:
        parameters: name -> parameter (module names, without any DeepSpeed prefix), in the
            same order on every rank.
        zero_stage: the ZeRO stage (saved alongside, for the converter).
        world_size: number of ranks (saved alongside).
        rank: this rank.
        target_decay: EMA decay reached by the warm-up d <- d + (1-d)(d_target - d)/2; None
            for a frozen copy that never changes.
    """

    def __init__(
        self,
        parameters: dict[str, nn.Parameter],
        zero_stage: int,
        world_size: int,
        rank: int,
        target_decay: Optional[float],
    ):
        if target_decay is not None and not 0 < target_decay < 1:
            raise ValueError(f"method.reference.ema_decay must be in (0, 1) (got {target_decay})")
        self.parameters = dict(parameters)
        self.zero_stage = zero_stage
        self.world_size = world_size
        self.rank = rank
        self.target_decay = target_decay
        self.decay = 0.0
        self.tensors = {
            name: local_tensor(parameter).detach().float().clone()
            for name, parameter in self.parameters.items()
        }

    @property
    def frozen(self) -> bool:
        return self.target_decay is None

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step on the local slices (nothing for a frozen copy)."""
        if self.frozen:
            return
        self.decay = warmed_up_decay(self.decay, self.target_decay)
        ema_update_(
            self.tensors.values(),
            (local_tensor(parameter) for parameter in self.parameters.values()),
            self.decay,
        )

    @contextlib.contextmanager
    def swapped_in(self, release_gathered: Callable[[], None]) -> Iterator[None]:
        """Inside, the model computes with the shadow weights; the training weights come back
        bit for bit on exit. `release_gathered` frees every gathered ZeRO-3 parameter."""
        release_gathered()
        saved = {}
        with torch.no_grad():
            for name, parameter in self.parameters.items():
                local = local_tensor(parameter)
                saved[name] = local.clone()
                local.copy_(self.tensors[name])
        try:
            yield
        finally:
            release_gathered()
            with torch.no_grad():
                for name, parameter in self.parameters.items():
                    local_tensor(parameter).copy_(saved[name])

    def state_dict(self) -> dict:
        return {
            "format": SHADOW_FORMAT,
            "zero_stage": self.zero_stage,
            "world_size": self.world_size,
            "tensors": {name: tensor.clone() for name, tensor in self.tensors.items()},
            "decay": self.decay,
        }

    def load_state_dict(self, state: dict, source: str = "the checkpoint") -> None:
        """Restore from `state_dict()`; every name and shape must match this rank's slices."""
        if state.get("format") != SHADOW_FORMAT:
            raise ValueError(
                f"{source}: format {state.get('format')!r} is not {SHADOW_FORMAT!r}; this file "
                "was not written by apex_dist's engine"
            )
        if state["world_size"] != self.world_size or state["zero_stage"] != self.zero_stage:
            raise ValueError(
                f"{source}: shadow weights saved with world size {state['world_size']} and "
                f"ZeRO stage {state['zero_stage']}, but this run has {self.world_size} and "
                f"{self.zero_stage}; partition-local weights only resume on the same layout"
            )
        tensors = state["tensors"]
        missing = sorted(set(self.tensors) - set(tensors))
        unexpected = sorted(set(tensors) - set(self.tensors))
        wrong = [
            f"{name} {tuple(tensors[name].shape)} != {tuple(mine.shape)}"
            for name, mine in self.tensors.items()
            if name in tensors and tensors[name].shape != mine.shape
        ]
        if missing or unexpected or wrong:
            raise ValueError(
                f"{source}: shadow weights do not fit this model: missing {missing}, "
                f"unexpected {unexpected}, shape mismatches {wrong}"
            )
        for name, tensor in tensors.items():
            self.tensors[name].copy_(tensor)
        self.decay = float(state.get("decay", 0.0))
