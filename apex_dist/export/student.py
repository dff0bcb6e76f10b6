"""A distilled student read back from a training run or an export, for sampling.

Three sources (docs/generate.md):

- a training run directory (its `checkpoints/latest`, or a tag): DeepSpeed's files are read in
  this process by the exporter's streaming reader (`convert.plan_export`), no DeepSpeed import
  and no process group; a LoRA run's base weights come from the run's `model.pretrained`
  snapshot (or `base`) with W + (alpha / rank) * B @ A merged in memory, and E2 and the
  condition shift from the run;
- a full or merged export (`config.json`, `diffusion_pytorch_model*.safetensors`,
  `export_info.json`): E2 from the model files (`--keep-apex-keys`) or from
  `apex_extra_weights.safetensors`;
- a LoRA export (`pytorch_lora_weights.safetensors`, `apex_extra_weights.safetensors`) on top of
  a base snapshot.

An export written with the one-step fold (`export_info.json` entry `one_step_fold`, see
`apex_dist.models.fold`) holds E1's last bias plus t* * E2(0) and, for LoRA, a `lora_B.bias`
that carries the same offset; the loaders undo it, so the model is the exact student at every
number of steps. An export without E2 is refused: it is not a student.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from apex_dist.export.convert import nested

SOURCE_RUN, SOURCE_EXPORT, SOURCE_LORA_EXPORT = "run", "export", "lora export"
DTYPE_NAMES = ("fp32", "bf16")


class SourceError(ValueError):
    """A path, option or file that cannot be used; the message names it and says what to do."""


# --------------------------------------------------------------------------------------------
# the student's weights


@dataclass
class LoadedModel:
    """A transformer ready to sample, with what the text encoder and codec need.

    Attributes:
        model: the apex_dist transformer (on the CPU, in the requested dtype, eval mode).
        kind: SOURCE_RUN, SOURCE_EXPORT, SOURCE_LORA_EXPORT, or "teacher".
        description: where the weights came from, for the PNG chunks and the log.
        snapshot: the snapshot with the text encoder and VAE (None: none known).
        run_config: the run's config.yaml when the source is a run directory.
    """

    model: torch.nn.Module
    kind: str
    description: str
    snapshot: Optional[Path]
    run_config: Optional[Path] = None
    details: dict[str, Any] = field(default_factory=dict)


def _user_errors():
    """The exceptions that mean a wrong input (reported as SourceError)."""
    from apex_dist.config import ConfigError
    from apex_dist.export.convert import ModelMismatchError
    from apex_dist.export.torch_archive import CheckpointFormatError
    from apex_dist.models.loading import CheckpointError

    return (ConfigError, ModelMismatchError, CheckpointFormatError, CheckpointError)


def source_kind(path: Path) -> str:
    """Which of the three sources `path` is (module doc), or a SourceError saying why none."""
    from apex_dist.export.convert import (
        DIFFUSERS_CONFIG_NAME,
        DIFFUSERS_LORA_NAME,
        EXPORT_INFO_NAME,
    )

    if not path.exists():
        raise SourceError(f"--source {path} does not exist")
    if not path.is_dir():
        raise SourceError(
            f"--source {path} is a file: give a run directory, an export directory or a LoRA "
            "export directory"
        )
    if (path / DIFFUSERS_LORA_NAME).is_file():
        return SOURCE_LORA_EXPORT
    if (path / DIFFUSERS_CONFIG_NAME).is_file() or (path / EXPORT_INFO_NAME).is_file():
        return SOURCE_EXPORT
    return SOURCE_RUN


def load_student(
    source: str | Path,
    base: Optional[str | Path] = None,
    tag: Optional[str] = None,
    weights: str = "trained",
    dtype: str = "fp32",
    lora_alpha: Optional[float] = None,
) -> LoadedModel:
    """The student of `source` (a run directory, a full/merged export or a LoRA export with
    `base`), on the CPU in `dtype`, fold undone (module doc).

    Raises:
        SourceError: a missing path, no checkpoint, an unknown tag, a LoRA export without
            `base`, a base that does not fit, an export without E2.
    """
    source = Path(source)
    base = Path(base) if base is not None else None
    if dtype not in DTYPE_NAMES:
        raise SourceError(f"--dtype {dtype!r} is unknown; choose one of {', '.join(DTYPE_NAMES)}")
    if base is not None and not base.is_dir():
        raise SourceError(f"--base {base} does not exist (give a local snapshot directory)")
    kind = source_kind(source)
    try:
        if kind == SOURCE_RUN:
            loaded = _load_run(source, base, tag, weights, dtype, lora_alpha)
        elif kind == SOURCE_EXPORT:
            loaded = _load_export(source, base, dtype)
        else:
            loaded = _load_lora_export(source, base, dtype, lora_alpha)
    except _user_errors() as error:
        raise SourceError(str(error)) from None
    loaded.model.eval().requires_grad_(False)
    return loaded


def torch_dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def _shift_options(run_config: Optional[dict]) -> dict[str, Any]:
    """The model's condition-shift arguments of a run's config (defaults without one)."""
    from apex_dist.export.convert import condition_shift_of
    from apex_dist.models.spec import condition_shift_arguments

    return condition_shift_arguments(condition_shift_of(run_config))


def _cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def merge_lora_(
    model: torch.nn.Module, adapters: Mapping[str, tuple[Tensor, Tensor]], alpha: float
) -> None:
    """W <- W + (alpha / rank) * B @ A for every `module -> (A (rank, in), B (out, rank))`,
    computed in fp32 (as the merged export computes it) and stored in W's dtype."""
    parameters = dict(model.named_parameters())
    problems = []
    for module, (down, up) in adapters.items():
        weight = parameters.get(f"{module}.weight")
        if weight is None or weight.dim() != 2:
            problems.append(f"{module}: the model has no linear layer there")
        elif tuple(weight.shape) != (up.shape[0], down.shape[1]) or up.shape[1] != down.shape[0]:
            problems.append(
                f"{module}: A {tuple(down.shape)} and B {tuple(up.shape)} do not fit the "
                f"weight {tuple(weight.shape)}"
            )
    if problems:
        raise SourceError(
            f"the LoRA does not fit the base model ({len(problems)} problems, e.g. "
            f"{'; '.join(problems[:4])}): give the snapshot it was trained on with --base"
        )
    with torch.no_grad():
        for module, (down, up) in adapters.items():
            weight = parameters[f"{module}.weight"]
            scale = alpha / down.shape[0]
            merged = weight.detach().float() + (up.float() @ down.float()) * scale
            weight.copy_(merged.to(weight.dtype))


def _load_run(
    source: Path,
    base: Optional[Path],
    tag: Optional[str],
    weights: str,
    dtype: str,
    lora_alpha: Optional[float],
) -> LoadedModel:
    """A run directory (or its checkpoints/ or a tag directory), read without DeepSpeed."""
    from apex_dist.export.convert import ExportOptions, _checked_base, _lora_alpha, plan_export
    from apex_dist.export.torch_archive import CheckpointFormatError
    from apex_dist.models.loading import load_pretrained_transformer

    model_dtype = torch_dtype(dtype)
    try:
        # the model is the run's (config.yaml); a --base is checked against it below
        plan = plan_export(source, ExportOptions(weights=weights), tag)
    except CheckpointFormatError as error:
        raise SourceError(
            f"--source {source}: {error} (a run directory has checkpoints/ with a 'latest' file "
            "once the run has saved; exports are directories with config.json or "
            "pytorch_lora_weights.safetensors)"
        ) from None
    checkpoint = plan.checkpoint
    run_config = checkpoint.run_config or {}
    config_path = checkpoint.tag_directory / "config.yaml"
    snapshot = base
    if snapshot is None and nested(run_config, "model", "pretrained"):
        snapshot = Path(nested(run_config, "model", "pretrained"))
    description = f"{checkpoint.tag_directory} ({weights} weights)"
    sources = plan.plain_sources
    if plan.lora_modules:
        if snapshot is None or not snapshot.is_dir():
            raise SourceError(
                f"{source} is a LoRA run and its base snapshot "
                + (f"{snapshot} does not exist" if snapshot else "is not named in config.yaml")
                + ": pass --base SNAPSHOT_DIR (the model the LoRA was trained on)"
            )
        # the merged export's check: the base must fit the checkpoint's model
        _checked_base(snapshot, plan.model, sources)
        model = load_pretrained_transformer(snapshot, dtype, **_shift_options(run_config))
        state = {name: _cast(tensor.read(), model_dtype) for name, tensor in sources.items()}
        model.load_state_dict(state, strict=False)
        first = next(iter(plan.lora_modules.values()))
        alpha = _lora_alpha(checkpoint, ExportOptions(lora_alpha=lora_alpha), first.rank)
        adapters = {
            name: (module.down.read(), module.up.read())
            for name, module in plan.lora_modules.items()
        }
        merge_lora_(model, adapters, alpha)
        description += f", LoRA rank {first.rank} alpha {alpha:g} on {snapshot}"
    else:
        model = plan.model  # on the meta device, built from the run's config
        state = {name: _cast(tensor.read(), model_dtype) for name, tensor in sources.items()}
        model.load_state_dict(state, strict=False, assign=True)
        left = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
        if left:
            raise SourceError(
                f"the checkpoint {checkpoint.tag_directory} lacks {len(left)} model tensors "
                f"(e.g. {', '.join(left[:4])}): it is not a complete student"
            )
    return LoadedModel(
        model,
        SOURCE_RUN,
        description,
        snapshot,
        config_path if config_path.is_file() else None,
        {"tag": checkpoint.tag, "step": checkpoint.global_steps, "weights": weights},
    )


def read_export_info(directory: Path) -> dict:
    """`export_info.json` of an export directory ({} when absent)."""
    from apex_dist.export.convert import EXPORT_INFO_NAME

    path = directory / EXPORT_INFO_NAME
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SourceError(f"cannot read {path}: {error}") from None
    if not isinstance(info, dict):
        raise SourceError(f"{path} is not a JSON object")
    return info


def fold_of(info: dict, directory: Path) -> Optional[float]:
    """The fold time t* of a folded export, or None for an unfolded one."""
    from apex_dist.models.fold import FOLD_BIAS_KEY, FOLD_INFO_KEY

    fold = info.get(FOLD_INFO_KEY)
    if fold is None:
        return None
    if not isinstance(fold, dict) or not isinstance(fold.get("time"), (int, float)):
        raise SourceError(
            f"{directory}/export_info.json: {FOLD_INFO_KEY} must be an object with a numeric "
            f"'time' (got {fold!r})"
        )
    if fold.get("bias_key", FOLD_BIAS_KEY) != FOLD_BIAS_KEY:
        raise SourceError(
            f"{directory}/export_info.json folds into {fold['bias_key']!r}; this version of "
            f"apex_dist undoes folds into {FOLD_BIAS_KEY} only"
        )
    return float(fold["time"])


def read_apex_extras(directory: Path, what: str) -> dict[str, Tensor]:
    """E2 (and the condition shift) of an export's apex_extra_weights.safetensors, or a
    SourceError saying the export is not a student without it."""
    from safetensors.torch import load_file

    from apex_dist.export.convert import APEX_EXTRA_NAME
    from apex_dist.models.fold import E2_KEYS

    path = directory / APEX_EXTRA_NAME
    if not path.is_file():
        raise SourceError(
            f"{what} {directory} has no E2 (time_text_embed_2.*): {path} is missing and the "
            "model files do not hold it, so this export is not a student (it computes the "
            "base model's F(x, t, t, c)). Export the run again as a LoRA export, with "
            "--keep-apex-keys, or with a current apex-convert-checkpoint"
        )
    extras = load_file(str(path))
    missing = [key for key in E2_KEYS if key not in extras]
    if missing:
        raise SourceError(
            f"{path} lacks {', '.join(missing)}: E2 is incomplete, the export is not a student"
        )
    return extras


def _load_apex_tensors(model: torch.nn.Module, extras: Mapping[str, Tensor]) -> None:
    """E2 and, when the extras hold it, a learnable condition shift, copied into `model`."""
    tensors = model.state_dict()
    with torch.no_grad():
        for key, value in extras.items():
            if key in tensors:
                tensors[key].copy_(value)


def _load_export(directory: Path, base: Optional[Path], dtype: str) -> LoadedModel:
    """A full or merged export in diffusers' layout (E2 kept, or in the extras file)."""
    from safetensors import safe_open

    from apex_dist.models.fold import E2_KEYS, FOLD_BIAS_KEY, fold_offset
    from apex_dist.models.loading import build_transformer, load_transformer_weights, weight_files

    info = read_export_info(directory)
    fold_time = fold_of(info, directory)
    model = build_transformer(directory)
    absent = load_transformer_weights(model, directory, dtype)
    if any(key in absent for key in E2_KEYS):
        e2_state = read_apex_extras(directory, "export")
        _load_apex_tensors(model, e2_state)
    else:
        e2_state = {key: tensor.detach().float() for key, tensor in model.state_dict().items()}
    if fold_time is not None:
        stored = None
        for path in weight_files(directory):
            with safe_open(str(path), framework="pt") as handle:
                if FOLD_BIAS_KEY in handle.keys():  # noqa: SIM118 - not a mapping
                    stored = handle.get_tensor(FOLD_BIAS_KEY)
        if stored is None:
            raise SourceError(f"folded export {directory} has no {FOLD_BIAS_KEY}")
        bias = dict(model.named_parameters())[FOLD_BIAS_KEY]
        with torch.no_grad():
            bias.copy_(stored.float() - fold_offset(e2_state, fold_time))
    description = f"{info.get('mode', 'full')} export {directory}"
    if fold_time is not None:
        description += f" (one-step fold at t = {fold_time:g}, undone)"
    return LoadedModel(
        model, SOURCE_EXPORT, description, base, None, {"export_info": info, "fold": fold_time}
    )


def read_lora_file(path: Path) -> tuple[dict[str, Tensor], Optional[float]]:
    """The adapters of a diffusers LoRA file in apex_dist's naming (weights as trained, fold
    biases dropped) and the alpha of its `lora_adapter_metadata` header (None when absent)."""
    from safetensors import safe_open

    from apex_dist.export.convert import DIFFUSERS_LORA_METADATA_KEY, DIFFUSERS_LORA_PREFIX
    from apex_dist.models.lora import from_diffusers_lora

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {
            key: handle.get_tensor(key)
            for key in handle.keys()  # noqa: SIM118 - not a mapping
            if not key.endswith(".lora_B.bias")  # the one-step fold's offset (module doc)
        }
    alpha = None
    if DIFFUSERS_LORA_METADATA_KEY in metadata:
        try:
            adapter = json.loads(metadata[DIFFUSERS_LORA_METADATA_KEY])
            alpha = float(adapter[f"{DIFFUSERS_LORA_PREFIX}lora_alpha"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise SourceError(
                f"{path}: header entry {DIFFUSERS_LORA_METADATA_KEY} has no readable "
                f"{DIFFUSERS_LORA_PREFIX}lora_alpha ({error})"
            ) from None
    try:
        return from_diffusers_lora(tensors), alpha
    except ValueError as error:
        raise SourceError(f"{path}: {error}") from None


def _load_lora_export(
    directory: Path, base: Optional[Path], dtype: str, lora_alpha: Optional[float]
) -> LoadedModel:
    """A LoRA export on its base snapshot: W + (alpha / rank) B A, E2 from the extras."""
    from apex_dist.export.convert import DIFFUSERS_LORA_NAME
    from apex_dist.models.loading import load_pretrained_transformer

    if base is None:
        raise SourceError(
            f"{directory} is a LoRA export: it holds the adapters only; pass --base SNAPSHOT_DIR "
            "with the model the LoRA was trained on"
        )
    info = read_export_info(directory)
    fold_time = fold_of(info, directory)
    adapters, alpha = read_lora_file(directory / DIFFUSERS_LORA_NAME)
    alpha = lora_alpha if lora_alpha is not None else alpha
    if alpha is None:
        alpha = info.get("lora_alpha")
    if alpha is None:
        raise SourceError(
            f"{directory / DIFFUSERS_LORA_NAME} names no LoRA alpha (no lora_adapter_metadata) "
            "and export_info.json has no lora_alpha: pass --lora-alpha (the run's alpha)"
        )
    e2_state = read_apex_extras(directory, "LoRA export")
    model = load_pretrained_transformer(base, dtype)
    _load_apex_tensors(model, e2_state)
    modules = {}
    for key, tensor in adapters.items():
        module, side = key.rsplit(".lora_", 1)
        modules.setdefault(module, {})[side.split(".")[0]] = tensor
    pairs = {module: (sides["A"], sides["B"]) for module, sides in modules.items()}
    merge_lora_(model, pairs, float(alpha))
    rank = next(iter(pairs.values()))[0].shape[0] if pairs else 0
    description = f"LoRA export {directory} (rank {rank}, alpha {float(alpha):g}) on {base}"
    if fold_time is not None:
        description += f" (one-step fold at t = {fold_time:g}, undone)"
    return LoadedModel(
        model, SOURCE_LORA_EXPORT, description, base, None, {"export_info": info, "fold": fold_time}
    )


def load_teacher(snapshot: Path, dtype: str = "fp32") -> LoadedModel:
    """The base snapshot's transformer (E2 = E1: at tt = t it is the pretrained model)."""
    from apex_dist.models.loading import load_pretrained_transformer

    if not Path(snapshot).is_dir():
        raise SourceError(f"--base {snapshot} does not exist (the teacher's snapshot)")
    try:
        model = load_pretrained_transformer(snapshot, dtype)
    except _user_errors() as error:
        raise SourceError(f"--base {snapshot}: {error}") from None
    model.eval().requires_grad_(False)
    return LoadedModel(model, "teacher", f"teacher {snapshot}", Path(snapshot))


def is_snapshot(path: Path) -> bool:
    """A Hugging Face snapshot of the base model (transformer/config.json inside)."""
    return (Path(path) / "transformer" / "config.json").is_file()


def run_config_path(source: Path, tag: Optional[str]) -> Optional[Path]:
    """config.yaml of the checkpoint a run directory names (None when it has none)."""
    from apex_dist.export.deepspeed_checkpoint import resolve_tag_directory
    from apex_dist.export.torch_archive import CheckpointFormatError

    try:
        path = resolve_tag_directory(source, tag) / "config.yaml"
    except CheckpointFormatError as error:
        raise SourceError(f"--source {source}: {error}") from None
    return path if path.is_file() else None


def pretrained_of(run_config: Path) -> Optional[Path]:
    import yaml

    pretrained = nested(yaml.safe_load(run_config.read_text()), "model", "pretrained")
    return Path(pretrained) if pretrained else None
