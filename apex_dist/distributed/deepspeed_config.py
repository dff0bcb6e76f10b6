"""The DeepSpeed JSON of a run, generated from the apex_dist config (never written by hand).

`build_deepspeed_config(config, world_size)` maps the `train`, `optimizer`, `parallel` and
`model` sections onto DeepSpeed's keys:

- batch: ``train_micro_batch_size_per_gpu`` = train.micro_batch_size,
  ``gradient_accumulation_steps``, ``train_batch_size`` = their product times the world size;
- ``gradient_clipping`` = optimizer.grad_clip;
- precision: full fine-tuning in bf16 (fp16) turns on DeepSpeed's bf16 (fp16) mode, whose
  optimizer keeps fp32 master weights; LoRA keeps DeepSpeed in fp32 because the base is cast to
  the model dtype by apex_dist and the adapters stay fp32 (DeepSpeed's bf16 mode would cast the
  adapters too);
- ``zero_optimization``: the stage, optimizer and parameter offload to CPU or NVMe, and ZeRO++
  hierarchical partitioning (hpZ, ``zero_hpz_partition_size``) for multi-node ZeRO-3;
- the optimizer and scheduler are not in the JSON: the engine passes torch.optim.AdamW and a
  LambdaLR as client objects (DeepSpeed's own "AdamW" JIT-builds a fused kernel first).
"""

from __future__ import annotations

from typing import Any

from apex_dist.config import Config

# DeepSpeed prints its own step log every N steps; apex_dist logs itself, so effectively never.
DEEPSPEED_PRINT_INTERVAL = 1_000_000_000
# Elements per gradient reduction / parameter prefetch bucket (DeepSpeed's documented defaults
# are 5e8 and 5e7; these are the values its ZeRO-3 tutorial recommends for large models).
REDUCE_BUCKET_ELEMENTS = 200_000_000
PREFETCH_BUCKET_ELEMENTS = 50_000_000
# ZeRO-3 keeps parameters smaller than this gathered on every rank (DeepSpeed's default 1e5).
# Shadow weights (EMA, frozen copies) are swapped in through the partitions, so they need every
# parameter partitioned: the threshold is 0 when a shadow is kept.
PERSISTENCE_THRESHOLD = 100_000


def precision(config: Config) -> str:
    """'bf16', 'fp16' or 'fp32': the precision DeepSpeed itself runs in (see module doc)."""
    if config.model.lora.enabled:
        return "fp32"
    return config.model.dtype


def needs_partitioned_shadow(config: Config) -> bool:
    """True when the run keeps shadow weights of the trainable parameters (EMA, or the frozen
    starting weights of a full fine-tuning run with reference frozen_base)."""
    mode = config.method.reference.mode
    return mode == "ema" or (mode == "frozen_base" and not config.model.lora.enabled)


def _offload(device: str, nvme_path: str) -> dict[str, Any]:
    if device == "cpu":
        return {"device": "cpu", "pin_memory": True}
    return {"device": "nvme", "nvme_path": nvme_path, "pin_memory": True}


def build_deepspeed_config(config: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for `config` on `world_size` ranks."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1 (got {world_size})")
    train, parallel = config.train, config.parallel
    zero: dict[str, Any] = {
        "stage": parallel.zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": REDUCE_BUCKET_ELEMENTS,
    }
    if parallel.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(parallel.offload_optimizer, parallel.nvme_path)
    if parallel.zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = PREFETCH_BUCKET_ELEMENTS
        zero["stage3_param_persistence_threshold"] = (
            0 if needs_partitioned_shadow(config) else PERSISTENCE_THRESHOLD
        )
        # gathered 16-bit weights are never consolidated at save time: the converter reads
        # the partitions (no rank ever holds the whole model)
        zero["stage3_gather_16bit_weights_on_model_save"] = False
        if parallel.offload_params != "none":
            zero["offload_param"] = _offload(parallel.offload_params, parallel.nvme_path)
        if parallel.hierarchical_partition_size > 1:
            zero["zero_hpz_partition_size"] = parallel.hierarchical_partition_size
    mode = precision(config)
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train_batch_size": train.micro_batch_size * train.gradient_accumulation_steps * world_size,
        "gradient_clipping": config.optimizer.grad_clip,
        "bf16": {"enabled": mode == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": mode == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": DEEPSPEED_PRINT_INTERVAL,
        "wall_clock_breakdown": False,
    }
