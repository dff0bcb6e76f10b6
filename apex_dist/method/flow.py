"""Flow-matching conventions shared by every objective and sampler (method.md section 1).

t = 1 is pure noise, t = 0 is data: x_t = t*z + (1 - t)*x, velocity target v = z - x.
The network F(x_t, t, tt, c) predicts the mean velocity from t to tt: x_tt = x_t - (t - tt)*F.
"""

from __future__ import annotations

import torch
from torch import Tensor


def per_row(values: Tensor, like: Tensor) -> Tensor:
    """Reshape a (B,) tensor so that it broadcasts over the rows of `like` (B, ...)."""
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)


def interpolate(data: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = t*z + (1 - t)*x (Eq. 1); t has shape (B,)."""
    t = per_row(t, data)
    return t * noise + (1 - t) * data


def velocity_target(data: Tensor, noise: Tensor) -> Tensor:
    """v = z - x, the flow-matching target (Eq. 4)."""
    return noise - data


def data_estimate(x_t: Tensor, t: Tensor, velocity: Tensor) -> Tensor:
    """x_hat = x_t - t*F: the data endpoint implied by a prediction at time t."""
    return x_t - per_row(t, x_t) * velocity


def noise_estimate(x_t: Tensor, t: Tensor, velocity: Tensor) -> Tensor:
    """z_hat = x_t + (1 - t)*F: the noise endpoint implied by a prediction at time t."""
    return x_t + (1 - per_row(t, x_t)) * velocity


def step_to(x_t: Tensor, t: Tensor, target_time: Tensor, velocity: Tensor) -> Tensor:
    """x_tt = x_t - (t - tt)*F: move along a mean-velocity prediction from t to tt."""
    return x_t - per_row(t - target_time, x_t) * velocity


def sample_time(
    batch_size: int,
    beta_p: float = 1.0,
    beta_q: float = 1.0,
    scale: float = 1.0,
    device: torch.device | str = "cpu",
) -> Tensor:
    """t ~ Beta(p, q) * scale, shape (B,), float32 (method.md section 5)."""
    if not (beta_p > 0 and beta_q > 0):
        raise ValueError(f"time sampling needs Beta shapes > 0 (got p={beta_p}, q={beta_q})")
    if not 0 < scale <= 1:
        raise ValueError(f"time sampling scale must be in (0, 1] (got {scale}): t lives in [0, 1]")
    if beta_p == 1.0 and beta_q == 1.0:
        t = torch.rand(batch_size, device=device)
    else:
        concentration = torch.tensor([beta_p, beta_q], device=device)
        t = torch.distributions.Beta(concentration[0], concentration[1]).sample((batch_size,))
    return t * scale


def check_times(t: Tensor, name: str, allow_negative: bool = False) -> None:
    """Raise ValueError when a time tensor leaves [0, 1] (or [-1, 1] for flagged fake rows)."""
    low = -1.0 if allow_negative else 0.0
    if t.dim() != 1:
        raise ValueError(f"{name} must have shape (batch,), got {tuple(t.shape)}")
    if not torch.isfinite(t).all() or (t < low).any() or (t > 1).any():
        bad = t[~torch.isfinite(t) | (t < low) | (t > 1)]
        raise ValueError(
            f"{name} must lie in [{low:g}, 1] (t = 1 is noise, t = 0 is data); "
            f"found {bad[:4].tolist()}"
        )
