"""Export an apex_dist DeepSpeed checkpoint to files that diffusers and ComfyUI load.

Modes (`ExportOptions.mode`):

- ``full``: the whole transformer in diffusers' layout: `config.json`,
  `diffusion_pytorch_model.safetensors` or `diffusion_pytorch_model-0000k-of-0000N.safetensors`
  with `diffusion_pytorch_model.safetensors.index.json`. The APEX-only keys (E2
  `time_text_embed_2.*`, `condition_shift.*`) are left out unless `keep_apex_keys`, because
  diffusers refuses unknown keys; apex_dist's own loader reads either form.
- ``lora``: the adapters only: `pytorch_lora_weights.safetensors` in diffusers' format
  (`transformer.<module>.lora_A.weight` / `lora_B.weight`, rank and alpha in the
  `lora_adapter_metadata` header entry) and/or `pytorch_lora_weights_comfyui.safetensors`
  with ComfyUI's native names (`diffusion_model.<module>.lora_down.weight` / `lora_up.weight`
  / `alpha`). The fully trained APEX tensors (E2, a learnable shift) go to
  `apex_extra_weights.safetensors` under apex_dist's names.
- ``merged``: base weights from a local snapshot with W + (alpha / rank) * B @ A folded in,
  written like ``full``.

Tensors are produced chunk by chunk from the ZeRO partitions (and the base files) straight
into the output files, so memory stays near one chunk (a row block for merged weights)
whatever the model size. Output goes to a temporary directory next to the target that is
renamed only when every file (and, with `verify`, every comparison) succeeded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open

from apex_dist.config import ConditionShiftConfig
from apex_dist.export.deepspeed_checkpoint import (
    DEFAULT_CHUNK_ELEMENTS,
    DeepSpeedCheckpoint,
    TensorSource,
)
from apex_dist.export.safetensors_io import (
    OutputTensor,
    plan_shards,
    read_safetensors_header,
    tensor_chunks,
    write_safetensors,
)
from apex_dist.export.torch_archive import CheckpointFormatError, LazyTensor
from apex_dist.method.sampler import ONE_STEP_TIME
from apex_dist.models.conditioning import DEFAULT_CONDITION_SHIFT, is_apex_key
from apex_dist.models.fold import E2_KEYS, FOLD_BIAS_KEY, FOLD_INFO_KEY, FOLD_MODULE, fold_offset
from apex_dist.models.loading import transformer_directory
from apex_dist.models.lora import to_diffusers_lora
from apex_dist.models.qwen_image import QwenImageTransformer
from apex_dist.models.spec import ModelSpec, model_specs
from apex_dist.models.specs.qwen_image import SPEC as QWEN_IMAGE_SPEC

# diffusers' file names (diffusers/utils/constants.py and loaders/lora_base.py).
DIFFUSERS_CONFIG_NAME = "config.json"
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_SHARD_NAME = "diffusion_pytorch_model-{index:05d}-of-{count:05d}.safetensors"
DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"
DIFFUSERS_LORA_METADATA_KEY = "lora_adapter_metadata"
# The prefix diffusers' Qwen-Image pipeline gives the transformer's keys (LoRA metadata too),
# declared by the model spec.
DIFFUSERS_LORA_PREFIX = QWEN_IMAGE_SPEC.diffusers_lora_prefix
# ComfyUI's native LoRA naming, declared by the model spec (`ModelSpec.comfyui_lora_keys`):
# the model's own state-dict prefix for the diffusion model and the lora_down (A) / lora_up (B)
# / alpha suffixes (comfy/weight_adapter/lora.py reads "<key>.lora_up.weight",
# "<key>.lora_down.weight" and "<key>.alpha").
COMFYUI_LORA_NAME = "pytorch_lora_weights_comfyui.safetensors"
COMFYUI_PREFIX = QWEN_IMAGE_SPEC.comfyui_lora_prefix
APEX_EXTRA_NAME = "apex_extra_weights.safetensors"
EXPORT_INFO_NAME = "export_info.json"
# The scheduler a stock diffusers pipeline should sample a folded export with, in the folder
# diffusers' `from_pretrained(..., subfolder=...)` reads.
SCHEDULER_FOLDER = "scheduler"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
# Qwen-Image's released scheduler settings (its snapshot's scheduler/scheduler_config.json),
# used when no base snapshot is at hand, with `shift_terminal` turned off: Qwen-Image's 0.02
# stretches the one-step sigmas [1] into NaN, while without it one step samples at sigmas
# [1, 0], the folded time. The shift settings have no effect at sigma 1.
ONE_STEP_SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": math.log(3),
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": math.log(3),
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
# ComfyUI's key for a bias added to a module's own (comfy/lora.py, `load_lora`: "<key>.diff_b"
# patches "<module>.bias").
COMFYUI_BIAS_DIFF_SUFFIX = "diff_b"
# Default shard size of the full export: diffusers' save_pretrained default is 10 GB; 5 GB
# keeps each file comfortably below common upload limits.
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3
# Rows of the base weight merged at once: bounds the merge's working memory independently of
# the layer width.
MERGE_ROW_BLOCK_ELEMENTS = 4 * 1024 * 1024
# peft's LoRA parameter names: <module>.lora_A.<adapter>.weight (also lora_B).
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])\.(?P<adapter>[^.]+)\.weight$")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelMismatchError(ValueError):
    """The checkpoint's tensors do not fit the model it is exported as."""


@dataclass
class ExportOptions:
    """What to export and how (the command-line options of tools/convert_checkpoint.py).

    Attributes:
        mode: "full", "lora", "merged", or "auto" (lora for LoRA checkpoints, else full).
        weights: "trained" (the optimizer's fp32 master weights) or "ema".
        dtype: output dtype name (fp32, bf16, fp16); None: bf16 for full/merged, fp32 for lora.
        max_shard_bytes: largest safetensors shard of a full/merged export.
        keep_apex_keys: keep E2 and the condition shift in a full/merged export (raw weights
            for apex_dist's loader: no fold).
        fold_time: the one-step sampling time E2 is folded into E1's last bias for (see
            `apex_dist.models.fold`), so that stock clients run the student at one step;
            None writes the raw weights (the adapters as trained).
        lora_formats: "diffusers" and/or "comfyui".
        base: snapshot (or transformer folder) with the base weights, for mode merged.
        preset / model_config: the model to check the checkpoint against, overriding the
            checkpoint's config.yaml.
        lora_alpha: LoRA alpha, overriding config.yaml's model.lora.alpha.
        verify: reread every written tensor and compare it with its source.
        overwrite: replace an existing output directory.
        chunk_elements: largest piece read or written at once.
    """

    mode: Literal["auto", "full", "lora", "merged"] = "auto"
    weights: Literal["trained", "ema"] = "trained"
    dtype: str | None = None
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    keep_apex_keys: bool = False
    fold_time: float | None = ONE_STEP_TIME
    lora_formats: tuple[str, ...] = ("diffusers",)
    base: Path | None = None
    preset: str | None = None
    model_config: Path | None = None
    lora_alpha: float | None = None
    verify: bool = False
    overwrite: bool = False
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS


@dataclass
class ExportReport:
    """What an export wrote."""

    output: Path
    mode: str
    files: list[str] = field(default_factory=list)
    tensors: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    verified: bool = False

    def count(self, outputs: list[OutputTensor]) -> None:
        """Add written tensors to the totals."""
        self.tensors += len(outputs)
        self.bytes_written += sum(tensor.byte_size() for tensor in outputs)


# --------------------------------------------------------------------------------------------
# the model the checkpoint is checked against


def nested(mapping: Any, *keys: str) -> Any:
    """mapping[keys[0]][keys[1]]..., or None where a level is missing or not a dict."""
    for key in keys:
        if not isinstance(mapping, dict) or key not in mapping:
            return None
        mapping = mapping[key]
    return mapping


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointFormatError(f"cannot read {path}: {error}") from error


def condition_shift_of(run_config: dict | None) -> ConditionShiftConfig:
    """`method.condition_shift` of a run's recorded config.yaml (the schema's defaults for what
    it does not say)."""
    shift = nested(run_config, "method", "condition_shift") or {}
    return ConditionShiftConfig(
        scale=float(shift.get("scale", DEFAULT_CONDITION_SHIFT.scale)),
        bias=float(shift.get("bias", DEFAULT_CONDITION_SHIFT.bias)),
        learnable=bool(shift.get("learnable", DEFAULT_CONDITION_SHIFT.learnable)),
    )


def build_reference_model(
    checkpoint: DeepSpeedCheckpoint, options: ExportOptions
) -> tuple[QwenImageTransformer, str]:
    """The model (on the meta device) whose names and shapes the export must match, and a
    description of where its configuration came from."""
    run_config = checkpoint.run_config or {}
    condition_shift = condition_shift_of(run_config)
    exportable = exportable_presets()
    snapshot = nested(run_config, "model", "pretrained")
    preset = nested(run_config, "model", "preset")
    if options.model_config is not None:
        source = ("config", Path(options.model_config), f"--model-config {options.model_config}")
    elif options.preset is not None:
        source = ("preset", options.preset, f"--preset {options.preset}")
    elif options.base is not None:
        folder = transformer_directory(options.base)
        source = ("config", folder / DIFFUSERS_CONFIG_NAME, f"--base {options.base}")
    elif snapshot and Path(snapshot).is_dir():
        folder = transformer_directory(snapshot)
        source = ("config", folder / DIFFUSERS_CONFIG_NAME, "config.yaml model.pretrained")
    elif preset is not None:
        source = ("preset", preset, f"config.yaml model.preset={preset}")
    else:
        raise ModelMismatchError(
            f"{checkpoint.tag_directory} has no config.yaml naming the model; pass --preset "
            f"(one of {', '.join(exportable)}) or --model-config CONFIG_JSON"
        )
    kind, value, description = source
    with torch.device("meta"):
        if kind == "config":
            model = QWEN_IMAGE_SPEC.build(_read_json(value), condition_shift)
        elif value in exportable:
            spec = exportable[value]
            model = spec.build(spec.presets[value], condition_shift)
        else:
            raise ModelMismatchError(
                f"model {value!r} ({description}) cannot be exported to the diffusers layout: "
                f"only Qwen-Image models can ({', '.join(exportable)})"
            )
    return model, description


def exportable_presets() -> dict[str, ModelSpec]:
    """Preset -> spec, for the families whose specs declare diffusers' LoRA format (the
    Qwen-Image transformer's layout)."""
    return {
        preset: spec
        for spec in model_specs().values()
        if spec.diffusers_lora_prefix is not None
        for preset in spec.presets
    }


# --------------------------------------------------------------------------------------------
# LoRA names


@dataclass
class LoraModule:
    """One adapted linear layer: its module path and the A (rank, in) / B (out, rank) sources."""

    module: str
    down: TensorSource
    up: TensorSource

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def collect_lora_modules(sources: dict[str, TensorSource]) -> dict[str, LoraModule]:
    """Group peft's `<module>.lora_A/B.<adapter>.weight` tensors by module."""
    halves: dict[str, dict[str, TensorSource]] = {}
    adapters = set()
    for name, source in sources.items():
        match = LORA_KEY.match(name)
        if match is None:
            continue
        adapters.add(match["adapter"])
        halves.setdefault(match["module"], {})[match["side"]] = source
    if len(adapters) > 1:
        raise ModelMismatchError(
            f"the checkpoint holds several LoRA adapters ({', '.join(sorted(adapters))}); "
            "export supports one"
        )
    modules = {}
    for module, sides in halves.items():
        if set(sides) != {"A", "B"}:
            raise ModelMismatchError(f"LoRA module {module} has only lora_{''.join(sides)}")
        modules[module] = LoraModule(module, sides["A"], sides["B"])
    return modules


def diffusers_lora_names(module: str) -> tuple[str, str]:
    """diffusers' names of a module's (A, B) LoRA weights, by apex_dist.models.lora's mapping.

    `to_diffusers_lora` renames apex keys one to one (and scales nothing without `alpha`); it
    is applied to meta tensors, so no data is touched.
    """
    apex_down, apex_up = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
    placeholder = torch.empty(0, device="meta")
    converted = to_diffusers_lora({apex_down: placeholder, apex_up: placeholder})
    down = [name for name in converted if name.endswith(".lora_A.weight")]
    up = [name for name in converted if name.endswith(".lora_B.weight")]
    if len(converted) != 2 or len(down) != 1 or len(up) != 1:
        raise ModelMismatchError(f"cannot name the LoRA of {module} in diffusers' format")
    return down[0], up[0]


def comfyui_lora_names(module: str) -> tuple[str, str, str]:
    """ComfyUI's names of a module's (down = A, up = B, alpha) LoRA tensors (the spec's)."""
    return QWEN_IMAGE_SPEC.comfyui_lora_keys(module)


# --------------------------------------------------------------------------------------------
# checks


def check_against_model(
    model: QwenImageTransformer,
    description: str,
    trainable: dict[str, TensorSource],
    buffers: dict[str, TensorSource],
    lora_modules: dict[str, LoraModule],
    need_complete: bool,
) -> None:
    """Raise ModelMismatchError listing every tensor that does not fit `model`."""
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    problems = []
    lora_names = set()
    for module in lora_modules.values():
        lora_names.update({module.down.name, module.up.name})
        weight = expected.get(f"{module.module}.weight")
        if weight is None or len(weight) != 2:
            problems.append(f"LoRA on {module.module}: the model has no linear layer there")
            continue
        out_features, in_features = weight
        if tuple(module.down.shape) != (module.rank, in_features) or tuple(module.up.shape) != (
            out_features,
            module.rank,
        ):
            problems.append(
                f"LoRA on {module.module}: A {tuple(module.down.shape)} and B "
                f"{tuple(module.up.shape)} do not fit the weight {weight}"
            )
    base_names = {}
    for name, source in {**buffers, **trainable}.items():
        if name in lora_names:
            continue
        plain = name.replace(".base_layer.", ".")  # peft's wrapped base weights
        base_names[plain] = source
        if plain not in expected:
            problems.append(f"{name}: not a tensor of the model")
        elif tuple(source.shape) != expected[plain]:
            problems.append(
                f"{name}: shape {tuple(source.shape)} in the checkpoint, {expected[plain]} in "
                "the model"
            )
    if need_complete:
        missing = [name for name in expected if not is_apex_key(name) and name not in base_names]
        if missing:
            shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
            problems.append(f"{len(missing)} model tensors are not in the checkpoint: {shown}")
    if problems:
        raise ModelMismatchError(
            f"the checkpoint does not match the model from {description}: "
            + "; ".join(problems)
            + ". Pass --preset or --model-config for the model the run trained"
        )


# --------------------------------------------------------------------------------------------
# producers


def _source_output(name: str, source: TensorSource, dtype: torch.dtype, chunk: int):
    out_dtype = dtype if source.dtype.is_floating_point else source.dtype
    return OutputTensor(name, tuple(source.shape), out_dtype, lambda: source.chunks(chunk))


def _lazy_output(name: str, tensor: LazyTensor, dtype: torch.dtype, chunk: int):
    out_dtype = dtype if tensor.dtype.is_floating_point else tensor.dtype
    return OutputTensor(name, tuple(tensor.shape), out_dtype, lambda: tensor_chunks(tensor, chunk))


def merged_rows(
    base: LazyTensor | TensorSource, module: LoraModule, scale: float, row_block_elements: int
) -> Iterator[torch.Tensor]:
    """W + scale * B @ A in fp32, one block of rows at a time."""
    down = module.down.read().float()  # (rank, in)
    up = module.up.read().float()  # (out, rank)
    rows, columns = base.shape
    block = max(1, row_block_elements // max(columns, 1))
    for start in range(0, rows, block):
        count = min(block, rows - start)
        weight = base.read_range(start * columns, count * columns).view(count, columns).float()
        yield (weight + (up[start : start + count] @ down) * scale).reshape(-1)


def _merged_output(
    name: str,
    base: LazyTensor | TensorSource,
    module: LoraModule,
    scale: float,
    dtype: torch.dtype,
) -> OutputTensor:
    return OutputTensor(
        name,
        tuple(base.shape),
        dtype,
        lambda: merged_rows(base, module, scale, MERGE_ROW_BLOCK_ELEMENTS),
    )


def _model_tensor_output(
    name: str,
    plain_sources: dict[str, TensorSource],
    base_tensors: dict[str, LazyTensor],
    lora_modules: dict[str, LoraModule],
    alpha: float,
    dtype: torch.dtype,
    chunk: int,
) -> OutputTensor:
    """A model tensor: the checkpoint's (else the base's), with its LoRA merged if it has one."""
    base = plain_sources.get(name)
    module = lora_modules.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
    if module is not None:
        return _merged_output(
            name,
            base if base is not None else base_tensors[name],
            module,
            alpha / module.rank,
            dtype,
        )
    if base is not None:
        return _source_output(name, base, dtype, chunk)
    return _lazy_output(name, base_tensors[name], dtype, chunk)


def read_base_snapshot(path: Path) -> dict[str, LazyTensor]:
    """The tensors (lazy, no data read) of a diffusers transformer snapshot.

    Every file's header is checked (`read_safetensors_header`: offsets inside the file, not
    overlapping, dtypes known, sizes matching shapes); a tensor stored in two files, or a
    sharded index that names a tensor its file lacks, is refused as well.
    """
    folder = transformer_directory(path)
    index = folder / DIFFUSERS_INDEX_NAME
    weight_map = None
    if index.is_file():
        content = _read_json(index)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(file, str) for file in weight_map.values()
        ):
            raise CheckpointFormatError(f"{index} has no weight_map of tensor name -> file name")
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(item.name for item in folder.glob("*.safetensors"))
    if not files:
        raise CheckpointFormatError(f"{folder} holds no .safetensors weights")
    tensors: dict[str, LazyTensor] = {}
    stored_in: dict[str, str] = {}
    for file in files:
        if Path(file).name != file:
            raise CheckpointFormatError(
                f"{index} names weight file {file!r} outside {folder}: only file names are allowed"
            )
        for name, tensor in read_safetensors_header(folder / file)[0].items():
            if name in tensors:
                raise CheckpointFormatError(
                    f"base snapshot {folder}: tensor {name!r} is stored twice, in "
                    f"{stored_in[name]} and {file}"
                )
            tensors[name], stored_in[name] = tensor, file
    for name, file in (weight_map or {}).items():
        if stored_in.get(name) != file:
            raise CheckpointFormatError(
                f"{index} puts tensor {name!r} in {file}, but "
                + (f"it is in {stored_in[name]}" if name in stored_in else "no file holds it")
                + ": the index does not belong to these files"
            )
    return tensors


# --------------------------------------------------------------------------------------------
# the export


def _lora_alpha(checkpoint: DeepSpeedCheckpoint, options: ExportOptions, rank: int) -> float:
    if options.lora_alpha is not None:
        return float(options.lora_alpha)
    lora = nested(checkpoint.run_config, "model", "lora") or {}
    if "alpha" not in lora:
        raise ModelMismatchError(
            f"LoRA alpha unknown: {checkpoint.tag_directory}/config.yaml has no model.lora.alpha; "
            "pass --lora-alpha (the alpha the run trained with)"
        )
    if "rank" in lora and int(lora["rank"]) != rank:
        raise ModelMismatchError(
            f"config.yaml model.lora.rank is {lora['rank']} but the checkpoint's adapters have "
            f"rank {rank}"
        )
    return float(lora["alpha"])


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


def _write_sharded(
    directory: Path, outputs: list[OutputTensor], max_shard_bytes: int, report: ExportReport
) -> dict[str, str]:
    shards = plan_shards(outputs, max_shard_bytes)
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        name = (
            DIFFUSERS_WEIGHTS_NAME
            if len(shards) == 1
            else DIFFUSERS_SHARD_NAME.format(index=index, count=len(shards))
        )
        write_safetensors(directory / name, shard, metadata={"format": "pt"})
        report.files.append(name)
        weight_map.update({tensor.name: name for tensor in shard})
    if len(shards) > 1:
        total = sum(tensor.byte_size() for tensor in outputs)
        _write_json(
            directory / DIFFUSERS_INDEX_NAME,
            {"metadata": {"total_size": total}, "weight_map": weight_map},
        )
        report.files.append(DIFFUSERS_INDEX_NAME)
    report.count(outputs)
    return weight_map


def _verify(directory: Path, file_outputs: dict[str, list[OutputTensor]]) -> None:
    """Reread each written tensor with the safetensors library and compare it exactly with a
    fresh production of its source (cast to the output dtype)."""
    for file_name, outputs in file_outputs.items():
        with safe_open(directory / file_name, framework="pt") as handle:
            stored_names = set(handle.keys())
            expected_names = {tensor.name for tensor in outputs}
            if stored_names != expected_names:
                raise CheckpointFormatError(
                    f"verify: {file_name} holds {len(stored_names)} tensors, expected "
                    f"{len(expected_names)} (differences: "
                    f"{sorted(stored_names ^ expected_names)[:5]})"
                )
            for tensor in outputs:
                stored = handle.get_tensor(tensor.name).reshape(-1)
                position = 0
                for chunk in tensor.produce():
                    expected = chunk.reshape(-1).to(tensor.dtype)
                    written = stored[position : position + expected.numel()]
                    if not torch.equal(written, expected):
                        difference = (written.double() - expected.double()).abs().max().item()
                        raise CheckpointFormatError(
                            f"verify: {file_name}: tensor {tensor.name} differs from the "
                            f"checkpoint near element {position} (max abs difference "
                            f"{difference:.3g})"
                        )
                    position += expected.numel()
                if position != stored.numel():
                    raise CheckpointFormatError(
                        f"verify: {file_name}: tensor {tensor.name} has {stored.numel()} "
                        f"elements, the checkpoint {position}"
                    )
                del stored


@dataclass
class ExportPlan:
    """Everything an export reads, checked before anything is written."""

    checkpoint: DeepSpeedCheckpoint
    mode: str
    dtype_name: str
    model: QwenImageTransformer
    description: dict
    lora_modules: dict[str, LoraModule]
    plain_sources: dict[str, TensorSource]
    base_tensors: dict[str, LazyTensor]
    fold_time: float | None = None
    fold: torch.Tensor | None = None  # d = fold_time * E2(0), (D,) fp32

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def model_order(self) -> list[str]:
        return list(self.model.state_dict())


def _trained_or_ema(checkpoint: DeepSpeedCheckpoint, weights: str) -> dict[str, TensorSource]:
    """The checkpoint's trainable tensors (frozen ones included), or their EMA."""
    trainable = {**checkpoint.frozen, **checkpoint.parameters}
    if weights == "ema":
        ema = checkpoint.ema_parameters()
        missing = sorted(set(checkpoint.parameters) - set(ema))
        if missing:
            raise CheckpointFormatError(
                f"the EMA files of {checkpoint.tag_directory} lack {len(missing)} trainable "
                f"parameters (e.g. {missing[0]}): they do not belong to this checkpoint"
            )
        trainable.update(ema)
    return trainable


def _resolve_mode(requested: str, has_lora: bool, checkpoint: DeepSpeedCheckpoint, base) -> str:
    mode = requested if requested != "auto" else ("lora" if has_lora else "full")
    if mode in ("lora", "merged") and not has_lora:
        raise ModelMismatchError(
            f"mode {mode} needs a LoRA checkpoint, but {checkpoint.tag_directory} has no "
            "lora_A/lora_B tensors; use --mode full"
        )
    if mode == "full" and has_lora:
        raise ModelMismatchError(
            f"{checkpoint.tag_directory} is a LoRA checkpoint (its base weights are not saved); "
            "use --mode lora, or --mode merged --base SNAPSHOT_DIR for full weights"
        )
    if mode == "merged" and base is None:
        raise ModelMismatchError("mode merged needs --base SNAPSHOT_DIR with the base weights")
    return mode


def _checked_base(
    base: Path, model: QwenImageTransformer, plain_sources: dict[str, TensorSource]
) -> dict[str, LazyTensor]:
    """The base snapshot's tensors, checked against the model before anything is written."""
    base_tensors = read_base_snapshot(base)
    expected_shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    problems = [
        f"{name} missing"
        if name not in base_tensors
        else f"{name} has shape {tuple(base_tensors[name].shape)}, expected {expected_shapes[name]}"
        for name in expected_shapes
        if not is_apex_key(name)
        and name not in plain_sources
        and (name not in base_tensors or tuple(base_tensors[name].shape) != expected_shapes[name])
    ]
    if problems:
        raise ModelMismatchError(
            f"base snapshot {base} does not fit the model ({len(problems)} problems, e.g. "
            f"{'; '.join(problems[:4])}): it is not the model the LoRA was trained on"
        )
    return base_tensors


def plan_export(
    checkpoint_path: str | os.PathLike, options: ExportOptions, tag: str | None = None
) -> ExportPlan:
    """Open and check every input of an export (nothing is written)."""
    checkpoint = DeepSpeedCheckpoint.open(checkpoint_path, tag)
    trainable = _trained_or_ema(checkpoint, options.weights)
    lora_modules = collect_lora_modules(trainable)
    mode = _resolve_mode(options.mode, bool(lora_modules), checkpoint, options.base)
    dtype_name = options.dtype or ("fp32" if mode == "lora" else "bf16")
    if dtype_name not in DTYPES:
        raise ValueError(f"dtype {dtype_name!r} is unknown; choose one of {', '.join(DTYPES)}")
    model, description = build_reference_model(checkpoint, options)
    check_against_model(
        model, description, trainable, checkpoint.buffers, lora_modules, mode == "full"
    )
    lora_names = {
        name for module in lora_modules.values() for name in (module.down.name, module.up.name)
    }
    plain_sources = {
        name.replace(".base_layer.", "."): source
        for name, source in {**checkpoint.buffers, **trainable}.items()
        if name not in lora_names
    }
    base_tensors = (
        _checked_base(Path(options.base), model, plain_sources) if mode == "merged" else {}
    )
    plan = ExportPlan(
        checkpoint,
        mode,
        dtype_name,
        model,
        description,
        lora_modules,
        plain_sources,
        base_tensors,
    )
    fold_time = None if options.keep_apex_keys else options.fold_time
    if fold_time is not None:
        if not 0 < fold_time <= 1:
            raise ValueError(f"fold time {fold_time} must be in (0, 1] (one-step: 1)")
        plan.fold_time = float(fold_time)
        plan.fold = fold_offset(_target_embedding_state(plan, options), plan.fold_time)
    return plan


def _materialise(output: OutputTensor) -> torch.Tensor:
    flat = torch.cat([chunk.reshape(-1).to(output.dtype) for chunk in output.produce()])
    return flat.view(output.shape)


def _target_embedding_state(plan: ExportPlan, options: ExportOptions) -> dict[str, torch.Tensor]:
    """E2's tensors in fp32 (its adapters merged, if it has any): what the fold is made of."""
    missing = [name for name in E2_KEYS if name not in plan.plain_sources]
    if missing:
        raise ModelMismatchError(
            f"{plan.checkpoint.tag_directory} has no trained second time embedding ({missing[0]} "
            "missing), so there is nothing to fold: pass --no-fold to export it as it is"
        )
    adapted = [plan.lora_modules[n] for n in plan.lora_modules if f"{n}.weight" in E2_KEYS]
    alpha = _lora_alpha(plan.checkpoint, options, adapted[0].rank) if adapted else 1.0
    return {
        name: _materialise(
            _model_tensor_output(
                name,
                plan.plain_sources,
                {},
                plan.lora_modules,
                alpha,
                torch.float32,
                options.chunk_elements,
            )
        )
        for name in E2_KEYS
    }


def _plus(output: OutputTensor, offset: torch.Tensor) -> OutputTensor:
    """`output` with `offset` added (in fp32, before the cast to the output dtype)."""
    return OutputTensor(
        output.name,
        output.shape,
        output.dtype,
        lambda: [_materialise(dataclasses.replace(output, dtype=torch.float32)) + offset],
    )


def _tensor_output(name: str, value: torch.Tensor, dtype: torch.dtype) -> OutputTensor:
    return OutputTensor(name, tuple(value.shape), dtype, lambda: [value.reshape(-1)])


def _fold_info(plan: ExportPlan, info: dict) -> None:
    info[FOLD_INFO_KEY] = (
        {"time": plan.fold_time, "bias_key": FOLD_BIAS_KEY} if plan.fold is not None else None
    )


def _write_scheduler(staging: Path, options: ExportOptions, report: ExportReport) -> None:
    """The one-step scheduler config: the base snapshot's, with shift_terminal off."""
    config = dict(ONE_STEP_SCHEDULER_CONFIG)
    if options.base is not None:
        snapshot = Path(options.base)
        for candidate in (snapshot, snapshot.parent):
            found = candidate / SCHEDULER_FOLDER / SCHEDULER_CONFIG_NAME
            if found.is_file():
                config = {**_read_json(found), "shift_terminal": None}
                break
    (staging / SCHEDULER_FOLDER).mkdir()
    _write_json(staging / SCHEDULER_FOLDER / SCHEDULER_CONFIG_NAME, config)
    report.files.append(f"{SCHEDULER_FOLDER}/{SCHEDULER_CONFIG_NAME}")


def _extras_outputs(plan: ExportPlan, alpha: float, chunk: int) -> list[OutputTensor]:
    """E2 and the condition shift as trained, in fp32 and apex_dist's names (adapters on E2
    merged): what apex_dist's loaders and the multi-step pipeline need besides the model."""
    return [
        _model_tensor_output(
            name, plan.plain_sources, {}, plan.lora_modules, alpha, torch.float32, chunk
        )
        for name in plan.model_order
        if is_apex_key(name) and name in plan.plain_sources
    ]


def _write_full(
    staging: Path, plan: ExportPlan, options: ExportOptions, report: ExportReport, info: dict
) -> dict[str, list[OutputTensor]]:
    """Full or merged weights in diffusers' snapshot layout (transformer folder); folded, E2
    and the condition shift go to the extras file."""
    chunk, dtype, sources = options.chunk_elements, plan.dtype, plan.plain_sources
    outputs = []
    alpha = 1.0
    if plan.mode == "full":
        for name in plan.model_order:
            if name in sources and (options.keep_apex_keys or not is_apex_key(name)):
                outputs.append(_source_output(name, sources[name], dtype, chunk))
    else:
        first = next(iter(plan.lora_modules.values()))
        alpha = _lora_alpha(plan.checkpoint, options, first.rank)
        info["lora_alpha"] = alpha
        for name in plan.model_order:
            if is_apex_key(name) and not (options.keep_apex_keys and name in sources):
                continue
            outputs.append(
                _model_tensor_output(
                    name, sources, plan.base_tensors, plan.lora_modules, alpha, dtype, chunk
                )
            )
    if plan.fold is not None:
        outputs = [
            _plus(tensor, plan.fold) if tensor.name == FOLD_BIAS_KEY else tensor
            for tensor in outputs
        ]
    weight_map = _write_sharded(staging, outputs, options.max_shard_bytes, report)
    file_outputs: dict[str, list[OutputTensor]] = {}
    for tensor in outputs:
        file_outputs.setdefault(weight_map[tensor.name], []).append(tensor)
    _write_json(staging / DIFFUSERS_CONFIG_NAME, plan.model.diffusers_config())
    report.files.append(DIFFUSERS_CONFIG_NAME)
    info["apex_keys"] = "kept" if options.keep_apex_keys else f"in {APEX_EXTRA_NAME}"
    if not options.keep_apex_keys:
        _write_extras(staging, _extras_outputs(plan, alpha, chunk), file_outputs, report)
    return file_outputs


def _write_file(
    staging: Path,
    name: str,
    outputs: list[OutputTensor],
    metadata: dict[str, str],
    file_outputs: dict[str, list[OutputTensor]],
    report: ExportReport,
) -> None:
    """One safetensors file of the export, recorded for --verify and the report."""
    write_safetensors(staging / name, outputs, metadata)
    file_outputs[name] = outputs
    report.files.append(name)
    report.count(outputs)


def _write_extras(
    staging: Path,
    extras: list[OutputTensor],
    file_outputs: dict[str, list[OutputTensor]],
    report: ExportReport,
) -> None:
    if extras:
        _write_file(staging, APEX_EXTRA_NAME, extras, {"format": "pt"}, file_outputs, report)


def _diffusers_lora_outputs(
    plan: ExportPlan, modules: list[LoraModule], rank: int, alpha: float, dtype, chunk: int
) -> tuple[list[OutputTensor], list[str]]:
    """The diffusers file's tensors and target modules. Folded, every module also gets a
    `lora_B.bias` (peft's lora_bias): zero, except d * rank / alpha on E1's last layer, which
    becomes a (zero-weight) adapter of its own if it was not a LoRA target."""
    outputs, targets = [], []
    for module in modules:
        down_name, up_name = diffusers_lora_names(module.module)
        outputs.append(_source_output(down_name, module.down, dtype, chunk))
        outputs.append(_source_output(up_name, module.up, dtype, chunk))
        targets.append(module.module)
    if plan.fold is None:
        return outputs, targets
    if FOLD_MODULE not in targets:
        out_features, in_features = plan.model.get_submodule(FOLD_MODULE).weight.shape
        down_name, up_name = diffusers_lora_names(FOLD_MODULE)
        outputs.append(_tensor_output(down_name, torch.zeros(rank, in_features), dtype))
        outputs.append(_tensor_output(up_name, torch.zeros(out_features, rank), dtype))
        targets.append(FOLD_MODULE)
    for module in targets:
        out_features = plan.model.get_submodule(module).weight.shape[0]
        bias = plan.fold * (rank / alpha) if module == FOLD_MODULE else torch.zeros(out_features)
        up_name = diffusers_lora_names(module)[1]
        outputs.append(_tensor_output(up_name.removesuffix(".weight") + ".bias", bias, dtype))
    return outputs, targets


def _write_lora(
    staging: Path, plan: ExportPlan, options: ExportOptions, report: ExportReport, info: dict
) -> dict[str, list[OutputTensor]]:
    """Adapters in diffusers' and/or ComfyUI's naming (the fold as a bias adapter), and the
    APEX extras file."""
    chunk, dtype = options.chunk_elements, plan.dtype
    ranks = {module.rank for module in plan.lora_modules.values()}
    if len(ranks) != 1:
        raise ModelMismatchError(f"LoRA modules have different ranks {sorted(ranks)}")
    rank = ranks.pop()
    alpha = _lora_alpha(plan.checkpoint, options, rank)
    info.update({"lora_rank": rank, "lora_alpha": alpha})
    unknown_formats = set(options.lora_formats) - {"diffusers", "comfyui"}
    if unknown_formats or not options.lora_formats:
        raise ValueError(
            f"LoRA formats {sorted(unknown_formats) or '(none)'}: choose diffusers and/or comfyui"
        )
    # adapters on APEX modules (E2) are folded into the extras file instead: diffusers and
    # ComfyUI have no such modules
    modules = [
        plan.lora_modules[name]
        for name in sorted(plan.lora_modules)
        if not is_apex_key(f"{name}.weight")
    ]
    file_outputs: dict[str, list[OutputTensor]] = {}
    if "diffusers" in options.lora_formats:
        outputs, targets = _diffusers_lora_outputs(plan, modules, rank, alpha, dtype, chunk)
        adapter = {
            f"{DIFFUSERS_LORA_PREFIX}r": rank,
            f"{DIFFUSERS_LORA_PREFIX}lora_alpha": alpha,
            f"{DIFFUSERS_LORA_PREFIX}target_modules": targets,
        }
        if plan.fold is not None:
            adapter[f"{DIFFUSERS_LORA_PREFIX}lora_bias"] = True
        metadata = {
            "format": "pt",
            DIFFUSERS_LORA_METADATA_KEY: json.dumps(adapter, sort_keys=True),
        }
        _write_file(staging, DIFFUSERS_LORA_NAME, outputs, metadata, file_outputs, report)
    if "comfyui" in options.lora_formats:
        outputs = []
        for module in modules:
            down_name, up_name, alpha_name = comfyui_lora_names(module.module)
            outputs.append(_source_output(down_name, module.down, dtype, chunk))
            outputs.append(_source_output(up_name, module.up, dtype, chunk))
            alpha_value = torch.tensor(alpha, dtype=dtype)
            outputs.append(OutputTensor(alpha_name, (), dtype, lambda value=alpha_value: [value]))
        if plan.fold is not None:
            name = f"{COMFYUI_PREFIX}{FOLD_MODULE}.{COMFYUI_BIAS_DIFF_SUFFIX}"
            outputs.append(_tensor_output(name, plan.fold, dtype))
        metadata = {"format": "pt"}
        _write_file(staging, COMFYUI_LORA_NAME, outputs, metadata, file_outputs, report)
    _write_extras(staging, _extras_outputs(plan, alpha, chunk), file_outputs, report)
    return file_outputs


def _replace_directory(staging: Path, output: Path) -> None:
    """Put the finished `staging` directory at `output` (an old output is replaced whole)."""
    if output.exists():
        retired = output.parent / f".{output.name}.replaced-{os.getpid()}"
        output.rename(retired)
        staging.rename(output)
        shutil.rmtree(retired)
    else:
        staging.rename(output)


def export_checkpoint(
    checkpoint_path: str | os.PathLike,
    output: str | os.PathLike,
    options: ExportOptions | None = None,
    tag: str | None = None,
) -> ExportReport:
    """Export one checkpoint tag to `output` (a directory created by the export).

    Every input is parsed and checked before anything is written (`plan_export`); the files
    are written into a temporary sibling directory that replaces `output` only when complete.
    """
    options = options or ExportOptions()
    started = time.perf_counter()
    output = Path(output)
    if output.exists() and not options.overwrite:
        raise FileExistsError(
            f"output directory {output} already exists; remove it or pass --overwrite"
        )
    plan = plan_export(checkpoint_path, options, tag)
    checkpoint = plan.checkpoint
    report = ExportReport(output=output, mode=plan.mode)
    info: dict[str, Any] = {
        "format": "apex_dist.export/1",
        "source": str(checkpoint.tag_directory),
        "tag": checkpoint.tag,
        "global_steps": checkpoint.global_steps,
        "zero_stage": checkpoint.zero_stage,
        "world_size": checkpoint.world_size,
        "weights": options.weights,
        "mode": plan.mode,
        "dtype": plan.dtype_name,
        "model": plan.description,
    }
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging.mkdir()
    try:
        write = _write_full if plan.mode in ("full", "merged") else _write_lora
        file_outputs = write(staging, plan, options, report, info)
        _fold_info(plan, info)
        if plan.fold is not None:
            _write_scheduler(staging, options, report)
        if options.verify:
            _verify(staging, file_outputs)
            report.verified = True
        info["files"] = sorted(report.files)
        _write_json(staging / EXPORT_INFO_NAME, info)
        report.files.append(EXPORT_INFO_NAME)
        _replace_directory(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report.seconds = time.perf_counter() - started
    return report


def parse_size(text: str) -> int:
    """Bytes from '5GB', '500MB', '1.5GiB' or a plain number."""
    units = {
        "": 1,
        "B": 1,
        "KB": 1000,
        "MB": 1000**2,
        "GB": 1000**3,
        "TB": 1000**4,
        "KIB": 1024,
        "MIB": 1024**2,
        "GIB": 1024**3,
        "TIB": 1024**4,
    }
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if match is None or match.group(2).upper() not in units:
        raise ValueError(f"size {text!r} must look like 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * units[match.group(2).upper()])


def format_bytes(count: int) -> str:
    """A human-readable byte count."""
    for unit, size in (("GB", 1000**3), ("MB", 1000**2), ("kB", 1000)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"


__all__ = [
    "ExportOptions",
    "ExportReport",
    "ModelMismatchError",
    "comfyui_lora_names",
    "diffusers_lora_names",
    "export_checkpoint",
    "format_bytes",
    "parse_size",
]
