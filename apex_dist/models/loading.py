"""Streamed loading of Qwen-Image transformer checkpoints from a local Hugging Face snapshot.

A snapshot is the directory layout of a diffusers model repository:

    <snapshot>/transformer/config.json
    <snapshot>/transformer/diffusion_pytorch_model.safetensors.index.json   (sharded) and
    <snapshot>/transformer/diffusion_pytorch_model-00001-of-0000N.safetensors ...
    or <snapshot>/transformer/diffusion_pytorch_model.safetensors            (one file)

`snapshot` may also be the `transformer/` folder itself.

Loading happens in two passes so that a wrong checkpoint fails before anything large is
allocated:
1. the safetensors headers (names, shapes, dtypes; no tensor data) are checked against the
   model, and one `CheckpointMismatchError` names every missing, unexpected and mis-shaped key;
2. tensors are read one at a time (`safe_open(...).get_tensor`), cast to the requested dtype
   and copied into their parameter, so host memory holds about one tensor beyond the model.

Each copy runs inside `parameter_context(parameter)`, a context manager whose value says
whether this process fills the parameter. The default does nothing and fills everywhere;
`apex_dist.distributed.zero_loading.zero3_parameter_context` gathers a ZeRO-3 partitioned
parameter, lets rank 0 fill it and re-partitions it. This module never imports deepspeed.

Functions: `read_transformer_config`, `build_transformer`, `check_dtype`,
`checkpoint_tensor_shapes`, `load_transformer_weights`, `load_pretrained_transformer`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import safe_open
from torch import nn

from apex_dist.config import ConditionShiftConfig
from apex_dist.export.safetensors_io import read_checked_header
from apex_dist.export.torch_archive import CheckpointFormatError
from apex_dist.models.conditioning import (
    DEFAULT_CONDITION_SHIFT,
    TARGET_TIME_EMBEDDING,
    init_apex_weights,
    is_apex_key,
)
from apex_dist.models.qwen_image import QwenImageTransformer

logger = logging.getLogger(__name__)

# Folder of the transformer inside a diffusers snapshot, and the file names diffusers writes.
TRANSFORMER_FOLDER = "transformer"
CONFIG_FILE = "config.json"
SINGLE_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
# `_class_name` that diffusers writes into the config of the architecture this model implements.
TRANSFORMER_CLASS_NAME = "QwenImageTransformer2DModel"

# Accepted dtype names (config `model.dtype` uses the short ones).
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
# safetensors' dtype names of floating-point tensors that can be cast to a compute dtype.
SAFETENSORS_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
# Largest number of keys spelled out per category in a mismatch error (the rest are counted).
MAX_KEYS_LISTED = 50
# State-dict prefix of the condition shift, whose values come from the config, never from a
# snapshot (a snapshot that disagrees is reported).
CONDITION_SHIFT_PREFIX = "condition_shift."

ParameterContext = Callable[[nn.Parameter], AbstractContextManager]


class CheckpointError(ValueError):
    """A snapshot that cannot be loaded: missing files, a wrong architecture or bad dtype."""


class CheckpointMismatchError(CheckpointError):
    """Checkpoint keys and shapes that do not fit the model, every problem at once.

    Attributes:
        missing: model keys absent from the checkpoint.
        unexpected: checkpoint keys the model does not have.
        mismatched: {key: (checkpoint shape, model shape)}.
    """

    def __init__(
        self,
        source: str,
        missing: list[str],
        unexpected: list[str],
        mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]],
    ):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = [f"checkpoint {source} does not fit the model:"]

        def listed(title: str, entries: list[str]) -> None:
            if not entries:
                return
            lines.append(f"  {len(entries)} {title}:")
            lines.extend(f"    {entry}" for entry in entries[:MAX_KEYS_LISTED])
            if len(entries) > MAX_KEYS_LISTED:
                lines.append(f"    ... and {len(entries) - MAX_KEYS_LISTED} more")

        listed("missing key(s) (in the model, not in the checkpoint)", missing)
        listed("unexpected key(s) (in the checkpoint, not in the model)", unexpected)
        listed(
            "mis-shaped key(s)",
            [
                f"{key}: checkpoint {list(file_shape)}, model {list(model_shape)}"
                for key, (file_shape, model_shape) in mismatched.items()
            ],
        )
        lines.append(
            "  check that the snapshot and the model preset/config describe the same "
            "architecture (transformer/config.json)"
        )
        super().__init__("\n".join(lines))


# --------------------------------------------------------------------------------------------
# the snapshot on disk


def transformer_directory(snapshot: Union[str, Path]) -> Path:
    """The folder holding config.json and the weights: `<snapshot>/transformer` or `snapshot`.

    Raises:
        CheckpointError: the directory does not exist or holds no transformer config.
    """
    root = Path(snapshot)
    if not root.is_dir():
        raise CheckpointError(
            f"snapshot directory {str(root)!r} does not exist; give a local directory in the "
            "Hugging Face snapshot layout (with transformer/config.json)"
        )
    for candidate in (root / TRANSFORMER_FOLDER, root):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    raise CheckpointError(
        f"no {TRANSFORMER_FOLDER}/{CONFIG_FILE} in snapshot {str(root)!r} (found: "
        f"{', '.join(sorted(path.name for path in root.iterdir())) or 'nothing'}); a diffusers "
        "snapshot keeps the transformer in its own folder"
    )


def read_transformer_config(snapshot: Union[str, Path]) -> dict[str, Any]:
    """The transformer's config.json as a dict, checked to describe Qwen-Image's transformer.

    Raises:
        CheckpointError: missing directory or file, invalid JSON, or a `_class_name` other
            than QwenImageTransformer2DModel ("wrong architecture"). Unknown fields are
            rejected later by `QwenImageTransformer.from_diffusers_config`.
    """
    path = transformer_directory(snapshot) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object (got {type(config).__name__})")
    class_name = config.get("_class_name")
    if class_name != TRANSFORMER_CLASS_NAME:
        raise CheckpointError(
            f"wrong architecture in {path}: _class_name is {class_name!r}, expected "
            f"{TRANSFORMER_CLASS_NAME!r}; this loader reads Qwen-Image transformer snapshots"
        )
    return config


def weight_files(snapshot: Union[str, Path]) -> list[Path]:
    """The safetensors files of the transformer: the shards named by the index, or one file.

    Raises:
        CheckpointError: no weights, an unreadable index, or shards the index names but that
            are not on disk.
    """
    directory = transformer_directory(snapshot)
    index_path = directory / WEIGHTS_INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(
                f"{index_path} is not a safetensors index with a 'weight_map' ({error!r})"
            ) from None
        names = sorted(set(weight_map.values()))
        absent = [name for name in names if not (directory / name).is_file()]
        if absent:
            raise CheckpointError(
                f"{index_path} names shard(s) that are missing from {directory}: "
                f"{', '.join(absent)}; the snapshot download is incomplete"
            )
        return [directory / name for name in names]
    single = directory / SINGLE_WEIGHTS_FILE
    if single.is_file():
        return [single]
    raise CheckpointError(
        f"no transformer weights in {directory}: expected {WEIGHTS_INDEX_FILE} with its "
        f"shards or {SINGLE_WEIGHTS_FILE}"
    )


def checkpoint_tensor_shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str, Path]]:
    """{key: (shape, safetensors dtype name, file)} read from the headers only (no data).

    Each header is checked by the converter's reader (`read_checked_header`): a header length
    inside the file, valid JSON, known dtypes, byte ranges that match the shapes and tile the
    data area without overlap.

    Raises:
        CheckpointError: a corrupt header (naming the file and the tensor), or a key stored
            in two files.
    """
    entries: dict[str, tuple[tuple[int, ...], str, Path]] = {}
    for path in files:
        try:
            header = read_checked_header(path)
        except CheckpointFormatError as error:
            raise CheckpointError(
                f"{error}; download the snapshot's file again (or repair it)"
            ) from None
        for key, entry in header.tensors.items():
            if key in entries:
                raise CheckpointError(
                    f"key {key!r} is stored twice: in {entries[key][2].name} and {path.name}"
                )
            entries[key] = (entry.shape, entry.dtype_code, path)
    return entries


# --------------------------------------------------------------------------------------------
# dtypes


def resolve_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """A torch dtype from "fp32" / "bf16" / "fp16" (or their long names, or a torch.dtype).

    Raises:
        CheckpointError: any other name or dtype.
    """
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise CheckpointError(
        f"dtype {dtype!r} is not supported for the transformer weights; use one of fp32, bf16, fp16"
    )


def _run_matmul(dtype: torch.dtype, device: torch.device) -> None:
    """A 2x2 matmul in `dtype` on `device`; raises where the device cannot compute in it."""
    operand = torch.ones(2, 2, dtype=dtype, device=device)
    (operand @ operand).sum().item()


def check_dtype(dtype: Union[str, torch.dtype], device: Union[str, torch.device]) -> torch.dtype:
    """Resolve `dtype` and check that `device` can run matrix products in it.

    CUDA devices without bf16 (before Ampere) are refused by their capability; other devices
    run one 2x2 matmul (the meta device is not checked: it computes nothing).

    Raises:
        CheckpointError: an unknown dtype or one the device cannot compute in.
    """
    resolved = resolve_dtype(dtype)
    device = torch.device(device)
    if device.type == "meta":
        return resolved
    problem = None
    if device.type == "cuda" and resolved == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        problem = "the GPU has no bf16 support (compute capability below 8.0)"
    else:
        try:
            _run_matmul(resolved, device)
        except (RuntimeError, NotImplementedError) as error:
            problem = f"a {resolved} matmul failed there ({error})"
    if problem:
        raise CheckpointError(
            f"dtype {dtype!r} cannot run on device {device}: {problem}; choose another "
            "model.dtype (fp32 always works, bf16 on recent GPUs)"
        )
    return resolved


# --------------------------------------------------------------------------------------------
# building


def build_transformer(
    source: Union[str, Path],
    *,
    device: Union[str, torch.device] = "meta",
    init_context: Optional[AbstractContextManager] = None,
    shift_scale: float = DEFAULT_CONDITION_SHIFT.scale,
    shift_bias: float = DEFAULT_CONDITION_SHIFT.bias,
    shift_learnable: bool = DEFAULT_CONDITION_SHIFT.learnable,
) -> QwenImageTransformer:
    """Build the transformer of a snapshot directory or a preset without loading weights.

    The model is built by its spec (`apex_dist.models.specs.qwen_image`); E2 holds its own
    random values until the weights are loaded (`load_transformer_weights` sets it to E1 when
    the snapshot has none) or `conditioning.init_apex_weights` runs.

    Args:
        source: a Qwen-Image preset name, or a snapshot directory whose
            transformer/config.json gives the sizes.
        device: where parameters are created; "meta" (default) allocates nothing, and
            `load_transformer_weights` materialises each parameter from the checkpoint.
        init_context: a context to build under instead of `device` (for example
            `deepspeed.zero.Init(...)`, which partitions each parameter as it is created).
        shift_scale, shift_bias, shift_learnable: the condition shift (method.md section 2);
            its two values live on the CPU on a meta model (`ConditionShift`).

    Raises:
        CheckpointError: `source` is neither a preset nor an existing snapshot (a Path or a
            string with "/" is always taken as a directory), or its config is not
            Qwen-Image's. ValueError from the model for inconsistent sizes.
    """
    from apex_dist.models.spec import model_specs
    from apex_dist.models.specs.qwen_image import SPEC as QWEN_IMAGE_SPEC
    from apex_dist.models.specs.qwen_image import QwenImageSpec

    specs = [spec for spec in model_specs().values() if isinstance(spec, QwenImageSpec)]
    presets = {preset: spec for spec in specs for preset in spec.presets}
    if str(source) in presets:
        spec = presets[str(source)]
        architecture = dict(spec.presets[str(source)])
    elif isinstance(source, Path) or "/" in str(source) or Path(source).is_dir():
        spec, architecture = QWEN_IMAGE_SPEC, read_transformer_config(source)
    else:
        raise CheckpointError(
            f"{str(source)!r} is neither a Qwen-Image preset ({', '.join(presets)}) "
            "nor an existing snapshot directory"
        )
    shift = ConditionShiftConfig(scale=shift_scale, bias=shift_bias, learnable=shift_learnable)
    with init_context if init_context is not None else torch.device(device):
        return spec.build(architecture, shift)


def _is_meta(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "meta"


# --------------------------------------------------------------------------------------------
# loading


@contextlib.contextmanager
def fill_everywhere(parameter: nn.Parameter) -> Iterator[bool]:
    """The default parameter context: nothing to gather, this process fills the parameter."""
    del parameter
    yield True


def model_tensor_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """{key: full shape} of the model's parameters and persistent buffers.

    ZeRO-3 partitioned parameters report their full shape in `ds_shape` (their local tensor
    is a flat shard), so shapes are read from there when present.
    """
    shapes = {
        name: tuple(getattr(parameter, "ds_shape", parameter.shape))
        for name, parameter in model.named_parameters()
    }
    for name, buffer in model.state_dict(keep_vars=True).items():
        if name not in shapes:
            shapes[name] = tuple(buffer.shape)
    return shapes


def _same_shift_value(key: str, first: tuple[int, ...], second: tuple[int, ...]) -> bool:
    """A condition-shift value stored 0-dim (fixed) or as a one-element vector (learnable):
    one number either way, compared and never applied (`_compare_shift`)."""
    return key.startswith("condition_shift.") and math.prod(first) == math.prod(second) == 1


def compare_keys(
    checkpoint_shapes: Mapping[str, tuple[int, ...]],
    model_shapes: Mapping[str, tuple[int, ...]],
    source: str,
) -> None:
    """Raise one `CheckpointMismatchError` listing every key that does not fit.

    The APEX additions (`time_text_embed_2.*`, `condition_shift.*`) may be absent: a plain
    diffusers checkpoint has neither.
    """
    missing = sorted(
        key for key in model_shapes if key not in checkpoint_shapes and not is_apex_key(key)
    )
    unexpected = sorted(key for key in checkpoint_shapes if key not in model_shapes)
    mismatched = {
        key: (tuple(checkpoint_shapes[key]), tuple(model_shapes[key]))
        for key in sorted(checkpoint_shapes)
        if key in model_shapes
        and tuple(checkpoint_shapes[key]) != tuple(model_shapes[key])
        and not _same_shift_value(key, checkpoint_shapes[key], model_shapes[key])
    }
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(source, missing, unexpected, mismatched)


def _materialise(model: nn.Module, name: str, tensor: torch.Tensor, is_parameter: bool) -> None:
    """Replace the meta parameter or buffer `name` by `tensor` (keeping requires_grad)."""
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    if is_parameter:
        old = module._parameters[attribute]
        module._parameters[attribute] = nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        module._buffers[attribute] = tensor


@torch.no_grad()
def load_transformer_weights(
    model: QwenImageTransformer,
    snapshot: Union[str, Path],
    dtype: Union[str, torch.dtype] = "fp32",
    parameter_context: Optional[ParameterContext] = None,
) -> list[str]:
    """Load a snapshot's transformer weights into `model`, streaming one tensor at a time.

    Order of work: the dtype is checked on the model's device; the headers of every file are
    compared with the model (one error for all problems); then each tensor is read, cast to
    `dtype` and copied into its parameter inside `parameter_context(parameter)`. Parameters
    on the meta device are replaced by the loaded tensor instead (nothing is allocated before
    that tensor is read). Without E2 in the checkpoint (a diffusers checkpoint), E2 is set to
    the loaded E1 (`conditioning.init_apex_weights`). The condition shift is the config's
    (the model's, as built): values a snapshot stores for it are compared, never copied, and
    a disagreement is logged as a warning naming both (`check_condition_shift`).

    Args:
        model: a `QwenImageTransformer` (built on the meta device, on a real device, or under
            `deepspeed.zero.Init`, whose parameters must already have `dtype`).
        snapshot: the snapshot directory or its transformer folder.
        dtype: "fp32", "bf16", "fp16" or a torch dtype; the model's floating-point tensors
            end up in it.
        parameter_context: `parameter_context(parameter)` -> context manager whose value is
            True where this process fills the parameter; default: no gathering, fill here.

    Returns:
        The model keys the checkpoint lacked (only APEX additions; others raise).

    Raises:
        CheckpointError: missing files, wrong architecture, an unusable dtype.
        CheckpointMismatchError: missing, unexpected or mis-shaped keys (all listed).
    """
    context = parameter_context or fill_everywhere
    read_transformer_config(snapshot)
    files = weight_files(snapshot)
    parameters = dict(model.named_parameters())
    devices = {
        tensor.device for tensor in [*parameters.values(), *model.buffers()] if not _is_meta(tensor)
    }
    resolved = check_dtype(dtype, next(iter(devices)) if devices else "meta")
    partitioned = [name for name, parameter in parameters.items() if hasattr(parameter, "ds_id")]
    wrong_dtype = [name for name in partitioned if parameters[name].dtype != resolved]
    if wrong_dtype:
        raise CheckpointError(
            f"{len(wrong_dtype)} partitioned parameter(s) (e.g. {wrong_dtype[0]}) have dtype "
            f"{parameters[wrong_dtype[0]].dtype}, not the requested {resolved}: build the model "
            "with apex_dist.distributed.zero_loading.load_pretrained_transformer_zero3, which "
            "sets zero.Init's precision from the dtype"
        )
    if any(".base_layer." in name for name in parameters):
        raise CheckpointError(
            "the model already has LoRA adapters (its base weights are named *.base_layer.*): "
            "load the base weights first, then call apply_lora"
        )

    entries = checkpoint_tensor_shapes(files)
    compare_keys(
        {key: shape for key, (shape, _, _) in entries.items()},
        model_tensor_shapes(model),
        str(transformer_directory(snapshot)),
    )
    non_float = [
        key for key, (_, kind, _) in entries.items() if kind not in SAFETENSORS_FLOAT_DTYPES
    ]
    if non_float:
        raise CheckpointError(
            f"checkpoint tensors {non_float[:MAX_KEYS_LISTED]} are not floating point; a "
            "transformer checkpoint holds only float weights"
        )

    # real tensors switch dtype now (partitioned ones already have it); meta ones when loaded
    unpartitioned = [parameters[name] for name in parameters if name not in set(partitioned)]
    for tensor in [*unpartitioned, *model.buffers()]:
        if not _is_meta(tensor) and tensor.is_floating_point() and tensor.dtype != resolved:
            tensor.data = tensor.data.to(resolved)

    buffers = dict(model.named_buffers())
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                if key.startswith(CONDITION_SHIFT_PREFIX):
                    current = parameters.get(key, buffers.get(key))
                    check_condition_shift(key, handle.get_tensor(key), current, context, path)
                    continue
                target = parameters.get(key)
                if target is None:  # a buffer
                    tensor = handle.get_tensor(key).to(resolved)
                    if _is_meta(buffers[key]):
                        _materialise(model, key, tensor, is_parameter=False)
                    else:
                        buffers[key].copy_(tensor)
                    continue
                if _is_meta(target):
                    _materialise(model, key, handle.get_tensor(key).to(resolved), True)
                    continue
                with context(target) as fill_here:
                    if fill_here:
                        target.data.copy_(handle.get_tensor(key))  # copy_ casts to the dtype

    absent = [key for key in model_tensor_shapes(model) if key not in entries]
    _materialise_absent(model, absent, resolved)
    if any(key.startswith(f"{TARGET_TIME_EMBEDDING}.") for key in absent):
        init_apex_weights(model, context)
    return absent


def check_condition_shift(
    key: str,
    stored: torch.Tensor,
    current: torch.Tensor,
    context: ParameterContext,
    path: Path,
) -> bool:
    """Compare a condition-shift value a snapshot stores with the model's (the config's).

    The config is the one source of the shift: the stored value is never applied. When the
    two differ, a warning names both and says how to use the stored one. Returns whether they
    agree. `current` may be a ZeRO-3 partitioned parameter (a learnable shift): it is read
    inside `context`, which every rank enters.
    """
    with context(current):
        model_value = float(current.detach().float().reshape(()))
    stored_value = float(stored.float().reshape(()))
    if stored_value == model_value:
        return True
    option = f"method.{key}"
    logger.warning(
        "%s stores %s = %r but the config gives %s = %r; the config's value is used (set "
        "%s=%r to train with the snapshot's)",
        path,
        key,
        stored_value,
        option,
        model_value,
        option,
        stored_value,
    )
    return False


def _materialise_absent(model: nn.Module, absent: list[str], dtype: torch.dtype) -> None:
    """Give meta tensors the checkpoint lacked real (uninitialised) storage; E2 is set next
    (`init_apex_weights`)."""
    parameters = dict(model.named_parameters())
    for key in absent:
        tensor = parameters.get(key)
        if tensor is not None and _is_meta(tensor):
            empty = torch.empty(tensor.shape, dtype=dtype)
            _materialise(model, key, empty, is_parameter=True)
    leftover = [key for key, value in model.state_dict().items() if _is_meta(value)]
    if leftover:
        raise CheckpointError(
            f"tensors {leftover} are still on the meta device after loading and have no "
            "defined value; build the model with build_transformer, which creates them"
        )


def load_pretrained_transformer(
    snapshot: Union[str, Path],
    dtype: Union[str, torch.dtype] = "fp32",
    *,
    init_context: Optional[AbstractContextManager] = None,
    parameter_context: Optional[ParameterContext] = None,
    **shift_options: Any,
) -> QwenImageTransformer:
    """Build the snapshot's transformer and load its weights (see `build_transformer` and
    `load_transformer_weights`; E2 is E1 unless the snapshot has its own); on the meta device
    unless `init_context` is given."""
    model = build_transformer(snapshot, init_context=init_context, **shift_options)
    load_transformer_weights(model, snapshot, dtype, parameter_context)
    return model
