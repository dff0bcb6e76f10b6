"""The APEX method as pure tensor code: no DeepSpeed, no I/O.

from apex_dist.method import build_objective, sample
objective = build_objective(method_config)              # MethodConfig or dict
loss, metrics = objective(model, batch, reference=None)  # None: the model itself
images = sample(model, noise, text, text_mask, nfe=1)
"""

from apex_dist.method.flow import (
    check_times,
    data_estimate,
    interpolate,
    noise_estimate,
    sample_time,
    velocity_target,
)
from apex_dist.method.losses import build_loss, l2_loss, robust_loss
from apex_dist.method.objectives import (
    Apex,
    ApexV0,
    FlowMatching,
    NonFiniteLossError,
    Objective,
    build_objective,
)
from apex_dist.method.reference import EmaReference, FrozenReference, build_reference, ema_update_
from apex_dist.method.sampler import sample, sample_euler, timestep_grid

__all__ = [
    "Apex",
    "ApexV0",
    "EmaReference",
    "FlowMatching",
    "FrozenReference",
    "NonFiniteLossError",
    "Objective",
    "build_loss",
    "build_objective",
    "build_reference",
    "check_times",
    "data_estimate",
    "ema_update_",
    "interpolate",
    "l2_loss",
    "noise_estimate",
    "robust_loss",
    "sample",
    "sample_euler",
    "sample_time",
    "timestep_grid",
    "velocity_target",
]
