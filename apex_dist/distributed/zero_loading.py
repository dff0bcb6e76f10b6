"""Parameter contexts for DeepSpeed ZeRO-3: load into, and read from, partitioned parameters.

Under `deepspeed.zero.Init` each parameter is split across ranks (its local tensor is a flat
shard; `ds_shape` is the full shape). The loaders in `apex_dist.models` take a
`parameter_context(parameter)` that wraps each access:

- `zero3_parameter_context` (writing): gathers the full parameter on every rank, yields True
  on rank 0 only (rank 0 reads the tensor from disk and fills it), then broadcasts rank 0's
  values and re-partitions on exit (`GatheredParameters(modifier_rank=0)`). One parameter is
  gathered at a time, so memory stays near one full tensor per rank.
- `zero3_read_context` (reading): gathers, yields True everywhere, re-partitions without
  writing back (`GatheredParameters(modifier_rank=None)`); for copying E2 or saving LoRA
  weights. Every rank must enter it for the same parameters in the same order.

Parameters that are not partitioned pass through untouched (True everywhere).
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Union

import deepspeed
import torch
from torch import nn

from apex_dist.models.loading import build_transformer, load_transformer_weights, resolve_dtype
from apex_dist.models.qwen_image import QwenImageTransformer

# Rank that reads checkpoint tensors from disk and whose values are broadcast to the others.
SOURCE_RANK = 0


def _is_partitioned(parameter: nn.Parameter) -> bool:
    return hasattr(parameter, "ds_id")


@contextlib.contextmanager
def zero3_parameter_context(parameter: nn.Parameter) -> Iterator[bool]:
    """Gather `parameter`; yield whether this rank fills it; broadcast from rank 0 and
    re-partition on exit."""
    if not _is_partitioned(parameter):
        yield True
        return
    with deepspeed.zero.GatheredParameters([parameter], modifier_rank=SOURCE_RANK):
        yield torch.distributed.get_rank() == SOURCE_RANK


@contextlib.contextmanager
def zero3_read_context(parameter: nn.Parameter) -> Iterator[bool]:
    """Gather `parameter` for reading on every rank; re-partition on exit, nothing written."""
    if not _is_partitioned(parameter):
        yield True
        return
    with deepspeed.zero.GatheredParameters([parameter], modifier_rank=None):
        yield True


def zero_init_config(
    deepspeed_config: Optional[Union[dict[str, Any], str, Path]],
    dtype: torch.dtype,
    *,
    override: bool = False,
) -> dict[str, Any]:
    """The DeepSpeed config for `zero.Init` with its bf16/fp16 switches matching `dtype`.

    `zero.Init` takes its parameter dtype from these switches: its own `dtype` argument is
    ignored on devices without fp16 (DeepSpeed 0.19.8 then always picks bf16), so the dtype
    is passed through the config. Missing switches are filled in; contradicting ones raise,
    unless `override` (a LoRA run keeps DeepSpeed in fp32 while its base is built in
    `model.dtype`), which sets them to `dtype` whatever the config says.
    """
    if deepspeed_config is None:
        config: dict[str, Any] = {"train_micro_batch_size_per_gpu": 1}
    elif isinstance(deepspeed_config, (str, Path)):
        config = json.loads(Path(deepspeed_config).read_text())
    else:
        config = copy.deepcopy(dict(deepspeed_config))
    wanted = {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}
    for section, enabled in wanted.items():
        current = config.setdefault(section, {}).get("enabled")
        if override:
            config[section] = {"enabled": enabled}
        elif current is None:
            config[section]["enabled"] = enabled
        elif bool(current) != enabled:
            raise ValueError(
                f"DeepSpeed config has {section}.enabled={current} but the model is loaded in "
                f"{dtype}: make model.dtype and the DeepSpeed precision agree"
            )
    return config


def load_pretrained_transformer_zero3(
    snapshot: Union[str, Path],
    dtype: Union[str, torch.dtype],
    deepspeed_config: Optional[Union[dict[str, Any], str, Path]] = None,
    **shift_options: Any,
) -> QwenImageTransformer:
    """Build the snapshot's transformer under `deepspeed.zero.Init` (partitioned as it is
    created, in `dtype`) and stream its weights in, one gathered parameter at a time.

    Every rank must call this (the gathers are collective); only rank 0 reads tensor data.
    """
    resolved = resolve_dtype(dtype)
    init_context = deepspeed.zero.Init(
        config_dict_or_path=zero_init_config(deepspeed_config, resolved)
    )
    model = build_transformer(snapshot, init_context=init_context, **shift_options)
    load_transformer_weights(model, snapshot, resolved, parameter_context=zero3_parameter_context)
    return model
