"""Images from a distilled student (or its teacher): the Python side of `apex-generate`.

The student is read from one of three sources (docs/generate.md):

- a training run directory (its `checkpoints/latest`, or a tag): DeepSpeed's files are read in
  this process by the exporter's streaming reader (`export.convert.plan_export`); a LoRA run's
  base weights come from the run's `model.pretrained` snapshot (or `base`) with
  W + (alpha / rank) * B @ A merged in memory, and E2 and the condition shift from the run;
- a full or merged export (`config.json`, `diffusion_pytorch_model*.safetensors`,
  `export_info.json`): E2 from the model files (`--keep-apex-keys`) or from
  `apex_extra_weights.safetensors`;
- a LoRA export (`pytorch_lora_weights.safetensors`, `apex_extra_weights.safetensors`) on top of
  a base snapshot.

An export written with the one-step fold (`export_info.json` entry `one_step_fold`, see
`apex_dist.models.fold`) holds E1's last bias plus t* * E2(0) and, for LoRA, a `lora_B.bias`
that carries the same offset; the loaders undo it, so the model is the exact student at every
number of steps. The text encoder and the VAE (or the pixel codec) come from the snapshot.

`Generator` samples a batch of (prompt, seed) pairs: the noise of an image, and at 2 and 4 NFE
the fresh noise of each re-noising, come from a CPU generator seeded by that image's seed, so an
image depends on its prompt and seed only (not on the batch or the device's random stream).
`generator_from_arguments` builds one from apex-generate's options (used by `apex-eval
generate`).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from apex_dist.models.velocity import VelocityModelAdapter

logger = logging.getLogger("apex_dist")

# Student numbers of function evaluations the sampler's grids are tuned for (method.md).
STUDENT_NFES = (1, 2, 4)
# The teacher's defaults: 50 Euler steps with classifier-free guidance 4 (Qwen-Image's
# true_cfg_scale default, also logging.teacher_guidance_scale) against the empty prompt.
TEACHER_STEPS = 50
TEACHER_GUIDANCE_SCALE = 4.0
TEACHER_NEGATIVE_PROMPT = ""
# Image side when neither the options nor the run's config give one.
DEFAULT_RESOLUTION = 1024
# Preset assumed for exports when --preset is not given (the family decides the image codec;
# the architecture itself always comes from the files).
DEFAULT_EXPORT_PRESET = "qwen-image-20b"
# Columns of one contact sheet (more images go to further sheets), and the longest side of an
# image on a sheet (larger images are shrunk, so that a sheet of 1024-pixel images stays small).
SHEET_COLUMNS = 8
SHEET_CELL_PIXELS = 256
SOURCE_RUN, SOURCE_EXPORT, SOURCE_LORA_EXPORT = "run", "export", "lora export"
DTYPE_NAMES = ("fp32", "bf16")


class GenerateError(ValueError):
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
    """The exceptions that mean a wrong input (reported as GenerateError)."""
    from apex_dist.config import ConfigError
    from apex_dist.export.convert import ModelMismatchError
    from apex_dist.export.torch_archive import CheckpointFormatError
    from apex_dist.models.loading import CheckpointError

    return (ConfigError, ModelMismatchError, CheckpointFormatError, CheckpointError)


def source_kind(path: Path) -> str:
    """Which of the three sources `path` is (module doc), or a GenerateError saying why none."""
    from apex_dist.export.convert import (
        DIFFUSERS_CONFIG_NAME,
        DIFFUSERS_LORA_NAME,
        EXPORT_INFO_NAME,
    )

    if not path.exists():
        raise GenerateError(f"--source {path} does not exist")
    if not path.is_dir():
        raise GenerateError(
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
        GenerateError: a missing path, no checkpoint, an unknown tag, a LoRA export without
            `base`, a base that does not fit, an export without E2.
    """
    source = Path(source)
    base = Path(base) if base is not None else None
    if dtype not in DTYPE_NAMES:
        raise GenerateError(f"--dtype {dtype!r} is unknown; choose one of {', '.join(DTYPE_NAMES)}")
    if base is not None and not base.is_dir():
        raise GenerateError(f"--base {base} does not exist (give a local snapshot directory)")
    kind = source_kind(source)
    try:
        if kind == SOURCE_RUN:
            loaded = _load_run(source, base, tag, weights, dtype, lora_alpha)
        elif kind == SOURCE_EXPORT:
            loaded = _load_export(source, base, dtype)
        else:
            loaded = _load_lora_export(source, base, dtype, lora_alpha)
    except _user_errors() as error:
        raise GenerateError(str(error)) from None
    loaded.model.eval().requires_grad_(False)
    return loaded


def _torch_dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def _nested(mapping: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(mapping, dict) or key not in mapping:
            return None
        mapping = mapping[key]
    return mapping


def _shift_options(run_config: Optional[dict]) -> dict[str, Any]:
    """The model's condition-shift arguments of a run's config (defaults without one)."""
    from apex_dist.config import ConditionShiftConfig
    from apex_dist.models.spec import condition_shift_arguments

    shift = _nested(run_config, "method", "condition_shift") or {}
    default = ConditionShiftConfig()
    return condition_shift_arguments(
        ConditionShiftConfig(
            scale=float(shift.get("scale", default.scale)),
            bias=float(shift.get("bias", default.bias)),
            learnable=bool(shift.get("learnable", default.learnable)),
        )
    )


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
        raise GenerateError(
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

    torch_dtype = _torch_dtype(dtype)
    try:
        # the model is the run's (config.yaml); a --base is checked against it below
        plan = plan_export(source, ExportOptions(weights=weights), tag)
    except CheckpointFormatError as error:
        raise GenerateError(
            f"--source {source}: {error} (a run directory has checkpoints/ with a 'latest' file "
            "once the run has saved; exports are directories with config.json or "
            "pytorch_lora_weights.safetensors)"
        ) from None
    checkpoint = plan.checkpoint
    run_config = checkpoint.run_config or {}
    config_path = checkpoint.tag_directory / "config.yaml"
    snapshot = base
    if snapshot is None and _nested(run_config, "model", "pretrained"):
        snapshot = Path(_nested(run_config, "model", "pretrained"))
    description = f"{checkpoint.tag_directory} ({weights} weights)"
    sources = plan.plain_sources
    if plan.lora_modules:
        if snapshot is None or not snapshot.is_dir():
            raise GenerateError(
                f"{source} is a LoRA run and its base snapshot "
                + (f"{snapshot} does not exist" if snapshot else "is not named in config.yaml")
                + ": pass --base SNAPSHOT_DIR (the model the LoRA was trained on)"
            )
        # the merged export's check: the base must fit the checkpoint's model
        _checked_base(snapshot, plan.model, sources)
        model = load_pretrained_transformer(snapshot, dtype, **_shift_options(run_config))
        state = {name: _cast(tensor.read(), torch_dtype) for name, tensor in sources.items()}
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
        state = {name: _cast(tensor.read(), torch_dtype) for name, tensor in sources.items()}
        model.load_state_dict(state, strict=False, assign=True)
        left = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
        if left:
            raise GenerateError(
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
        raise GenerateError(f"cannot read {path}: {error}") from None
    if not isinstance(info, dict):
        raise GenerateError(f"{path} is not a JSON object")
    return info


def fold_of(info: dict, directory: Path) -> Optional[float]:
    """The fold time t* of a folded export, or None for an unfolded one."""
    from apex_dist.models.fold import FOLD_BIAS_KEY, FOLD_INFO_KEY

    fold = info.get(FOLD_INFO_KEY)
    if fold is None:
        return None
    if not isinstance(fold, dict) or not isinstance(fold.get("time"), (int, float)):
        raise GenerateError(
            f"{directory}/export_info.json: {FOLD_INFO_KEY} must be an object with a numeric "
            f"'time' (got {fold!r})"
        )
    if fold.get("bias_key", FOLD_BIAS_KEY) != FOLD_BIAS_KEY:
        raise GenerateError(
            f"{directory}/export_info.json folds into {fold['bias_key']!r}; this version of "
            f"apex_dist undoes folds into {FOLD_BIAS_KEY} only"
        )
    return float(fold["time"])


def read_apex_extras(directory: Path, what: str) -> dict[str, Tensor]:
    """E2 (and the condition shift) of an export's apex_extra_weights.safetensors, or a
    GenerateError saying the export is not a student without it."""
    from safetensors.torch import load_file

    from apex_dist.export.convert import APEX_EXTRA_NAME
    from apex_dist.models.fold import E2_KEYS

    path = directory / APEX_EXTRA_NAME
    if not path.is_file():
        raise GenerateError(
            f"{what} {directory} has no E2 (time_text_embed_2.*): {path} is missing and the "
            "model files do not hold it, so this export is not a student (it computes the "
            "base model's F(x, t, t, c)). Export the run again as a LoRA export, with "
            "--keep-apex-keys, or with a current apex-convert-checkpoint"
        )
    extras = load_file(str(path))
    missing = [key for key in E2_KEYS if key not in extras]
    if missing:
        raise GenerateError(
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
            raise GenerateError(f"folded export {directory} has no {FOLD_BIAS_KEY}")
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
            raise GenerateError(
                f"{path}: header entry {DIFFUSERS_LORA_METADATA_KEY} has no readable "
                f"{DIFFUSERS_LORA_PREFIX}lora_alpha ({error})"
            ) from None
    try:
        return from_diffusers_lora(tensors), alpha
    except ValueError as error:
        raise GenerateError(f"{path}: {error}") from None


def _load_lora_export(
    directory: Path, base: Optional[Path], dtype: str, lora_alpha: Optional[float]
) -> LoadedModel:
    """A LoRA export on its base snapshot: W + (alpha / rank) B A, E2 from the extras."""
    from apex_dist.export.convert import DIFFUSERS_LORA_NAME
    from apex_dist.models.loading import load_pretrained_transformer

    if base is None:
        raise GenerateError(
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
        raise GenerateError(
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
        raise GenerateError(f"--base {snapshot} does not exist (the teacher's snapshot)")
    try:
        model = load_pretrained_transformer(snapshot, dtype)
    except _user_errors() as error:
        raise GenerateError(f"--base {snapshot}: {error}") from None
    model.eval().requires_grad_(False)
    return LoadedModel(model, "teacher", f"teacher {snapshot}", Path(snapshot))


# --------------------------------------------------------------------------------------------
# sampling


@dataclass
class Settings:
    """How images are made (apex-generate's options; `build_parser` documents each)."""

    source: Optional[Path] = None
    base: Optional[Path] = None
    tag: Optional[str] = None
    weights: str = "trained"
    lora_alpha: Optional[float] = None
    teacher: bool = False
    compare: bool = False
    preset: Optional[str] = None
    nfe: int = 1
    teacher_steps: int = TEACHER_STEPS
    guidance_scale: float = TEACHER_GUIDANCE_SCALE
    negative_prompt: str = TEACHER_NEGATIVE_PROMPT
    height: Optional[int] = None
    width: Optional[int] = None
    resolution: Optional[int] = None
    aspect: float = 1.0
    dtype: str = "fp32"
    device: Optional[str] = None
    batch_size: int = 4

    def check(self) -> None:
        """Every wrong option at once, as one GenerateError."""
        problems = []
        if self.nfe not in STUDENT_NFES:
            problems.append(f"--nfe must be one of {', '.join(map(str, STUDENT_NFES))}")
        if self.dtype not in DTYPE_NAMES:
            problems.append(f"--dtype must be one of {', '.join(DTYPE_NAMES)}")
        if self.weights not in ("trained", "ema"):
            problems.append("--weights must be trained or ema")
        for name in ("batch_size", "teacher_steps"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1")
        for name in ("height", "width", "resolution"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"--{name} must be >= 1 (got {value})")
        if (self.height is None) != (self.width is None):
            problems.append("--height and --width go together (or use --resolution/--aspect)")
        if self.aspect <= 0:
            problems.append(f"--aspect must be > 0 (got {self.aspect})")
        if self.source is None and not self.teacher:
            problems.append("--source is required (a run directory or an export), or --teacher")
        if (self.teacher or self.compare) and self.base is None and self.source is None:
            problems.append("--teacher needs --base SNAPSHOT_DIR")
        if self.compare and self.source is None:
            problems.append("--compare needs --source (the student) and the teacher's snapshot")
        if problems:
            raise GenerateError("; ".join(problems))


def image_size(settings: Settings, run_resolution: Optional[int]) -> tuple[int, int]:
    """(height, width): --height/--width, else --resolution (or the run's data.resolution)
    at --aspect (width / height), rounded like the training buckets."""
    from apex_dist.data.samples import bucket_sizes

    if settings.height is not None and settings.width is not None:
        return settings.height, settings.width
    resolution = settings.resolution or run_resolution or DEFAULT_RESOLUTION
    return bucket_sizes(resolution, [settings.aspect])[0]


def _device(name: Optional[str]) -> torch.device:
    if name:
        try:
            device = torch.device(name)
        except RuntimeError as error:
            raise GenerateError(f"--device {name!r}: {error}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise GenerateError("--device cuda: no CUDA device is available (use --device cpu)")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Generator:
    """Samples images of (prompt, seed) pairs with a student and/or its teacher (module doc).

    Args:
        settings: the options.
        student: the student (None: teacher only).
        teacher: the teacher (None: student only).
        preparer: the text encoder and image codec (`apex_dist.data.prepare.BatchPreparer`).
        size: (height, width) of the images.
        device: where sampling runs.
    """

    def __init__(
        self,
        settings: Settings,
        student: Optional[LoadedModel],
        teacher: Optional[LoadedModel],
        preparer,
        size: tuple[int, int],
        device: torch.device,
    ):
        self.settings = settings
        self.student = student
        self.teacher = teacher
        self.preparer = preparer
        self.size = size
        self.device = device
        self.latent_shape = preparer.geometry.latent_shape(*size)
        self.image_shape = preparer.geometry.image_shape(*size)
        # inputs cast to the model's dtype, velocities returned in fp32 (as in training)
        self.velocity = {
            which: VelocityModelAdapter(loaded.model, _torch_dtype(settings.dtype))
            for which, loaded in (("student", student), ("teacher", teacher))
            if loaded is not None
        }
        self.seconds: dict[str, float] = {"student": 0.0, "teacher": 0.0}
        self.images_made: dict[str, int] = {"student": 0, "teacher": 0}

    # ---- the callable of apex-eval generate ----------------------------------------------------

    def __call__(self, prompts: list[str], seeds: list[int]) -> list:
        """Images of the main model (the student, or the teacher with --teacher)."""
        return self.images(prompts, seeds, "teacher" if self.student is None else "student")

    def images(self, prompts: Sequence[str], seeds: Sequence[int], which: str) -> list:
        """PIL images of `which` ("student" or "teacher"), one per (prompt, seed)."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one each")
        pictures = []
        for start in range(0, len(prompts), self.settings.batch_size):
            stop = start + self.settings.batch_size
            latents = self.latents(list(prompts[start:stop]), list(seeds[start:stop]), which)
            pictures += self.decode(latents)
        return pictures

    @torch.no_grad()
    def latents(self, prompts: list[str], seeds: list[int], which: str) -> Tensor:
        """Sampled latents (B, N, C) of one batch, timed per model."""
        from apex_dist.method import sample, sample_euler

        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        noise = torch.stack([torch.randn(self.latent_shape, generator=g) for g in generators])
        noise = noise.to(self.device)
        text, mask, _ = self.preparer.encode_prompts(prompts)
        text, mask = text.to(self.device), mask.to(self.device)
        started = time.perf_counter()
        if which == "student":
            latents = sample(
                self.velocity["student"],
                noise,
                text,
                mask,
                nfe=self.settings.nfe,
                generator=generators,
                image_shape=self.image_shape,
            )
        else:
            negative, negative_mask = self.preparer.text_encoder().negative(
                self.settings.negative_prompt
            )
            latents = sample_euler(
                self.velocity["teacher"],
                noise,
                text,
                mask,
                steps=self.settings.teacher_steps,
                guidance_scale=self.settings.guidance_scale,
                neg_text=negative.to(self.device).float(),
                neg_text_mask=negative_mask.to(self.device),
                image_shape=self.image_shape,
            )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[which] += time.perf_counter() - started
        self.images_made[which] += len(prompts)
        return latents

    @torch.no_grad()
    def decode(self, latents: Tensor) -> list:
        """Latents -> PIL images (the VAE or the pixel codec)."""
        from PIL import Image

        images = self.preparer.decode(latents, self.image_shape).float().clamp(-1, 1)
        pixels = ((images + 1) * 127.5).round().to(torch.uint8).cpu()
        return [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in pixels]

    def chunks(self, which: str) -> dict[str, str]:
        """The PNG text chunks that say how an image of `which` was made."""
        height, width = self.size
        chunks = {"model": which, "size": f"{width}x{height}", "dtype": self.settings.dtype}
        if which == "student":
            chunks.update({"nfe": str(self.settings.nfe), "source": self.student.description})
        else:
            chunks.update(
                {
                    "steps": str(self.settings.teacher_steps),
                    "guidance_scale": f"{self.settings.guidance_scale:g}",
                    "negative_prompt": self.settings.negative_prompt,
                    "source": self.teacher.description,
                }
            )
        return chunks

    @torch.no_grad()
    def warm_up(self, which: str, prompt: str) -> None:
        """One untimed pass of `which` (kernels, allocator), so that timings measure sampling."""
        from apex_dist.method import sample, sample_euler

        noise = torch.zeros((1, *self.latent_shape), device=self.device)
        text, mask, _ = self.preparer.encode_prompts([prompt])
        text, mask = text.to(self.device), mask.to(self.device)
        if which == "student":
            sample(self.velocity[which], noise, text, mask, nfe=1, image_shape=self.image_shape)
        else:
            sample_euler(
                self.velocity[which], noise, text, mask, steps=1, image_shape=self.image_shape
            )

    def per_second(self, which: str) -> float:
        seconds = self.seconds[which]
        return self.images_made[which] / seconds if seconds > 0 else float("nan")


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
        raise GenerateError(f"--source {source}: {error}") from None
    return path if path.is_file() else None


def _pretrained_of(run_config: Path) -> Optional[Path]:
    import yaml

    pretrained = _nested(yaml.safe_load(run_config.read_text()), "model", "pretrained")
    return Path(pretrained) if pretrained else None


def _preparer(settings: Settings, run_config: Optional[Path], snapshot, device):
    """The batch preparer (text encoder and image codec) of a config that holds only what they
    need: the preset (the run's, --preset, or DEFAULT_EXPORT_PRESET), the snapshot, the dtype
    and the run's text length; and the run's data.resolution (None without a run). The rest of
    a run's config (data paths, evaluation models) is not read, so a run moved to another
    machine still generates."""
    import yaml

    from apex_dist.config import load_config
    from apex_dist.data.prepare import BatchPreparer

    recorded = yaml.safe_load(run_config.read_text()) if run_config is not None else {}
    preset = settings.preset or _nested(recorded, "model", "preset") or DEFAULT_EXPORT_PRESET
    if snapshot is None:
        raise GenerateError(
            "no snapshot for the text encoder and VAE: pass --base SNAPSHOT_DIR"
            + ("" if run_config is None else f" ({run_config} sets no model.pretrained)")
        )
    if not Path(snapshot).is_dir():
        raise GenerateError(
            f"the snapshot {snapshot} (model.pretrained of {run_config}) does not exist on this "
            "machine: pass --base SNAPSHOT_DIR with the text encoder and VAE"
        )
    overrides = [
        f"model.preset={preset}",
        f"model.pretrained={snapshot}",
        f"model.dtype={settings.dtype}",
    ]
    text_max_length = _nested(recorded, "model", "text_max_length")
    if text_max_length is not None:
        overrides.append(f"model.text_max_length={text_max_length}")
    try:
        config = load_config(None, overrides)
    except ValueError as error:
        raise GenerateError(f"the text encoder and image codec: {error}") from None
    return BatchPreparer(config, device, 0), _nested(recorded, "data", "resolution")


def build_generator(settings: Settings) -> Generator:
    """Load what `settings` asks for and return the Generator (GenerateError on bad input)."""
    settings.check()
    device = _device(settings.device)
    student = teacher = None
    run_config = None
    if settings.source is not None and not (settings.teacher and not settings.compare):
        student = load_student(
            settings.source,
            settings.base,
            settings.tag,
            settings.weights,
            settings.dtype,
            settings.lora_alpha,
        )
        run_config = student.run_config
    elif settings.source is not None and is_snapshot(settings.source):
        if settings.base is None:  # --teacher --source SNAPSHOT: the base model itself
            settings.base = settings.source
    elif settings.source is not None and source_kind(settings.source) == SOURCE_RUN:
        run_config = run_config_path(settings.source, settings.tag)
    snapshot = settings.base or (student.snapshot if student is not None else None)
    if snapshot is None and run_config is not None:
        snapshot = _pretrained_of(run_config)
    if settings.teacher or settings.compare:
        if snapshot is None:
            raise GenerateError("--teacher needs --base SNAPSHOT_DIR (the base model)")
        teacher = load_teacher(snapshot, settings.dtype)
    preparer, resolution = _preparer(settings, run_config, snapshot, device)
    for loaded in (student, teacher):
        if loaded is not None:
            loaded.model.to(device)
    try:
        size = image_size(settings, resolution)
        generator = Generator(settings, student, teacher, preparer, size, device)
    except ValueError as error:
        raise GenerateError(f"image size: {error}") from None
    return generator


# --------------------------------------------------------------------------------------------
# options, files and the command line


class _Parser(argparse.ArgumentParser):
    """argparse that raises GenerateError instead of exiting (apex-eval builds generators
    from these options inside its own process)."""

    def error(self, message: str):
        raise GenerateError(message)


def build_parser() -> argparse.ArgumentParser:
    """apex-generate's options (also the options after `--` of `apex-eval generate`)."""
    parser = _Parser(
        prog="apex-generate",
        description="Generate images with a distilled APEX student (or its teacher).",
        epilog="docs/generate.md has the commands for each source and what each option means.",
    )
    parser.add_argument("prompts", nargs="*", help="prompts (also --prompt-file)")
    parser.add_argument("--prompt-file", type=Path, help="text file with one prompt per line")
    parser.add_argument(
        "--source",
        type=Path,
        help="the student: a training run directory (its checkpoints/latest), a full or merged "
        "export, or a LoRA export (with --base)",
    )
    parser.add_argument(
        "--base",
        type=Path,
        help="base snapshot (Hugging Face layout): text encoder, VAE, the teacher, and the base "
        "weights of a LoRA (default for runs: config.yaml model.pretrained)",
    )
    parser.add_argument(
        "--tag", help="checkpoint tag of a run, e.g. step_00001000 (default: latest)"
    )
    parser.add_argument(
        "--weights", choices=("trained", "ema"), default="trained", help="a run's weights"
    )
    parser.add_argument(
        "--lora-alpha",
        type=float,
        help="LoRA alpha, over the one of the run's config.yaml or the LoRA file (needed when "
        "neither names it)",
    )
    parser.add_argument(
        "--teacher", action="store_true", help="generate with the base model (Euler + CFG)"
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="student and teacher on the same prompts and seeds; prints the measured speed-up",
    )
    parser.add_argument(
        "--preset",
        help=f"model preset deciding the image codec (default: the run's, else "
        f"{DEFAULT_EXPORT_PRESET}; qwen-image-pixels-* for pixel space)",
    )
    parser.add_argument(
        "--nfe", type=int, default=1, choices=STUDENT_NFES, help="student steps (default 1)"
    )
    parser.add_argument(
        "--teacher-steps", type=int, default=TEACHER_STEPS, help="teacher's Euler steps"
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=TEACHER_GUIDANCE_SCALE,
        help="teacher's classifier-free guidance scale (1 disables)",
    )
    parser.add_argument(
        "--negative-prompt",
        default=TEACHER_NEGATIVE_PROMPT,
        help="teacher's negative prompt (default: empty)",
    )
    parser.add_argument("--height", type=int, help="image height in pixels (with --width)")
    parser.add_argument("--width", type=int, help="image width in pixels (with --height)")
    parser.add_argument(
        "--resolution",
        type=int,
        help=f"image side for a square image; default the run's data.resolution, else "
        f"{DEFAULT_RESOLUTION}",
    )
    parser.add_argument(
        "--aspect", type=float, default=1.0, help="width / height at --resolution (default 1)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the first image; image i gets seed + i"
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", help="one seed per image (overrides --seed)"
    )
    parser.add_argument("--images-per-prompt", type=int, default=1, help="images of each prompt")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help="model dtype")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    parser.add_argument("--out", type=Path, default=Path("generated"), help="output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def settings_from(arguments: argparse.Namespace) -> Settings:
    return Settings(
        source=arguments.source,
        base=arguments.base,
        tag=arguments.tag,
        weights=arguments.weights,
        lora_alpha=arguments.lora_alpha,
        teacher=arguments.teacher,
        compare=arguments.compare,
        preset=arguments.preset,
        nfe=arguments.nfe,
        teacher_steps=arguments.teacher_steps,
        guidance_scale=arguments.guidance_scale,
        negative_prompt=arguments.negative_prompt,
        height=arguments.height,
        width=arguments.width,
        resolution=arguments.resolution,
        aspect=arguments.aspect,
        dtype=arguments.dtype,
        device=arguments.device,
        batch_size=arguments.batch_size,
    )


def generator_from_arguments(arguments: list[str]) -> Callable[[list[str], list[int]], list]:
    """The image generator of apex-generate's `arguments` (prompts and --out are ignored): a
    callable (prompts, seeds) -> PIL images, one per pair (`apex-eval generate` calls it)."""
    return build_generator(settings_from(build_parser().parse_args(list(arguments))))


def read_prompts(arguments: argparse.Namespace) -> list[str]:
    prompts = list(arguments.prompts)
    if arguments.prompt_file is not None:
        try:
            lines = arguments.prompt_file.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise GenerateError(f"--prompt-file {arguments.prompt_file}: {error}") from None
        prompts += [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise GenerateError("no prompts: give them as arguments or with --prompt-file")
    return prompts


def image_jobs(arguments: argparse.Namespace, prompts: list[str]) -> list[tuple[str, int, str]]:
    """(prompt, seed, file name) of every image, prompt by prompt."""
    per_prompt = arguments.images_per_prompt
    if per_prompt < 1:
        raise GenerateError(f"--images-per-prompt must be >= 1 (got {per_prompt})")
    count = len(prompts) * per_prompt
    seeds = arguments.seeds
    if seeds is not None and len(seeds) != count:
        raise GenerateError(
            f"--seeds gives {len(seeds)} seeds for {count} images ({len(prompts)} prompts x "
            f"{per_prompt}): give one per image, or --seed for consecutive seeds"
        )
    if seeds is None:
        seeds = [arguments.seed + index for index in range(count)]
    return [
        (prompt, seeds[index * per_prompt + sample], f"{index:05d}_{sample}.png")
        for index, prompt in enumerate(prompts)
        for sample in range(per_prompt)
    ]


def write_contact_sheets(
    rows: list[tuple[str, list]], captions: list[str], folder: Path
) -> list[Path]:
    """Labelled sheets (one row per model, the prompt and seed under each column), at most
    SHEET_COLUMNS columns each: contact_sheet.png, or contact_sheet_000.png, ... ."""
    import numpy

    from apex_dist.validation import save_labelled_grid

    def as_tensor(picture) -> Tensor:
        thumbnail = picture.convert("RGB")
        thumbnail.thumbnail((SHEET_CELL_PIXELS, SHEET_CELL_PIXELS))
        return torch.from_numpy(numpy.array(thumbnail)).permute(2, 0, 1) / 255.0

    starts = range(0, len(captions), SHEET_COLUMNS)
    paths = []
    for number, start in enumerate(starts):
        stop = start + SHEET_COLUMNS
        name = "contact_sheet.png" if len(starts) == 1 else f"contact_sheet_{number:03d}.png"
        sheet_rows = [
            (label, [as_tensor(p) for p in pictures[start:stop]]) for label, pictures in rows
        ]
        save_labelled_grid(sheet_rows, captions[start:stop], folder / name)
        paths.append(folder / name)
    return paths


def write_metadata(folder: Path, jobs: list[tuple[str, int, str]]) -> None:
    """metadata.jsonl listing the images with their prompts and seeds, so that `apex-eval
    score FOLDER` reads the folder (and not the contact sheets beside the images)."""
    from apex_dist.atomic import atomic_write_text
    from apex_dist.evaluation.images import METADATA_FILE

    lines = [
        json.dumps({"file": name, "prompt": prompt, "seed": seed}) + "\n"
        for prompt, seed, name in jobs
    ]
    atomic_write_text(folder / METADATA_FILE, "".join(lines))


def run(arguments: argparse.Namespace) -> dict[str, Any]:
    """apex-generate: images, contact sheets and timings; returns what it measured."""
    from tqdm import tqdm

    from apex_dist.evaluation.images import ImageRecord, save_png

    prompts = read_prompts(arguments)
    jobs = image_jobs(arguments, prompts)
    settings = settings_from(arguments)
    generator = build_generator(settings)
    which_models = (
        ["student", "teacher"]
        if settings.compare
        else ["teacher" if generator.student is None else "student"]
    )
    folder = Path(arguments.out)
    labels = {
        "student": f"student\n{settings.nfe} NFE",
        "teacher": f"teacher\n{settings.teacher_steps} steps\ncfg {settings.guidance_scale:g}",
    }
    rows = []
    for which in which_models:
        subfolder = folder / which if settings.compare else folder
        subfolder.mkdir(parents=True, exist_ok=True)
        if settings.compare:
            generator.warm_up(which, jobs[0][0])
        pictures = []
        batch_size = settings.batch_size
        with tqdm(total=len(jobs), unit="image", desc=which, disable=arguments.quiet) as bar:
            for start in range(0, len(jobs), batch_size):
                batch = jobs[start : start + batch_size]
                latents = generator.latents(
                    [job[0] for job in batch], [job[1] for job in batch], which
                )
                images = generator.decode(latents)
                chunks = generator.chunks(which)
                for image, (prompt, seed, name) in zip(images, batch, strict=True):
                    save_png(
                        image, subfolder / name, ImageRecord(Path(name), prompt, seed=seed), chunks
                    )
                pictures += images
                bar.update(len(batch))
        write_metadata(subfolder, jobs)
        rows.append((labels[which], pictures))
    sheets = write_contact_sheets(rows, [f"{job[0]} (seed {job[1]})" for job in jobs], folder)
    measured: dict[str, Any] = {"images": len(jobs), "sheets": [str(path) for path in sheets]}
    device = generator.device
    for which in which_models:
        rate = generator.per_second(which)
        measured[f"{which}_images_per_second"] = rate
        measured[f"{which}_seconds"] = generator.seconds[which]
        print(
            f"{which}: {generator.images_made[which]} images in {generator.seconds[which]:.2f} s "
            f"of sampling, {rate:.3f} images/s on {device}"
        )
    if settings.compare:
        evaluations = settings.teacher_steps * (2 if settings.guidance_scale != 1 else 1)
        speedup = measured["teacher_seconds"] / max(measured["student_seconds"], 1e-12)
        measured.update({"speedup": speedup, "evaluation_ratio": evaluations / settings.nfe})
        print(
            f"speed-up: {speedup:.1f}x measured (student {settings.nfe} NFE vs teacher "
            f"{settings.teacher_steps} steps x {evaluations // settings.teacher_steps} for CFG; "
            f"{evaluations / settings.nfe:.0f}x fewer transformer evaluations)"
        )
    written = len(jobs) * len(which_models)
    print(f"wrote {written} images and {len(sheets)} contact sheet(s) to {folder}")
    return measured


def main(argv: Optional[list[str]] = None) -> int:
    """The console script: exit 0, or 2 with one line naming the problem (no traceback)."""
    import sys

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        arguments = build_parser().parse_args(argv)
        run(arguments)
    except GenerateError as error:
        print(f"apex-generate: error: {error}", file=sys.stderr)
        return 2
    return 0
