"""The training engine: the model under DeepSpeed ZeRO, its optimizer, references and saves.

`TrainingEngine(config, info)` builds, in this order:
1. the DeepSpeed JSON from the config (`deepspeed_config.build_deepspeed_config`);
2. the model: under `deepspeed.zero.Init` for ZeRO-3 (each parameter is partitioned as it is
   created, so no rank ever holds the whole model), with pretrained weights streamed in one
   gathered parameter at a time, then LoRA adapters (`model.lora.enabled`) and per-block
   activation checkpointing (`parallel.activation_checkpointing`);
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

from apex_dist.config import QWEN_IMAGE_PRESET_NAMES, Config
from apex_dist.data.batch import TrainBatch, as_train_batch
from apex_dist.distributed.deepspeed_config import build_deepspeed_config, needs_partitioned_shadow
from apex_dist.distributed.runtime import RankInfo, logger
from apex_dist.distributed.shadow import ShadowWeights
from apex_dist.method import build_objective

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Prefix DeepSpeed-free names keep: parameter names are the module's own (no "module.").
SHADOW_PREFIXES = {"ema": "ema", "frozen_base": "frozen"}


class NonFiniteTrainingError(FloatingPointError):
    """Too many optimizer steps in a row were skipped for nan/inf."""


# --------------------------------------------------------------------------------------------
# building the model


def zero_init_config(deepspeed_config: dict, dtype: torch.dtype) -> dict:
    """The DeepSpeed config for `deepspeed.zero.Init` that creates parameters in `dtype`.

    zero.Init takes the dtype from the config's bf16/fp16 switches; its explicit `dtype`
    argument is ignored on devices without fp16 support (DeepSpeed 0.19.8 picks bf16 on CPU),
    and a LoRA run keeps DeepSpeed in fp32 while its base is bf16.
    """
    config = dict(deepspeed_config)
    config["bf16"] = {"enabled": dtype == torch.bfloat16}
    config["fp16"] = {"enabled": dtype == torch.float16}
    return config


# Modules the models create as copy.deepcopy of another module (E2 starts as a copy of E1):
# name of the copy -> name of its source, as path segments.
DEEPCOPIED_MODULES = {"time_text_embed_2": "time_text_embed", "target": "primary"}


def _source_of_copy(name: str, parameters: dict[str, nn.Parameter]) -> Optional[str]:
    parts = name.split(".")
    for index, part in enumerate(parts):
        if part in DEEPCOPIED_MODULES:
            candidate = ".".join([*parts[:index], DEEPCOPIED_MODULES[part], *parts[index + 1 :]])
            if candidate in parameters and hasattr(parameters[candidate], "ds_id"):
                return candidate
    return None


def repair_deepcopied_parameters(model: nn.Module) -> list[str]:
    """Partition parameters that zero.Init left behind because they were deep copies.

    The models create E2 with copy.deepcopy(E1); under zero.Init E1 is already partitioned at
    that point, so the copy holds empty tensors that no rank owns. Each such parameter is
    replaced by a full-size one, partitioned by DeepSpeed, and set to its source one gathered
    pair at a time. Returns the repaired names.
    """
    parameters = dict(model.named_parameters())
    broken = [name for name, parameter in parameters.items() if not hasattr(parameter, "ds_id")]
    unknown = [name for name in broken if _source_of_copy(name, parameters) is None]
    if unknown:
        raise RuntimeError(
            f"parameters {unknown} were not partitioned by deepspeed.zero.Init; create them in "
            "the module's __init__ (not as copy.deepcopy of a partitioned module)"
        )
    for name in broken:
        source = parameters[_source_of_copy(name, parameters)]
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        replacement = nn.Parameter(
            torch.empty(source.ds_shape, dtype=source.dtype, device=source.device),
            requires_grad=parameters[name].requires_grad,
        )
        owner._parameters[leaf] = replacement
        source.convert_to_zero_parameters([replacement])
    # every copy starts equal to its source, as when the model is built without zero.Init
    parameters = dict(model.named_parameters())
    for name, parameter in parameters.items():
        source_name = _source_of_copy(name, parameters)
        if source_name is None:
            continue
        source = parameters[source_name]
        with deepspeed.zero.GatheredParameters([source, parameter], modifier_rank=0):
            if torch.distributed.get_rank() == 0:
                with torch.no_grad():
                    parameter.copy_(source)
    return broken


def build_training_model(config: Config, info: RankInfo, deepspeed_config: dict) -> nn.Module:
    """The velocity model as it will train (see the module doc, step 2)."""
    from apex_dist.models import build_model

    torch.manual_seed(config.train.seed)  # the same initial weights on every rank
    dtype = DTYPES[config.model.dtype]
    stage3 = config.parallel.zero_stage == 3
    init_config = zero_init_config(deepspeed_config, dtype)
    init_context = (
        deepspeed.zero.Init(config_dict_or_path=init_config) if stage3 else contextlib.nullcontext()
    )
    if config.model.preset in QWEN_IMAGE_PRESET_NAMES:
        from apex_dist.models.loading import build_transformer, load_transformer_weights

        shift = config.method.condition_shift
        source = config.model.pretrained or config.model.preset
        model = build_transformer(
            source,
            device=info.device,
            init_context=init_context if stage3 else None,
            shift_scale=shift.scale,
            shift_bias=shift.bias,
            shift_learnable=shift.learnable,
        )
        if stage3:
            repair_deepcopied_parameters(model)
        if config.model.pretrained:
            context = None
            if stage3:
                from apex_dist.distributed.zero_loading import zero3_parameter_context

                context = zero3_parameter_context
            load_transformer_weights(model, config.model.pretrained, dtype, context)
        elif not stage3:
            model = model.to(dtype)
    else:
        if config.model.pretrained:
            raise ValueError(
                f"model.pretrained is set but preset {config.model.preset!r} has no snapshot "
                "loader; use a Qwen-Image preset or model.pretrained=null"
            )
        with init_context:
            model = build_model(config)
        if stage3:
            repair_deepcopied_parameters(model)
        else:
            model = model.to(device=info.device, dtype=dtype)

    if config.model.lora.enabled:
        from apex_dist.models.lora import apply_lora

        context = None
        if stage3:
            from apex_dist.distributed.zero_loading import zero3_read_context

            context = zero3_read_context
        apply_lora(model, config.model.lora, parameter_context=context)
        model.to(info.device)

    every = config.parallel.activation_checkpointing
    if every:
        if not hasattr(model, "enable_activation_checkpointing"):
            raise ValueError(
                f"parallel.activation_checkpointing={every} but {type(model).__name__} has no "
                "blocks to checkpoint; set it to 0 for this model"
            )
        model.enable_activation_checkpointing(every)
    apply_kernels(model, config, info.device)
    return model


def apply_kernels(model: nn.Module, config: Config, device: torch.device) -> str:
    """Apply `model.kernels` (attention backend, fused kernels, compiled blocks) and log what
    was chosen for this device; a forced attention backend that cannot run here is an error.
    Returns the logged description."""
    import importlib.util

    import apex_kernels
    from apex_kernels.attention import (
        AttentionCall,
        choose_backend,
        detect_availability,
        unsupported_reason,
    )

    kernels = config.model.kernels
    apex_kernels.configure(kernels.attention_backend, kernels.fused)
    parts = []
    head_dim = getattr(model, "attention_head_dim", None)
    if head_dim is None:
        parts.append(f"attention: none in {type(model).__name__}")
    else:
        capability = None
        if device.type == "cuda":
            capability = tuple(torch.cuda.get_device_capability(device))
        dtype = DTYPES[config.model.dtype]
        call = AttentionCall(device.type, dtype, int(head_dim), False, capability)
        availability = detect_availability(device.type)
        backend = kernels.attention_backend
        if backend == "auto":
            parts.append(
                f"attention auto: {choose_backend(call, availability)} for {config.model.dtype} "
                f"head_dim {head_dim} on {device.type} (chosen per call)"
            )
        else:
            reason = unsupported_reason(backend, call, availability)
            if reason is not None:
                raise ValueError(
                    f"model.kernels.attention_backend={backend!r} cannot run here: {reason}; "
                    "use auto to let apex_kernels choose"
                )
            parts.append(f"attention {backend}")
    triton_present = importlib.util.find_spec("triton") is not None
    if kernels.fused and device.type == "cuda" and triton_present:
        parts.append("fused Triton kernels on")
    elif kernels.fused:
        parts.append(f"fused kernels requested, PyTorch reference ops on {device.type}")
    else:
        parts.append("fused kernels off")
    if kernels.compile_blocks:
        if not isinstance(getattr(model, "transformer_blocks", None), nn.ModuleList):
            raise ValueError(
                f"model.kernels.compile_blocks=true but {type(model).__name__} has no "
                "transformer_blocks to compile; set it to false for this model"
            )
        parts.append(f"torch.compile of {apex_kernels.compile_blocks(model)} blocks")
    description = "; ".join(parts)
    logger.info("kernels: %s", description)
    return description


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
# calling the model


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


# --------------------------------------------------------------------------------------------
# the engine


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

    def save(self, manager, step: int, rank_state: dict[str, Any]):
        return manager.save(
            step,
            self.deepspeed,
            rank_state,
            self.shadows,
            exclude_frozen_parameters=self.lora,
        )

    def load(self, manager, path) -> dict[str, Any]:
        """Restore model, optimizer, scheduler and shadows from `path`; return the rank state."""
        load_path, _ = self.deepspeed.load_checkpoint(
            str(path.parent),
            tag=path.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            load_module_strict=not self.lora,
        )
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint to load in {path}")
        for prefix, shadow in self.shadows.items():
            manager.load_shadow(path, prefix, shadow)
        return manager.load_rank_state(path)

    def close(self) -> None:
        self.release_gathered()
