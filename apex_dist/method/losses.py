"""Per-row losses (method.md section 4, step 6). Each returns one value per row, shape (B,)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

LossFunction = Callable[[Tensor, Tensor], Tensor]


def squared_error(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean squared error of each row over all its other dimensions, shape (B,)."""
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape"
        )
    difference = (prediction.float() - target.float()).flatten(1)
    return difference.square().mean(dim=1)


def l2_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """Plain l2: the per-row mean squared error."""
    return squared_error(prediction, target)


def robust_loss(prediction: Tensor, target: Tensor, scale: float = 1e-3) -> Tensor:
    """mse * stopgrad((mse/c^2 + 1)^(-1/2)) / c: its gradient is normalised per row.

    For mse >> c^2 the weight is about c / rmse, so every row contributes a gradient of about
    the same norm whatever its error; for mse << c^2 it is plain l2 scaled by 1/c.
    """
    mse = squared_error(prediction, target)
    weight = (mse.detach() / scale**2 + 1).rsqrt()
    return mse * weight / scale


def build_loss(kind: str, robust_scale: float = 1e-3) -> LossFunction:
    if kind == "l2":
        return l2_loss
    if kind == "robust":
        return lambda prediction, target: robust_loss(prediction, target, robust_scale)
    raise ValueError(f"method.loss.kind must be 'robust' or 'l2' (got {kind!r})")


def clamp_symmetric(values: Tensor, bound: float) -> Tensor:
    return values.clamp(-bound, bound)
