"""From a config to the model DeepSpeed wraps: one documented order.

`build_training_model(config, info, deepspeed_config)` runs these steps, each a function here:

1. `build_base_model`: the spec of `model.preset` (`apex_dist.models.spec`) builds the plain
   model, with the seed `train.seed` (the same initial weights on every rank), under
   `deepspeed.zero.Init` for ZeRO-3 (each parameter partitioned as it is created, so no rank
   ever holds the whole model), else on the rank's device. Its E2 is a module of its own.
2. weights: a snapshot (`model.pretrained`) is streamed in through the spec, one tensor at a
   time (under ZeRO-3 one gathered parameter at a time, rank 0 reading); otherwise the random
   weights stay and the model is cast to `model.dtype`. The condition shift is always the
   config's (a snapshot that disagrees is reported by the loader).
3. E2 <- E1 (`init_apex_weights`, gathered under ZeRO-3): after random init, or by the loader
   when the snapshot has no E2 of its own. E2 starts exactly equal to E1.
4. `apply_lora_adapters` (`model.lora.enabled`): fp32 adapters on the spec's target modules,
   base frozen, E2 and a learnable shift trained in full in fp32.
5. `apply_kernels`: attention backend and fused kernels (`model.kernels`), logged.
6. `apply_activation_checkpointing` (`parallel.activation_checkpointing`).
7. `compile_model` (`model.kernels.compile_blocks`): torch.compile of each block.
8. DeepSpeed: `apex_dist.distributed.engine.TrainingEngine` hands the result to
   `deepspeed.initialize` with its optimizer and scheduler.

Under either ZeRO stage the random generator is consumed in this order: model weights in
construction order with E2 last, then LoRA's adapters (tests/test_golden_losses.py holds the
resulting losses). Nothing is deep-copied or repaired afterwards.
"""

from __future__ import annotations

import importlib.util

import deepspeed
import torch
from torch import nn

from apex_dist.config import Config
from apex_dist.distributed.runtime import RankInfo, logger
from apex_dist.models.conditioning import init_apex_weights
from apex_dist.models.spec import ModelSpec, model_spec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_training_model(config: Config, info: RankInfo, deepspeed_config: dict) -> nn.Module:
    """The velocity model as it will train: steps 1-7 of the module doc."""
    spec = model_spec(config.model.preset)
    model = build_base_model(config, spec, info, deepspeed_config)  # steps 1-3
    apply_lora_adapters(model, config, spec, info)
    apply_kernels(model, config, info.device)
    apply_activation_checkpointing(model, config)
    compile_model(model, config)
    return model


def _zero3_contexts(config: Config):
    """(write, read) parameter contexts: gathering ones under ZeRO-3, None otherwise."""
    if config.parallel.zero_stage != 3:
        return None, None
    from apex_dist.distributed.zero_loading import zero3_parameter_context, zero3_read_context

    return zero3_parameter_context, zero3_read_context


def build_base_model(
    config: Config, spec: ModelSpec, info: RankInfo, deepspeed_config: dict
) -> nn.Module:
    """Steps 1-3: the spec's model on its device (or partitioned), with its weights and E2."""
    dtype = DTYPES[config.model.dtype]
    stage3 = config.parallel.zero_stage == 3
    snapshot = config.model.pretrained
    architecture = spec.architecture(config.model)
    write_context, _ = _zero3_contexts(config)

    torch.manual_seed(config.train.seed)  # the same initial weights on every rank
    if stage3:
        from apex_dist.distributed.zero_loading import zero_init_config

        init_config = zero_init_config(deepspeed_config, dtype, override=True)
        context = deepspeed.zero.Init(config_dict_or_path=init_config)
    else:
        context = torch.device(info.device)
    with context:
        model = spec.build(architecture, config.method.condition_shift)

    if snapshot:
        # the loader casts to the dtype and sets E2 from E1 when the snapshot has none
        spec.load_pretrained(model, snapshot, dtype, write_context)
    else:
        init_apex_weights(model, write_context)
        if not stage3:
            model = model.to(device=info.device, dtype=dtype)
    return model


def apply_lora_adapters(model: nn.Module, config: Config, spec: ModelSpec, info: RankInfo) -> None:
    """Step 4: LoRA adapters on the spec's target modules (`model.lora`)."""
    if not config.model.lora.enabled:
        return
    from apex_dist.models.lora import apply_lora

    _, read_context = _zero3_contexts(config)
    apply_lora(
        model, config.model.lora, parameter_context=read_context, target_presets=spec.lora_targets
    )
    model.to(info.device)


def apply_activation_checkpointing(model: nn.Module, config: Config) -> None:
    """Step 6: recompute one block in `parallel.activation_checkpointing` in the backward."""
    every = config.parallel.activation_checkpointing
    if not every:
        return
    if not hasattr(model, "enable_activation_checkpointing"):
        raise ValueError(
            f"parallel.activation_checkpointing={every} but {type(model).__name__} has no "
            "blocks to checkpoint; set it to 0 for this model"
        )
    model.enable_activation_checkpointing(every)


def apply_kernels(model: nn.Module, config: Config, device: torch.device) -> str:
    """Step 5: apply `model.kernels` (attention backend, fused kernels) and log what was
    chosen for this device, with what step 7 will compile; a forced attention backend that
    cannot run here is an error. Returns the logged description."""
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
        blocks = getattr(model, "transformer_blocks", None)
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError(
                f"model.kernels.compile_blocks=true but {type(model).__name__} has no "
                "transformer_blocks to compile; set it to false for this model"
            )
        parts.append(f"torch.compile of {len(blocks)} blocks")
    description = "; ".join(parts)
    logger.info("kernels: %s", description)
    return description


def compile_model(model: nn.Module, config: Config) -> int:
    """Step 7: torch.compile each transformer block (`model.kernels.compile_blocks`); returns
    the number of compiled blocks (0 when off)."""
    if not config.model.kernels.compile_blocks:
        return 0
    import apex_kernels

    return apex_kernels.compile_blocks(model)
