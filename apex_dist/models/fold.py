"""The one-step fold: a student's second time embedding E2 written into E1's last bias.

At one step the student evaluates F(z, t*, 0, c), whose time embedding is
temb = E1(t*) + E2(0) * t* (`conditioning.combine_time_embeddings` at tt = 0). E2(0) is a
constant vector (E2's MLP applied to the features of time 0), so adding
d = t* * E2(0) to the bias of E1's last linear layer gives an ordinary transformer without E2
whose output at time t* is the student's one-step output. Stock clients (diffusers, ComfyUI)
run such a transformer unchanged; at any other time the folded model is off by
(t - t*) * E2(0), which `unfold_offset` puts back (the project's multi-step pipeline does).

The fold is exact only at t*, so a folded export is a one-step artefact; exports carry E2
alongside (apex_extra_weights.safetensors) so that apex_dist and the multi-step pipeline undo it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from apex_dist.models.conditioning import PRIMARY_TIME_EMBEDDING, TARGET_TIME_EMBEDDING
from apex_dist.models.qwen_image import TIMESTEP_FEATURES, TimeEmbedding

# The bias the fold changes (diffusers' and apex_dist's name; ComfyUI's Qwen-Image uses the
# same module path under its `diffusion_model.` prefix).
FOLD_MODULE = f"{PRIMARY_TIME_EMBEDDING}.timestep_embedder.linear_2"
FOLD_BIAS_KEY = f"{FOLD_MODULE}.bias"
# E2's tensors, relative to the model.
E2_PREFIX = f"{TARGET_TIME_EMBEDDING}."
E2_KEYS = tuple(
    f"{E2_PREFIX}timestep_embedder.{layer}.{kind}"
    for layer in ("linear_1", "linear_2")
    for kind in ("weight", "bias")
)
# export_info.json entry of a folded export: {"time": t*, "bias_key": FOLD_BIAS_KEY}.
FOLD_INFO_KEY = "one_step_fold"


def target_embedding_at_zero(state: Mapping[str, Tensor]) -> Tensor:
    """E2(0), (D,) in fp32, from E2's four tensors (model keys `time_text_embed_2.*`).

    Raises:
        KeyError: a tensor of E2 is missing (the message names it).
    """
    missing = [key for key in E2_KEYS if key not in state]
    if missing:
        raise KeyError(
            f"the one-step fold needs E2's tensors; missing {', '.join(missing)} (a student "
            "checkpoint or export always has them: was this exported from a base model?)"
        )
    first = state[E2_KEYS[0]]
    if first.shape[1] != TIMESTEP_FEATURES:
        raise ValueError(
            f"{E2_KEYS[0]} has shape {tuple(first.shape)}; the time embedding takes "
            f"{TIMESTEP_FEATURES} features"
        )
    embedding = TimeEmbedding(first.shape[0])
    embedding.load_state_dict(
        {key[len(E2_PREFIX) :]: state[key].detach().float().cpu() for key in E2_KEYS}
    )
    with torch.no_grad():
        return embedding(torch.zeros(1), torch.float32)[0]


def fold_offset(state: Mapping[str, Tensor], time: float) -> Tensor:
    """d = time * E2(0): what the fold adds to `FOLD_BIAS_KEY` (fp32, (D,))."""
    return time * target_embedding_at_zero(state)


def unfold_offset(state: Mapping[str, Tensor], fold_time: float, time: float) -> Tensor:
    """(time - fold_time) * E2(0): added to a folded model's time embedding at `time`, it gives
    the student's F(x, time, 0, c) exactly."""
    return (time - fold_time) * target_embedding_at_zero(state)
