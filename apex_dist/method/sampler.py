"""Samplers (method.md section 7): the student's few-step sampler and the teacher's Euler+CFG.

Student grid: 1 - linspace(0.001, 1 - g, N) then 0 for N >= 2 (the released code's grid),
[ONE_STEP_TIME, 0] = [1, 0] at one step (the time the e2e rows train at); each step jumps to
data with x_hat = x - t_i * F(x, t_i, 0, c) and re-noises to t_{i+1} with
x = (1 - t_{i+1}) * x_hat + t_{i+1} * (sqrt(1 - s) * z_hat + sqrt(s) * eps).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

from apex_dist.data.batch import ImageShape
from apex_dist.method.flow import check_times, data_estimate, noise_estimate, per_row
from apex_dist.method.objectives import with_image_shape

# First grid time of multi-step sampling: just below pure noise (released code).
GRID_START_OFFSET = 0.001
# The one-step generator's time: x = z - F(z, 1, 0, c), the time the e2e rows train at, and the
# first sigma of stock diffusers and ComfyUI at one step (docs/generate.md). Exports fold E2 for
# this time (apex_dist.models.conditioning.fold_one_step_time).
ONE_STEP_TIME = 1.0
# Default last noise level g of the grid for each step count (method.md section 7).
DEFAULT_GAP = {1: 0.0, 2: 0.6, 4: 0.5}
FALLBACK_GAP = 0.5


def timestep_grid(nfe: int, gap: Optional[float] = None) -> list[float]:
    """[1 - linspace(0.001, 1 - g, N)..., 0]: [1, 0] at 1 NFE, [0.999, 0.6, 0] at 2."""
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1 (got {nfe})")
    if gap is None:
        gap = DEFAULT_GAP.get(nfe, FALLBACK_GAP)
    if not 0 <= gap < 1 - GRID_START_OFFSET:
        raise ValueError(f"gap must be in [0, {1 - GRID_START_OFFSET}) (got {gap})")
    times = 1 - torch.linspace(GRID_START_OFFSET, 1 - gap, nfe, dtype=torch.float64)
    grid = [float(value) for value in times] + [0.0]
    if nfe == 1:
        grid = [ONE_STEP_TIME, 0.0]
    return grid


# One generator for the whole batch, or one per row (each row's noise then depends only on it).
Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def fresh_noise(like: Tensor, generator: Generators = None) -> Tensor:
    """Standard normal noise with the shape, device and dtype of `like`.

    None draws on `like`'s device; one generator draws the whole tensor on its own device
    (a CPU generator also serves CUDA latents); a list of generators draws row i from generator
    i, so that a row does not depend on the other rows of the batch (how `apex-generate` makes
    an image depend only on its seed).
    """
    if generator is None:
        return torch.randn(like.shape, device=like.device, dtype=like.dtype)
    if isinstance(generator, torch.Generator):
        noise = torch.randn(
            like.shape, generator=generator, device=generator.device, dtype=like.dtype
        )
        return noise.to(like.device)
    if len(generator) != like.shape[0]:
        raise ValueError(f"{len(generator)} generators for {like.shape[0]} rows: give one per row")
    rows = [
        torch.randn(like.shape[1:], generator=row, device=row.device, dtype=like.dtype)
        for row in generator
    ]
    return torch.stack(rows).to(like.device)


def _rows(value: float, like: Tensor) -> Tensor:
    return torch.full((like.shape[0],), value, device=like.device, dtype=torch.float32)


@torch.no_grad()
def sample(
    model,
    noise: Tensor,
    text: Tensor,
    text_mask: Tensor,
    nfe: int = 1,
    stochastic_ratio: float = 1.0,
    gap: Optional[float] = None,
    generator: Generators = None,
    image_shape: Optional[ImageShape] = None,
) -> Tensor:
    """Few-step (1, 2, 4, ... NFE) sampling of a distilled model, without CFG.

    Args:
        model: velocity model, ``model(x, t, tt, text, text_mask, fake_rows)``.
        noise: (B, ...) Gaussian noise, the starting point.
        text, text_mask: (B, S, D) features and (B, S) mask.
        nfe: number of network evaluations.
        stochastic_ratio: s, the share of fresh noise when re-noising (1: all fresh).
        gap: last noise level g of the grid (default per nfe: 2 -> 0.6, 4 -> 0.5).
        generator: random generator for the fresh noise, or one per row (`fresh_noise`).
        image_shape: (frames, h, w) token grid passed to every model call (Qwen-Image); None
            for models without images.
    """
    if not 0 <= stochastic_ratio <= 1:
        raise ValueError(f"stochastic_ratio must be in [0, 1] (got {stochastic_ratio})")
    grid = timestep_grid(nfe, gap)
    model = with_image_shape(model, image_shape)
    fake_rows = torch.zeros(noise.shape[0], dtype=torch.bool, device=noise.device)
    x = noise.float()
    for time, next_time in itertools.pairwise(grid):
        t = _rows(time, x)
        velocity = model(x, t, torch.zeros_like(t), text, text_mask, fake_rows).float()
        x_hat = data_estimate(x, t, velocity)
        if next_time == 0.0:
            return x_hat
        z_hat = noise_estimate(x, t, velocity)
        fresh = fresh_noise(x, generator)
        mixed_noise = (1 - stochastic_ratio) ** 0.5 * z_hat + stochastic_ratio**0.5 * fresh
        x = (1 - next_time) * x_hat + next_time * mixed_noise
    return x


@torch.no_grad()
def sample_euler(
    model,
    noise: Tensor,
    text: Tensor,
    text_mask: Tensor,
    steps: int = 50,
    guidance_scale: float = 1.0,
    neg_text: Optional[Tensor] = None,
    neg_text_mask: Optional[Tensor] = None,
    times: Optional[Tensor] = None,
    image_shape: Optional[ImageShape] = None,
) -> Tensor:
    """The teacher's ordinary Euler sampler from t = 1 to 0, with classifier-free guidance.

    F = F(x, t, t, c_neg) + g * (F(x, t, t, c) - F(x, t, t, c_neg)) when g != 1 (needs
    neg_text, the negative prompt's embedding, (1 or B, S', D)); x <- x - (t_i - t_{i+1}) * F.
    `image_shape` is passed to every model call, as in `sample`.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")
    if times is None:
        times = torch.linspace(1.0, 0.0, steps + 1)
    check_times(times.float(), "sample_euler times")
    guided = guidance_scale != 1.0
    if guided and (neg_text is None or neg_text_mask is None):
        raise ValueError("guidance_scale != 1 needs neg_text and neg_text_mask")
    model = with_image_shape(model, image_shape)
    rows = noise.shape[0]
    fake_rows = torch.zeros(rows, dtype=torch.bool, device=noise.device)
    if guided:
        neg_text = neg_text.expand(rows, -1, -1)
        neg_text_mask = neg_text_mask.expand(rows, -1)
    x = noise.float()
    for time, next_time in itertools.pairwise(times.tolist()):
        t = _rows(time, x)
        velocity = model(x, t, t, text, text_mask, fake_rows).float()
        if guided:
            unconditional = model(x, t, t, neg_text, neg_text_mask, fake_rows).float()
            velocity = unconditional + guidance_scale * (velocity - unconditional)
        x = x - per_row(t - next_time, x) * velocity
    return x
