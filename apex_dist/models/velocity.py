"""The velocity-model interface over a transformer module, for the engine and for sampling
outside training (`apex_dist.generate`): no DeepSpeed import."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor


class VelocityModelAdapter:
    """The velocity-model interface over the training module.

    Casts floating inputs to the model's compute dtype, passes `image_shape` (Qwen-Image's
    keyword; the objectives and samplers give the batch's) when one is given, and returns
    float32. `forward` is the DeepSpeed engine for the student (its forward hooks drive ZeRO's
    backward) or the bare module for references; `context` wraps every call (adapters switched
    off, shadow weights swapped in).
    """

    def __init__(
        self,
        forward: Callable[..., Tensor],
        dtype: torch.dtype,
        context: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
    ):
        self.forward = forward
        self.dtype = dtype
        self.context = context

    def __call__(
        self, x_t, t, target_time, text, text_mask, fake_rows=None, image_shape=None
    ) -> Tensor:
        named = {} if image_shape is None else {"image_shape": image_shape}
        scope = self.context() if self.context is not None else contextlib.nullcontext()
        with scope:
            velocity = self.forward(
                x_t.to(self.dtype),
                t,
                target_time,
                text.to(self.dtype),
                text_mask,
                fake_rows,
                **named,
            )
        return velocity.float()
