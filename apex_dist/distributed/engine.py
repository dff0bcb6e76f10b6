"""The training engine: the model under DeepSpeed ZeRO, its optimizer, references and saves.

`TrainingEngine(config, info)` sets up, in this order:
1. the DeepSpeed JSON from the config (`deepspeed_config.build_deepspeed_config`);
2. the model, built by `apex_dist.distributed.build.build_training_model` in its documented
   order (spec, meta / zero.Init, weights, E2 from E1, LoRA, kernels, activation
   checkpointing, compile);
3. AdamW over the trainable parameters and a warm-up (+ cosine) LambdaLR, handed to
   `deepspeed.initialize` as client objects;
4. the reference of the no-grad passes (`method.reference.mode`): the student itself
   (online), the base with adapters switched off (frozen_base with LoRA), or shadow weights
   kept on each rank's own partition (ema; frozen_base for full fine-tuning).

`train_step(micro_batches)` runs the objective on each micro-batch, backward and step through
DeepSpeed, and updates the EMA. A non-finite loss on any rank poisons that rank's gradient, so
the all-reduced gradient norm is non-finite on every rank and DeepSpeed skips the step
everywhere at once (no extra collective, no rank left behind); the step is reported as
skipped, and `train.max_nonfinite_steps` skipped steps in a row raise NonFiniteTrainingError.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import deepspeed
import torch
from torch import Tensor, nn

from apex_dist.config import Config
from apex_dist.data.batch import TrainBatch, as_train_batch
from apex_dist.distributed.build import DTYPES, build_training_model
from apex_dist.distributed.deepspeed_config import build_deepspeed_config, needs_partitioned_shadow
from apex_dist.distributed.runtime import RankInfo, logger
from apex_dist.distributed.safe_loading import install_guarded_engine
from apex_dist.distributed.shadow import ShadowWeights
from apex_dist.method import build_objective
from apex_dist.models.velocity import VelocityModelAdapter

# Prefix DeepSpeed-free names keep: parameter names are the module's own (no "module.").
SHADOW_PREFIXES = {"ema": "ema", "frozen_base": "frozen"}


class NonFiniteTrainingError(FloatingPointError):
    """Too many optimizer steps in a row were skipped for nan/inf."""


def learning_rate_factor(config: Config) -> Callable[[int], float]:
    """Multiplier of optimizer.lr at a given optimizer step: linear warm-up, then constant or
    cosine decay to optimizer.min_lr_ratio at train.steps."""
    optimizer, steps = config.optimizer, config.train.steps
    warmup = optimizer.warmup_steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if optimizer.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return optimizer.min_lr_ratio + (1 - optimizer.min_lr_ratio) * cosine

    return factor


def load_initial_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Start from `state` instead of the built weights: the state dict of a model built from
    the same model settings (e.g. a teacher trained in this process, `engine.module`'s). Set
    before DeepSpeed wraps the model, so the optimizer, the references and the shadows start
    from it too; under ZeRO-3 one gathered parameter at a time, written by rank 0."""
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong_shapes = [
        name
        for name, tensor in own.items()
        if name in state
        and tuple(state[name].shape) != tuple(getattr(tensor, "ds_shape", tensor.shape))
    ]
    if missing or unexpected or wrong_shapes:
        raise ValueError(
            f"the initial state does not fit {type(model).__name__} (missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}, other shapes {wrong_shapes[:4]}): give the state "
            "dict of a model built from the same model settings"
        )
    partitioned = any(hasattr(tensor, "ds_id") for tensor in own.values())
    for name, tensor in own.items():
        if partitioned:
            from apex_dist.distributed.zero_loading import zero3_parameter_context

            scope = zero3_parameter_context(tensor)
        else:
            scope = contextlib.nullcontext(True)
        with scope as writes, torch.no_grad():
            if writes:
                tensor.data.copy_(state[name].to(tensor.device, tensor.dtype))


# --------------------------------------------------------------------------------------------
# the engine (the models are called through `apex_dist.models.velocity.VelocityModelAdapter`)


@dataclass
class StepResult:
    """What one optimizer step did: averaged metrics and whether the update was applied."""

    metrics: dict[str, float] = field(default_factory=dict)
    applied: bool = True
    flops: Optional[float] = None


class TrainingEngine:
    """DeepSpeed engine, objective, reference and shadow weights of one run (module doc)."""

    def __init__(
        self, config: Config, info: RankInfo, initial_state: Optional[dict[str, Tensor]] = None
    ):
        self.config = config
        self.info = info
        self.deepspeed_config = build_deepspeed_config(config, info.world_size)
        self.compute_dtype = DTYPES[config.model.dtype]
        self.lora = config.model.lora.enabled
        model = build_training_model(config, info, self.deepspeed_config)
        if initial_state is not None:
            load_initial_state(model, initial_state)
        trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
        if not trainable:
            raise ValueError("the model has no trainable parameters; check model.lora")
        options = config.optimizer
        optimizer = torch.optim.AdamW(
            trainable,
            lr=options.lr,
            betas=tuple(options.betas),
            eps=options.eps,
            weight_decay=options.weight_decay,
        )
        factor = learning_rate_factor(config)
        self.deepspeed, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda wrapped: torch.optim.lr_scheduler.LambdaLR(wrapped, factor),
            config=self.deepspeed_config,
        )
        self.module: nn.Module = self.deepspeed.module
        method = copy.deepcopy(config.method)
        method.check_finite = False  # checked here, so that every rank still runs backward
        self.objective = build_objective(method)
        self.student = VelocityModelAdapter(self.deepspeed, self.compute_dtype)
        self.shadows: dict[str, ShadowWeights] = {}
        self.reference = self._build_reference()
        self.consecutive_skipped = 0
        logger.info(
            "model %s: %s parameters, %s trainable; ZeRO-%d on %d rank(s)",
            config.model.preset,
            f"{sum(self._full_numel(p) for p in self.module.parameters()):,}",
            f"{sum(self._full_numel(p) for p in trainable):,}",
            config.parallel.zero_stage,
            info.world_size,
        )

    @staticmethod
    def _full_numel(parameter: nn.Parameter) -> int:
        return parameter.ds_numel if hasattr(parameter, "ds_numel") else parameter.numel()

    # ---- references -----------------------------------------------------------------------

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {
            name: parameter
            for name, parameter in self.module.named_parameters()
            if parameter.requires_grad
        }

    def release_gathered(self) -> None:
        """Free every gathered ZeRO-3 parameter (nothing to do under ZeRO-2)."""
        if self.config.parallel.zero_stage == 3:
            # the optimizer's release, without the engine's gc.collect() (0.5 s per call)
            self.deepspeed.optimizer.empty_partition_cache()

    def _build_reference(self) -> Optional[VelocityModelAdapter]:
        mode = self.config.method.reference.mode
        if mode == "online":
            return None
        if mode == "frozen_base" and self.lora:
            from apex_dist.models.lora import adapters_disabled

            return VelocityModelAdapter(
                self.module, self.compute_dtype, lambda: adapters_disabled(self.module)
            )
        if not needs_partitioned_shadow(self.config):
            raise ValueError(f"method.reference.mode {mode!r} is not supported by the engine")
        target_decay = self.config.method.reference.ema_decay if mode == "ema" else None
        shadow = ShadowWeights(
            self.trainable_parameters(),
            self.config.parallel.zero_stage,
            self.info.world_size,
            self.info.rank,
            target_decay,
        )
        self.shadows[SHADOW_PREFIXES[mode]] = shadow
        return VelocityModelAdapter(
            self.module, self.compute_dtype, lambda: shadow.swapped_in(self.release_gathered)
        )

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[None]:
        """No-grad, eval mode, gathered parameters released afterwards."""
        self.module.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.module.train()
            self.release_gathered()

    def teacher(self) -> Optional[VelocityModelAdapter]:
        """The starting weights, when the run keeps them (LoRA base, frozen copy); else None."""
        if self.config.method.reference.mode == "frozen_base":
            return self.reference
        if self.lora:
            from apex_dist.models.lora import adapters_disabled

            return VelocityModelAdapter(
                self.module, self.compute_dtype, lambda: adapters_disabled(self.module)
            )
        return None

    def inference_model(self) -> VelocityModelAdapter:
        """The student for sampling: the bare module (no DeepSpeed backward hooks)."""
        return VelocityModelAdapter(self.module, self.compute_dtype)

    # ---- one optimizer step ---------------------------------------------------------------

    def train_step(self, micro_batches: list[TrainBatch], count_flops: bool = False) -> StepResult:
        """Objective, backward and DeepSpeed step over `gradient_accumulation_steps`
        micro-batches; then the EMA update when the step was applied."""
        expected = self.config.train.gradient_accumulation_steps
        if len(micro_batches) != expected:
            raise ValueError(
                f"train_step got {len(micro_batches)} micro-batches; "
                f"train.gradient_accumulation_steps is {expected}"
            )
        sums: dict[str, float] = {}
        counter = None
        if count_flops:
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
        self.objective.step = self.global_step  # for objectives with schedules (apex ramp)
        with counter if counter is not None else contextlib.nullcontext():
            for batch in micro_batches:
                batch = as_train_batch(batch).to(self.info.device)
                loss, terms = self.objective(self.student, batch, self.reference)
                values = torch.stack(
                    [value.detach().float().reshape(()) for value in terms.values()]
                )
                numbers = values.tolist()  # one host sync per micro-batch
                finite = all(math.isfinite(number) for number in numbers)
                if not finite:
                    bad = {
                        name: number
                        for name, number in zip(terms, numbers, strict=True)
                        if not math.isfinite(number)
                    }
                    logger.warning(
                        "non-finite loss terms %s at step %d; the step will be skipped",
                        bad,
                        self.global_step,
                    )
                    loss = loss * float("nan")  # poison the gradient: skipped on every rank
                self.deepspeed.backward(loss)
                self.deepspeed.step()
                for name, number in zip(terms, numbers, strict=True):
                    sums[name] = sums.get(name, 0.0) + number / expected
        applied = bool(self.deepspeed.was_step_applied())
        if applied:
            self.consecutive_skipped = 0
            for shadow in self.shadows.values():
                shadow.update()
        else:
            self.consecutive_skipped += 1
        grad_norm = self.deepspeed.get_global_grad_norm()
        metrics = dict(sums)
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["lr"] = float(self.scheduler.get_last_lr()[0])
        metrics["skipped"] = 0.0 if applied else 1.0
        result = StepResult(metrics, applied)
        if counter is not None:
            result.flops = float(counter.get_total_flops())
        limit = self.config.train.max_nonfinite_steps
        if self.consecutive_skipped >= limit:
            raise NonFiniteTrainingError(
                f"{self.consecutive_skipped} optimizer steps in a row were skipped for nan/inf "
                f"loss or gradients (train.max_nonfinite_steps={limit}), last at step "
                f"{self.global_step}; lower optimizer.lr, check the data, or resume from an "
                "earlier checkpoint"
            )
        return result

    @property
    def global_step(self) -> int:
        return int(self.deepspeed.global_steps)

    # ---- checkpoints ------------------------------------------------------------------------

    def save(self, manager, step: int):
        """Collective: a finite, complete checkpoint of this step (checkpoint.py), with every
        DeepSpeed write through the guarded engine (safe_loading.py); the manager adds the
        components it tracks (data position, RNG)."""
        install_guarded_engine(self.deepspeed)
        return manager.save(
            step,
            self.deepspeed,
            self.shadows,
            exclude_frozen_parameters=self.lora,
            parameters=self.trainable_parameters(),
        )

    def load(self, manager, path) -> dict[str, Any]:
        """Restore model, optimizer, scheduler and shadows from `path`; return the rank state.

        Collective. Every file is checked for pickled code before DeepSpeed's load starts and
        read with `weights_only=True` (safe_loading.py). The optimizer settings of this run's
        config then replace the restored ones (`_apply_optimizer_settings`)."""
        install_guarded_engine(self.deepspeed)
        manager.check_loadable(path, self.shadows)
        load_path, _ = self.deepspeed.load_checkpoint(
            str(path.parent),
            tag=path.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            load_module_strict=not self.lora,
        )
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint to load in {path}")
        state = manager.load_local_state(path, self.shadows)
        self._apply_optimizer_settings()
        return state

    def _apply_optimizer_settings(self) -> None:
        """After a load: this run's lr, betas, eps, weight decay and gradient clipping replace
        the checkpoint's, and the learning rate at the restored step follows this run's
        schedule (warm-up, cosine, train.steps); each change is logged. Without this the
        restored scheduler and optimizer would silently keep the old values."""
        options = self.config.optimizer
        scheduler = self.scheduler
        wanted = {
            "lr": options.lr,
            "betas": tuple(options.betas),
            "eps": options.eps,
            "weight_decay": options.weight_decay,
        }
        restored = dict(scheduler.optimizer.param_groups[0])
        restored["lr"] = scheduler.base_lrs[0]
        for name, value in wanted.items():
            current = tuple(restored[name]) if name == "betas" else restored[name]
            if current != value:
                logger.info(
                    "optimizer.%s: the checkpoint's %s is replaced by this run's %s",
                    name,
                    current,
                    value,
                )
        factor = learning_rate_factor(self.config)(scheduler.last_epoch)
        for group in scheduler.optimizer.param_groups:
            group["betas"] = wanted["betas"]
            group["eps"] = wanted["eps"]
            group["weight_decay"] = wanted["weight_decay"]
            group["initial_lr"] = options.lr
            group["lr"] = options.lr * factor
        scheduler.base_lrs = [options.lr] * len(scheduler.optimizer.param_groups)
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
        zero_optimizer = self.deepspeed.optimizer
        if getattr(zero_optimizer, "clip_grad", options.grad_clip) != options.grad_clip:
            logger.info(
                "optimizer.grad_clip: the checkpoint's %s is replaced by this run's %s",
                zero_optimizer.clip_grad,
                options.grad_clip,
            )
        if hasattr(zero_optimizer, "clip_grad"):
            zero_optimizer.clip_grad = options.grad_clip

    def close(self) -> None:
        self.release_gathered()
