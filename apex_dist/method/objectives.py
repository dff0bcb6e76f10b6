"""Training objectives: `fm`, `apex` (the paper) and `apex_v0` (the released code).

Each objective is called as ``loss, metrics = objective(model, batch, reference=None)`` where
`batch` is a `TrainBatch` (apex_dist.data.batch; a dict with its field names is accepted too),
`model` follows the velocity-model interface ``model(x_t, t, tt, text, text_mask, fake_rows)``
(plus ``image_shape=batch.image_shape`` when the batch has one) and `reference` (None: the
model itself) serves the no-grad auxiliary passes. Objectives are pure tensor code: they never
step an optimizer and never touch DeepSpeed. Loss arithmetic is done in float32 whatever the
model's dtype. Equation numbers are the paper's
(arXiv 2604.12322); section numbers refer to ../shared/design/method.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, Optional, Union

import torch
from torch import Tensor

from apex_dist.config import ApexConfig, ApexV0Config, MethodConfig
from apex_dist.data.batch import ImageShape, TrainBatch, as_train_batch
from apex_dist.method.flow import (
    check_times,
    data_estimate,
    interpolate,
    per_row,
    sample_time,
    step_to,
    velocity_target,
)
from apex_dist.method.losses import build_loss, clamp_symmetric

VelocityModel = Callable[..., Tensor]
# What an objective accepts as a batch: a TrainBatch, or a dict with its field names.
BatchLike = Union[TrainBatch, Mapping[str, Any]]

# apex_v0 splits every micro-batch into four equal roles, in this order.
ROLES = ("e2e", "mul", "any", "adv")
# Time-weight curve of apex_v0 (released code): tan((1 - gap) * pi / TIME_WEIGHT_DIVISOR) + 1,
# 1 at a gap of 1 and about 4.08 at a gap of 0.
TIME_WEIGHT_DIVISOR = 2.5
# Smallest t used by the (1-t)/t weight of the paper's L_mix, to keep it finite at t -> 0.
MIN_TIME_FOR_WEIGHT = 1e-3


class NonFiniteLossError(FloatingPointError):
    """A loss term is nan or inf; `terms` names the offending terms."""

    def __init__(self, objective: str, terms: dict[str, float]):
        self.terms = terms
        listed = ", ".join(f"{name}={value}" for name, value in terms.items())
        super().__init__(
            f"objective {objective}: non-finite loss term(s) {listed}; check the learning rate, "
            "the inputs (latents, text features) and the model dtype"
        )


def check_batch(batch: BatchLike, needs_latents: bool, needs_negative: bool) -> TrainBatch:
    """Check the fields and shapes of a batch (a TrainBatch or a dict with its field names);
    return it with float32 latents, a boolean mask and the negative prompt expanded to every
    row."""
    batch = as_train_batch(batch)
    text, text_mask = batch.text, batch.text_mask
    if text.dim() != 3:
        raise ValueError(f"batch.text must be (batch, tokens, features), got {tuple(text.shape)}")
    if tuple(text_mask.shape) != tuple(text.shape[:2]):
        raise ValueError(
            f"batch.text_mask {tuple(text_mask.shape)} must match batch.text "
            f"{tuple(text.shape)} in its first two dimensions"
        )
    rows = batch.rows
    latents = batch.latents
    if needs_latents and latents is None:
        raise KeyError(
            "batch is missing 'latents'; prompt-only data needs method.apex_v0.data_free=true"
        )
    if latents is not None:
        if latents.shape[0] != rows:
            raise ValueError(f"batch.latents has {latents.shape[0]} rows but batch.text has {rows}")
        latents = latents.float()
    neg_text, neg_text_mask = batch.neg_text, batch.neg_text_mask
    if needs_negative:
        if neg_text is None or neg_text_mask is None:
            raise KeyError(
                "batch needs 'neg_text' and 'neg_text_mask' (the negative prompt's embedding) "
                "when method.guidance.ratio > 0; set the ratio to 0 to train without guidance"
            )
        if (
            neg_text.dim() != 3
            or neg_text.shape[0] not in (1, rows)
            or neg_text.shape[2] != text.shape[2]
        ):
            raise ValueError(
                f"batch.neg_text {tuple(neg_text.shape)} must be (1 or {rows}, tokens, "
                f"{text.shape[2]})"
            )
        if tuple(neg_text_mask.shape) != tuple(neg_text.shape[:2]):
            raise ValueError(
                f"batch.neg_text_mask {tuple(neg_text_mask.shape)} must match batch.neg_text "
                f"{tuple(neg_text.shape)} in its first two dimensions"
            )
        neg_text = neg_text.expand(rows, -1, -1)
        neg_text_mask = neg_text_mask.expand(rows, -1)
    return dataclasses.replace(
        batch,
        latents=latents,
        text_mask=text_mask.bool(),
        neg_text=neg_text,
        neg_text_mask=neg_text_mask,
    )


def with_image_shape(model: VelocityModel, image_shape: Optional[ImageShape]) -> VelocityModel:
    """`model` with the batch's token grid passed as ``image_shape=`` to every call; the model
    itself when the batch has none (models without images need not accept the keyword)."""
    if image_shape is None:
        return model
    return functools.partial(model, image_shape=tuple(image_shape))


def predict(
    model: VelocityModel,
    x_t: Tensor,
    t: Tensor,
    target_time: Tensor,
    text: Tensor,
    text_mask: Tensor,
    fake_rows: Optional[Tensor] = None,
) -> Tensor:
    """One call of the velocity-model interface, checked for shape, returned in float32."""
    if fake_rows is None:
        fake_rows = torch.zeros(x_t.shape[0], dtype=torch.bool, device=x_t.device)
    velocity = model(x_t, t, target_time, text, text_mask, fake_rows)
    if velocity.shape != x_t.shape:
        raise ValueError(
            f"the model returned a velocity of shape {tuple(velocity.shape)} for x_t of shape "
            f"{tuple(x_t.shape)}; the interface requires the same shape"
        )
    return velocity.float()


@torch.no_grad()
def one_step_sample(model: VelocityModel, noise: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
    """x = z - F(z, 1, 0, c): the generator's one-step sample, without gradient."""
    ones = torch.ones(noise.shape[0], device=noise.device)
    return noise - predict(model, noise, ones, torch.zeros_like(ones), text, text_mask)


def _module_of(model) -> torch.nn.Module:
    """The nn.Module behind a velocity model: the model itself, a functools.partial of it, or
    an adapter whose `forward` is the module (the training engine's `VelocityModelAdapter`)."""
    while isinstance(model, functools.partial):
        model = model.func
    if isinstance(model, torch.nn.Module):
        return model
    forward = getattr(model, "forward", None)
    if isinstance(forward, torch.nn.Module):
        return forward
    raise TypeError(
        f"cannot find the module behind {type(model).__name__}: apex reading paper_form needs "
        "an nn.Module (or an adapter with the module as `forward`) to limit L_fake's gradient "
        "to the condition shift"
    )


@contextlib.contextmanager
def gradient_only_to_condition_shift(model):
    """Within the block, only the condition shift's parameters (a, b) record gradient: every
    other trainable parameter of the model is switched to requires_grad=False and back."""
    module = _module_of(model)
    frozen = [
        parameter
        for name, parameter in module.named_parameters()
        if parameter.requires_grad and "condition_shift." not in name
    ]
    for parameter in frozen:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)


def generation_noise(batch: TrainBatch) -> Tensor:
    """Gaussian noise of the data's shape (data-free mode: `batch.latent_shape` per row)."""
    return torch.randn(batch.generated_shape(), device=batch.text.device)


def check_finite(objective: str, terms: dict[str, Tensor]) -> None:
    """Raise NonFiniteLossError when any scalar term is nan or inf (one device sync)."""
    values = torch.stack([value.detach().float() for value in terms.values()])
    if not bool(torch.isfinite(values).all()):
        bad = {
            name: float(value)
            for name, value in zip(terms, values.tolist(), strict=True)
            if not math.isfinite(value)
        }
        raise NonFiniteLossError(objective, bad)


class Objective:
    """Common state and the call of every objective.

    ``objective(model, batch, reference=None)`` checks the batch (`check_batch`, with what
    `needs_latents` and `needs_negative` say), binds the batch's `image_shape` to the model
    and the reference, runs `compute` and checks the terms (`finish`). A new objective
    subclasses this and implements `compute` (docs/architecture.md, "Adding an objective").
    """

    name = "objective"

    def __init__(self, config: MethodConfig):
        self.config = config
        self.loss = build_loss(config.loss.kind, config.loss.robust_scale)
        # The optimizer step the next call belongs to: set by the training engine before each
        # step (restored with it on resume); objectives with schedules read it.
        self.step = 0

    def sample_time(self, rows: int, device: torch.device) -> Tensor:
        sampling = self.config.time_sampling
        return sample_time(rows, sampling.beta_p, sampling.beta_q, sampling.scale, device)

    def finish(self, loss: Tensor, terms: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        metrics = {"loss": loss.detach(), **{name: value.detach() for name, value in terms.items()}}
        if self.config.check_finite:
            check_finite(self.name, metrics)
        return loss, metrics

    def needs_latents(self) -> bool:
        """Whether the batch must hold latents (False: prompt-only data is enough)."""
        return True

    def needs_negative(self) -> bool:
        """Whether the batch must hold the negative prompt's features."""
        return False

    def __call__(
        self, model: VelocityModel, batch: BatchLike, reference: Optional[VelocityModel] = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss, metrics) of one batch; `reference` None means the model itself."""
        batch = check_batch(batch, self.needs_latents(), self.needs_negative())
        model = with_image_shape(model, batch.image_shape)
        reference = model if reference is None else with_image_shape(reference, batch.image_shape)
        loss, terms = self.compute(model, batch, reference)
        return self.finish(loss, terms)

    def compute(
        self, model: VelocityModel, batch: TrainBatch, reference: VelocityModel
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss with gradient and its named scalar terms, from a checked batch."""
        raise NotImplementedError


class FlowMatching(Objective):
    """`fm`: plain flow matching at tt = t, F(x_t, t, t, c) -> z - x (Eq. 1-4).

    How a teacher is pretrained; the `mul` role of apex_v0 without the consistency target.
    """

    name = "fm"

    def compute(self, model, batch, reference):
        x = batch.latents
        t = self.sample_time(batch.rows, x.device)
        noise = torch.randn_like(x)
        x_t = interpolate(x, noise, t)
        velocity = predict(model, x_t, t, t, batch.text, batch.text_mask)
        loss = self.loss(velocity, velocity_target(x, noise)).mean()
        return loss, {"loss_fm": loss}


class Apex(Objective):
    """`apex`: the paper's objective (Section 3), L = lambda_p * L_fake + lambda_e * L_mix.

    1. x_t = t*z + (1-t)*x; real branch F = F(x_t, t, tt, c) with tt = 0 (or t).
    2. x_fake = x_t - t*F (Eq. 11), optionally detached.
    3. L_fake = |F(t*z' + (1-t)*x_fake, t, t, c_fake) - (z' - x_fake)|^2 (Eq. 12).
    4. v_fake = sg(F_ref(x_t, t, t, c_fake)) at the real points (Eq. 14, 17).
    5. L_mix = w(t) |(x_t - t*F) - T_mix|^2, T_mix = (1-lam)*x + lam*T_cons (Eq. 22-24), where
       T_cons = x_t - t*v_fake (toward_fake) or its reflection about sg(x_t - t*F)
       (away_from_fake, the DMD direction v_real - v_fake).

    With ``data_free`` (prompt-only data, needs ``fake_source: noise``) x is the model's own
    one-step sample sg(z - F(z, 1, 0, c)), as in apex_v0's data-free mode.

    With ``fake_source: noise`` the fake samples are instead the one-step generator's outputs
    x_fake = z'' - F(z'', 1, 0, c) (a second gradient pass), and the correction is applied to
    them at their own re-noised points y = t*z' + (1-t)*sg(x_fake): T_cons = sg(x_fake) +/-
    (x_hat_fake(y) - x_hat_real(y)), L_mix = (1-lam) * L_sup + lam * |x_fake - T_cons|^2.
    """

    name = "apex"

    def __init__(self, config: MethodConfig):
        super().__init__(config)
        self.options: ApexConfig = config.apex
        self.correction_sign = 1.0 if self.options.correction == "toward_fake" else -1.0

    def mix_weight(self, t: Tensor) -> Tensor:
        if self.options.mix_time_weight == "one_minus_t_over_t":
            return (1 - t) / t.clamp(min=MIN_TIME_FOR_WEIGHT)
        if self.options.mix_time_weight == "t_times_one_minus_t":
            return t * (1 - t)
        return torch.ones_like(t)

    def ramped_mix_ratio(self) -> float:
        """lam at the current step: mix_ratio * min(1, step / mix_ramp_steps)."""
        ramp = self.options.mix_ramp_steps
        if ramp <= 0:
            return self.options.mix_ratio
        return self.options.mix_ratio * min(1.0, self.step / ramp)

    def needs_latents(self) -> bool:
        return not self.options.data_free

    def compute(self, model, batch, reference):
        if self.options.reading == "paper_form":
            return self.compute_paper_form(model, batch, reference)
        options = self.options
        text, text_mask = batch.text, batch.text_mask
        if options.data_free:  # prompt-only data: the model's own one-step samples stand in
            x = one_step_sample(model, generation_noise(batch), text, text_mask)
        else:
            x = batch.latents
        rows = batch.rows
        real_rows = torch.zeros(rows, dtype=torch.bool, device=x.device)
        all_fake = ~real_rows

        t = self.sample_time(rows, x.device)
        target_time = torch.zeros_like(t) if options.target_time == "zero" else t
        noise = torch.randn_like(x)
        x_t = interpolate(x, noise, t)

        velocity = predict(model, x_t, t, target_time, text, text_mask)  # real branch, grad
        x_prediction = data_estimate(x_t, t, velocity)
        if options.fake_source == "noised_data":
            x_fake = x_prediction  # Eq. 11
        else:  # the one-step generator from pure noise, a second gradient pass
            generator_noise = torch.randn_like(x)
            ones = torch.ones_like(t)
            x_fake = generator_noise - predict(
                model, generator_noise, ones, torch.zeros_like(t), text, text_mask, real_rows
            )
        x_fake_input = x_fake.detach() if options.detach_fake else x_fake

        fake_noise = torch.randn_like(x)
        x_fake_t = interpolate(x_fake_input, fake_noise, t)
        fake_velocity = predict(model, x_fake_t, t, t, text, text_mask, all_fake)  # grad
        loss_fake = self.loss(fake_velocity, velocity_target(x_fake_input, fake_noise)).mean()

        weight = self.mix_weight(t)
        with torch.no_grad():
            if options.fake_source == "noised_data":  # Eq. 14, 17: at the real points
                fake_estimate = data_estimate(
                    x_t, t, predict(reference, x_t, t, t, text, text_mask, all_fake)
                )
                anchor = x_prediction.detach()
            else:  # at the generator's own re-noised samples
                points = x_fake_t.detach()
                fake_estimate = data_estimate(
                    points, t, predict(reference, points, t, t, text, text_mask, all_fake)
                )
                anchor = x_fake.detach()
                real_estimate = data_estimate(
                    points, t, predict(reference, points, t, t, text, text_mask, real_rows)
                )
                fake_estimate = anchor + (fake_estimate - real_estimate)
            consistency_goal = anchor + self.correction_sign * (fake_estimate - anchor)

        if options.fake_source == "noised_data":  # Eq. 22-24 on the one x-prediction
            mixed_goal = (1 - options.mix_ratio) * x + options.mix_ratio * consistency_goal
            loss_mix = (self.loss(x_prediction, mixed_goal) * weight).mean()
        else:
            loss_mix = (
                (1 - options.mix_ratio) * self.loss(x_prediction, x)
                + options.mix_ratio * self.loss(x_fake, consistency_goal)
            ) * weight
            loss_mix = loss_mix.mean()
        loss = options.fake_weight * loss_fake + options.mix_weight * loss_mix  # Eq. 25
        with torch.no_grad():
            loss_supervised = self.loss(x_prediction, x).mean()
            loss_consistency = self.loss(x_fake, consistency_goal).mean()
        return loss, {
            "loss_fake": loss_fake,
            "loss_mix": loss_mix,
            "loss_supervised": loss_supervised,
            "loss_consistency": loss_consistency,
        }

    def compute_paper_form(self, model, batch, reference):
        """`reading: paper_form`, a second reading of Section 3 (method.md, "A second reading").

        1. x_t = t*z + (1-t)*x; real branch F = F(x_t, t, tt, c) (grad), x_fake = sg(x_t - t*F).
        2. A fake trajectory of its own: fresh z', t_fake ~ U(0, 1),
           x_fake_t = t_fake*z' + (1-t_fake)*x_fake;
           L_fake = |F(x_fake_t, t_fake, t_fake, c_fake) - (z' - x_fake)|^2 with gradient to the
           condition shift (a, b) only (Eq. 12).
        3. v_fake = sg(F_ref(x_t, t, t, c_fake)) at the real points (Eq. 14, 17).
        4. L_mix = w(t) |F - v_mix|^2 with v_mix = (1-lam)*(z - x) + lam*v_cons: Eq. 22-24
           divided by t (velocity form), v_cons = v_fake (toward_fake) or its reflection about
           sg(F) (away_from_fake); lam ramps from 0 to mix_ratio over mix_ramp_steps.
        No separate supervised term: L = lambda_p * L_fake + lambda_e * L_mix (Eq. 25).
        """
        options = self.options
        text, text_mask, x = batch.text, batch.text_mask, batch.latents
        rows = batch.rows
        all_fake = torch.ones(rows, dtype=torch.bool, device=x.device)

        t = self.sample_time(rows, x.device)
        target_time = torch.zeros_like(t) if options.target_time == "zero" else t
        noise = torch.randn_like(x)
        x_t = interpolate(x, noise, t)
        velocity = predict(model, x_t, t, target_time, text, text_mask)  # real branch, grad
        x_fake = data_estimate(x_t, t, velocity).detach()

        fake_noise = torch.randn_like(x)
        fake_time = torch.rand(rows, device=x.device)
        x_fake_t = interpolate(x_fake, fake_noise, fake_time)
        with gradient_only_to_condition_shift(model):
            fake_velocity = predict(
                model, x_fake_t, fake_time, fake_time, text, text_mask, all_fake
            )
        loss_fake = self.loss(fake_velocity, velocity_target(x_fake, fake_noise)).mean()

        mix_ratio = self.ramped_mix_ratio()
        with torch.no_grad():
            fake_at_real = predict(reference, x_t, t, t, text, text_mask, all_fake)
            anchor = velocity.detach()
            consistency_goal = anchor + self.correction_sign * (fake_at_real - anchor)
            mixed_goal = (1 - mix_ratio) * velocity_target(x, noise) + mix_ratio * consistency_goal
        loss_mix = (self.loss(velocity, mixed_goal) * self.mix_weight(t)).mean()
        loss = options.fake_weight * loss_fake + options.mix_weight * loss_mix  # Eq. 25
        return loss, {
            "loss_fake": loss_fake,
            "loss_mix": loss_mix,
            "mix_ratio": torch.tensor(mix_ratio),
        }


def time_weight(t: Tensor, target_time: Tensor) -> Tensor:
    """tan((1 - (|t| - |tt|)) * pi / 2.5) + 1 (released code): 1 at gap 1, ~4.08 at gap 0."""
    gap = t.abs() - target_time.abs()
    return torch.tan((1 - gap) * math.pi / TIME_WEIGHT_DIVISOR) + 1


@torch.no_grad()
def consistency_target(
    reference: VelocityModel,
    prediction: Tensor,
    x_t: Tensor,
    t: Tensor,
    target_time: Tensor,
    velocity: Tensor,
    text: Tensor,
    text_mask: Tensor,
    order: int,
    delta: float,
    clamp: float,
) -> Tensor:
    """Order-N consistency target (RCGM, method.md section 4 step 5), shape of `prediction`.

    x' = x_t - delta*v, t_m = max(t - delta, tt); S = sum_k (s_k - s_{k+1}) F_ref(x_k, s_k,
    s_{k+1}) over an N-step roll-out from (x', t_m) to tt; residual r = ((t-tt)*F - S -
    delta*v) / delta, or F - v where t - tt < delta; target sg(F) - clamp(r).
    """
    gap = t - target_time
    start_time = torch.maximum(t - delta, target_time)
    start = x_t - delta * velocity
    position = start
    for step in range(order):
        time_from = start_time - (start_time - target_time) * (step / order)
        time_to = start_time - (start_time - target_time) * ((step + 1) / order)
        step_velocity = predict(reference, position, time_from, time_to, text, text_mask)
        position = step_to(position, time_from, time_to, step_velocity)
    displacement = start - position
    residual = (per_row(gap, prediction) * prediction - displacement - delta * velocity) / delta
    small_gap = per_row(gap < delta, prediction).bool()
    residual = torch.where(small_gap, prediction - velocity, residual)
    return prediction - clamp_symmetric(residual, clamp)


class ApexV0(Objective):
    """`apex_v0`: the released code's objective (TwinFlow lineage, method.md section 4).

    The micro-batch is split into four equal contiguous roles: e2e (t=1, tt=0: the one-step
    generator), mul (tt ~ t: flow matching), any (tt ~ U(0, t): any-step consistency) and adv
    (flow matching on the model's own one-step samples through the shifted, fake branch). One
    pass carries gradient; every other pass is no-grad.
    """

    name = "apex_v0"

    def __init__(self, config: MethodConfig):
        super().__init__(config)
        self.options: ApexV0Config = config.apex_v0
        self.shift_fake = "shift" in self.options.fake_flag
        self.negate_fake_time = "neg_time" in self.options.fake_flag
        self.frozen_reference = config.reference.mode == "frozen_base"

    def fake_inputs(self, t: Tensor, rows: slice, count: int) -> tuple[Tensor, Tensor]:
        """(signed times, fake_rows) for a batch whose `rows` are the fake branch."""
        fake_rows = torch.zeros(count, dtype=torch.bool, device=t.device)
        sign = torch.ones(count, device=t.device)
        if self.shift_fake:
            fake_rows[rows] = True
        if self.negate_fake_time:
            sign[rows] = -1.0
        return sign, fake_rows

    def needs_latents(self) -> bool:
        return not self.options.data_free

    def needs_negative(self) -> bool:
        return self.config.guidance.ratio > 0

    def compute(self, model, batch, reference):
        options, guidance = self.options, self.config.guidance
        text, text_mask, rows = batch.text, batch.text_mask, batch.rows
        if rows % len(ROLES):
            raise ValueError(
                f"objective apex_v0 needs a micro-batch that is a multiple of 4 (got {rows}): "
                "the batch is split into four roles (e2e, mul, any, adv)"
            )
        quarter = rows // len(ROLES)
        e2e, mul, anystep, adv = (slice(i * quarter, (i + 1) * quarter) for i in range(len(ROLES)))
        real = slice(0, 3 * quarter)  # e2e, mul and any rows
        guided = slice(quarter, 3 * quarter)  # mul and any rows
        device = text.device
        nograd_rows = 0

        # 1. times: t ~ Beta(p, q) * scale; tt per role.
        t = self.sample_time(rows, device)
        t[e2e] = 1.0
        target_time = t.clone()
        target_time[e2e] = 0.0
        target_time[mul] = t[mul] * (1 - options.mul_jitter * torch.rand(quarter, device=device))
        target_time[anystep] = torch.rand(quarter, device=device) * t[anystep]

        # 2. data: real latents, or the model's own one-step samples (data-free); adv rows always
        #    hold one-step samples and form the fake branch.
        if options.data_free:
            x = one_step_sample(model, generation_noise(batch), text, text_mask)
            nograd_rows += rows
        else:
            x = batch.latents.clone()
            x[adv] = one_step_sample(model, torch.randn_like(x[adv]), text[adv], text_mask[adv])
            nograd_rows += quarter
        sign, fake_rows = self.fake_inputs(t, adv, rows)

        # 3. the single gradient pass.
        noise = torch.randn_like(x)
        x_t = interpolate(x, noise, t)
        velocity_goal = velocity_target(x, noise)
        prediction = predict(model, x_t, t * sign, target_time * sign, text, text_mask, fake_rows)

        with torch.no_grad():
            # 4. guidance baked into the target of mul and any rows with 0 < t < 1.
            if guidance.ratio > 0:
                interior = per_row((t[guided] > 0) & (t[guided] < 1), x_t[guided]).bool()
                conditional = predict(
                    reference, x_t[guided], t[guided], t[guided], text[guided], text_mask[guided]
                )
                unconditional = predict(
                    reference,
                    x_t[guided],
                    t[guided],
                    t[guided],
                    batch.neg_text[guided],
                    batch.neg_text_mask[guided],
                )
                nograd_rows += 4 * quarter
                if options.data_free and self.frozen_reference:
                    guided_goal = unconditional + guidance.ratio * (conditional - unconditional)
                else:
                    guided_goal = velocity_goal[guided] + guidance.ratio * (
                        conditional - unconditional
                    )
                velocity_goal[guided] = torch.where(interior, guided_goal, velocity_goal[guided])

            # 5. consistency target for the real rows; adv rows keep v.
            target = velocity_goal.clone()
            target[real] = consistency_target(
                reference,
                prediction[real].detach(),
                x_t[real],
                t[real],
                target_time[real],
                velocity_goal[real],
                text[real],
                text_mask[real],
                options.consistency_order,
                options.consistency_delta,
                options.residual_clamp,
            )
            nograd_rows += options.consistency_order * 3 * quarter

        # 6. per-row loss times the time weight (adv rows weight 1).
        per_row_loss = self.loss(prediction, target)
        weights = torch.ones_like(t)
        if options.time_weight:
            weights[real] = time_weight(t[real], target_time[real])
        loss = (per_row_loss * weights).mean()

        # 7. distribution matching on the e2e rows: move the one-step output along
        #    F_fake - F_real evaluated at its own re-noised samples.
        loss_distribution = torch.zeros((), device=device)
        if options.distribution_matching_weight > 0:
            with torch.no_grad():
                generated = data_estimate(x_t[e2e], t[e2e], prediction[e2e].detach())
                s = torch.rand(quarter, device=device)
                noisy = interpolate(generated, torch.randn_like(generated), s)
                fake_sign, fake_flags = self.fake_inputs(s, slice(0, quarter), quarter)
                fake_velocity = predict(
                    model,
                    noisy,
                    s * fake_sign,
                    s * fake_sign,
                    text[e2e],
                    text_mask[e2e],
                    fake_flags,
                )
                real_velocity = predict(reference, noisy, s, s, text[e2e], text_mask[e2e])
                correction = clamp_symmetric(fake_velocity - real_velocity, options.residual_clamp)
                nograd_rows += 2 * quarter
            distribution_goal = (prediction[e2e] - correction).detach()
            loss_distribution = self.loss(prediction[e2e], distribution_goal).mean()
            loss = loss + options.distribution_matching_weight * loss_distribution

        terms = {
            f"loss_{role}": per_row_loss[part].mean()
            for role, part in zip(ROLES, (e2e, mul, anystep, adv), strict=True)
        }
        terms["loss_distribution"] = loss_distribution
        terms["nograd_batch_equivalents"] = torch.tensor(nograd_rows / rows)
        return loss, terms


OBJECTIVES = {"fm": FlowMatching, "apex": Apex, "apex_v0": ApexV0}


def build_objective(config) -> Objective:
    """Build an objective from the `method` section (a MethodConfig or a plain dict)."""
    from apex_dist.config import from_dict

    if isinstance(config, dict):
        config = from_dict(MethodConfig, config, source="method")
    if not isinstance(config, MethodConfig):
        raise TypeError(
            f"build_objective takes a MethodConfig or a dict (got {type(config).__name__})"
        )
    return OBJECTIVES[config.objective](config)


__all__ = [
    "Apex",
    "ApexV0",
    "FlowMatching",
    "NonFiniteLossError",
    "Objective",
    "build_objective",
    "check_batch",
    "check_times",
    "consistency_target",
    "time_weight",
    "with_image_shape",
]
