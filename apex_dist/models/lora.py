"""LoRA adapters on the Qwen-Image transformer (peft), method.md section 8.

`apply_lora(model, lora_config)` injects peft LoRA layers in place, keeping diffusers' module
paths (no `base_model.model.` prefix): `transformer_blocks.3.attn.to_q` stays that path, its
base weight moves to `...to_q.base_layer.weight` and the adapter lives in
`...to_q.lora_A.default.weight` / `...to_q.lora_B.default.weight`. Afterwards:

- every base parameter is frozen; adapters are fp32 whatever the base dtype (peft casts a
  layer's input to the adapter dtype and the sum back to the base dtype);
- the second time embedding E2 (`time_text_embed_2.*`) and a learnable condition shift are
  trained as full parameters, in fp32 like the adapters (ZeRO-3 needs one dtype for all
  trainable parameters);
- `adapters_disabled(model)` turns the model back into the frozen base exactly: adapters off
  and E2 replaced by its value at `apply_lora` time (kept as non-persistent buffers), which
  is what the `frozen_base` reference needs (method.md section 6), at no copy of the model.

Target presets (config `model.lora.targets`) are declared by the model's spec
(`ModelSpec.lora_targets`); Qwen-Image's (`LORA_TARGET_PRESETS`, the default here):
- `attention`: q/k/v/out projections of both streams (to_q, to_k, to_v, to_out.0, add_q_proj,
  add_k_proj, add_v_proj, to_add_out);
- `attention_mlp`: plus both MLPs (img_mlp / txt_mlp: net.0.proj and net.2);
- `attention_mlp_time` (default, the released recipe): plus E1's timestep embedder
  (time_text_embed.timestep_embedder.linear_1 / linear_2).

Trainable parameters of `qwen-image-20b` at rank 64 (`attention_mlp_time`; counted by hand
from the shapes, a test checks them on the meta device): per block 8 attention projections
of 3072 -> 3072 at 64 * (3072 + 3072) = 393,216 each and 4 MLP layers (3072 <-> 12288) at
64 * (3072 + 12288) = 983,040 each, 7,077,888 per block, 424,673,280 for 60 blocks; the
timestep embedder 64 * (256 + 3072) + 64 * (3072 + 3072) = 606,208: 425,279,488 adapter
parameters (about 0.42 B), plus E2's 10,229,760: 435,509,248 trainable.

State dicts: `lora_state_dict(model)` gives the trainable tensors in apex naming
(`<module path>.lora_A.weight`, `<module path>.lora_B.weight`, E2 and a learnable shift under
their model keys); `to_diffusers_lora` maps the adapters one-to-one onto diffusers' LoRA keys
(`transformer.<module path>.lora_A.weight`), `from_diffusers_lora` maps them back.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional

from apex_dist.config import LORA_INITIALISATIONS
from apex_dist.models.conditioning import APEX_STATE_PREFIXES
from apex_dist.models.qwen_image import QwenImageTransformer, timestep_features
from apex_dist.models.specs.qwen_image import SPEC as QWEN_IMAGE_SPEC

logger = logging.getLogger(__name__)

# peft's name for the one adapter apex_dist injects (it appears in peft's parameter names).
ADAPTER_NAME = "default"
# Prefix of diffusers' LoRA keys for the transformer (`QwenImagePipeline.load_lora_weights`).
DIFFUSERS_PREFIX = QWEN_IMAGE_SPEC.diffusers_lora_prefix
# Name under which `apply_lora` registers the frozen copy of E2 (buffers only, not saved).
BASE_TARGET_TIME_EMBEDDING = "base_time_text_embed_2"
# Prefixes of the parameters trained in full next to the adapters: the APEX additions.
FULL_PARAMETER_PREFIXES = APEX_STATE_PREFIXES
# Module paths (regular expressions over `named_modules()` names) of each Qwen-Image preset.
LORA_TARGET_PRESETS: Mapping[str, tuple[str, ...]] = QWEN_IMAGE_SPEC.lora_targets
# config `model.lora.init` -> peft's `init_lora_weights` (each leaves B @ A = 0 at the start).
PEFT_INITIALISATIONS: dict[str, Any] = {
    "gaussian": "gaussian",  # A ~ N(0, 1/r^2), B = 0 (the released code)
    "kaiming": True,  # A Kaiming-uniform, B = 0 (peft's default)
    "orthogonal": "orthogonal",  # A and B from alternate rows of one orthogonal matrix
}

_ADAPTER_KEY = re.compile(rf"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.{ADAPTER_NAME}\.weight$")
_APEX_ADAPTER_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$")

ParameterContext = Callable[[nn.Parameter], AbstractContextManager]


@contextlib.contextmanager
def _no_gather(parameter: nn.Parameter) -> Iterator[bool]:
    del parameter
    yield True


def target_module_pattern(
    targets: str, target_presets: Mapping[str, tuple[str, ...]] = LORA_TARGET_PRESETS
) -> str:
    """The regular expression (peft `target_modules`, matched in full) of a preset of
    `target_presets` (a spec's `lora_targets`)."""
    if not target_presets:
        raise ValueError(
            "this model's spec declares no LoRA targets; set model.lora.enabled=false or use a "
            "backbone with LoRA (Qwen-Image)"
        )
    if targets not in target_presets:
        raise ValueError(
            f"model.lora.targets {targets!r} is unknown; known presets: {', '.join(target_presets)}"
        )
    return "|".join(f"({pattern})" for pattern in target_presets[targets])


def target_modules(
    model: nn.Module,
    targets: str,
    target_presets: Mapping[str, tuple[str, ...]] = LORA_TARGET_PRESETS,
) -> list[str]:
    """Paths of the linear layers a preset adapts in `model` (before LoRA is applied)."""
    pattern = re.compile(target_module_pattern(targets, target_presets))
    return [
        name
        for name, module in model.named_modules()
        if pattern.fullmatch(name) and isinstance(module, nn.Linear)
    ]


class BaseTargetTimeEmbedding(nn.Module):
    """A frozen copy of E2 held in non-persistent buffers (absent from state dicts and from
    the parameters an optimizer or ZeRO sees); computes what `TimeEmbedding` computes.

    Args:
        embedding: the `time_text_embed_2` module to copy.
        parameter_context: gathers a partitioned parameter while it is read.
    """

    def __init__(self, embedding: nn.Module, parameter_context: ParameterContext = _no_gather):
        super().__init__()
        mlp = embedding.timestep_embedder
        for name, parameter in (
            ("weight_1", mlp.linear_1.weight),
            ("bias_1", mlp.linear_1.bias),
            ("weight_2", mlp.linear_2.weight),
            ("bias_2", mlp.linear_2.bias),
        ):
            with parameter_context(parameter):
                self.register_buffer(name, parameter.data.detach().clone(), persistent=False)

    def forward(self, time: Tensor, dtype: torch.dtype) -> Tensor:
        """time (B,) in the model dtype -> (B, hidden) in `dtype`."""
        hidden = functional.linear(timestep_features(time).to(dtype), self.weight_1, self.bias_1)
        return functional.linear(functional.silu(hidden), self.weight_2, self.bias_2)


def _check_lora_config(
    lora_config: Any, target_presets: Mapping[str, tuple[str, ...]] = LORA_TARGET_PRESETS
) -> None:
    problems = []
    if int(lora_config.rank) < 1:
        problems.append(f"rank must be >= 1 (got {lora_config.rank})")
    if not float(lora_config.alpha) > 0:
        problems.append(f"alpha must be > 0 (got {lora_config.alpha})")
    if lora_config.init not in LORA_INITIALISATIONS:
        problems.append(
            f"init {lora_config.init!r} is unknown; known: {', '.join(LORA_INITIALISATIONS)}"
        )
    if lora_config.targets not in target_presets:
        problems.append(
            f"targets {lora_config.targets!r} is unknown; known: {', '.join(target_presets)}"
        )
    if not 0 <= float(lora_config.dropout) < 1:
        problems.append(f"dropout must be in [0, 1) (got {lora_config.dropout})")
    if problems:
        raise ValueError("model.lora: " + "; ".join(problems))


def _tuner_layer_class() -> type:
    """peft's base class of injected layers (peft is imported on first use: it is slow to
    import and only LoRA runs need it)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return BaseTunerLayer


def is_lora_applied(model: nn.Module) -> bool:
    """True once `apply_lora` has injected adapters into `model`."""
    layer_class = _tuner_layer_class()
    return any(isinstance(module, layer_class) for module in model.modules())


def apply_lora(
    model: QwenImageTransformer,
    lora_config: Any,
    parameter_context: Optional[ParameterContext] = None,
    target_presets: Mapping[str, tuple[str, ...]] = LORA_TARGET_PRESETS,
) -> dict[str, int]:
    """Inject LoRA adapters into `model` in place and set what trains.

    Call it after the base weights are loaded (the base weights' keys gain `.base_layer`).

    Args:
        model: a `QwenImageTransformer` (any dtype; on the meta device for counting).
        lora_config: `apex_dist.config.LoraConfig` (rank, alpha, init, targets, dropout; the
            `enabled` flag is the caller's business).
        parameter_context: gathers a ZeRO-3 partitioned parameter while E2 is copied
            (`apex_dist.distributed.zero_loading.zero3_read_context`); default: none.
        target_presets: the model spec's `lora_targets` (default: Qwen-Image's).

    Returns:
        {"adapter": adapter elements, "full": E2 (+ learnable shift) elements,
        "trainable": their sum, "frozen": every other parameter element}; also logged.

    Raises:
        ValueError: a bad LoRA config, a model that already has adapters, or a preset that
            matches no module.
    """
    import peft

    if not target_presets:
        target_module_pattern(lora_config.targets, target_presets)  # raises: no LoRA targets
    _check_lora_config(lora_config, target_presets)
    if is_lora_applied(model):
        raise ValueError("apply_lora: the model already has LoRA adapters; apply it once")
    modules = target_modules(model, lora_config.targets, target_presets)
    if not modules:
        raise ValueError(
            f"model.lora.targets {lora_config.targets!r} matches no linear layer of "
            f"{type(model).__name__}; LoRA presets target the Qwen-Image transformer"
        )
    model.requires_grad_(False)
    model.register_module(
        BASE_TARGET_TIME_EMBEDDING,
        BaseTargetTimeEmbedding(model.time_text_embed_2, parameter_context or _no_gather),
    )
    on_meta = any(parameter.device.type == "meta" for parameter in model.parameters())
    peft_config = peft.LoraConfig(
        r=int(lora_config.rank),
        lora_alpha=float(lora_config.alpha),
        lora_dropout=float(lora_config.dropout),
        target_modules=target_module_pattern(lora_config.targets, target_presets),
        init_lora_weights=PEFT_INITIALISATIONS[lora_config.init],
        bias="none",
    )
    peft.inject_adapter_in_model(
        peft_config, model, adapter_name=ADAPTER_NAME, low_cpu_mem_usage=on_meta
    )
    counts = {"adapter": 0, "full": 0, "trainable": 0, "frozen": 0}
    for name, parameter in list(model.named_parameters()):
        elements = getattr(parameter, "ds_numel", parameter.numel())  # full size under ZeRO-3
        if _ADAPTER_KEY.match(name):
            parameter.data = parameter.data.float()  # fp32 adapters on any base dtype
            parameter.requires_grad_(True)
            counts["adapter"] += elements
        elif name.startswith(FULL_PARAMETER_PREFIXES):
            _train_in_fp32(model, name, parameter, parameter_context or _no_gather)
            counts["full"] += elements
        else:
            parameter.requires_grad_(False)
            counts["frozen"] += elements
    counts["trainable"] = counts["adapter"] + counts["full"]
    logger.info(
        "LoRA rank %d on %d modules (%s): %s adapter + %s full (E2) = %s trainable, %s frozen",
        lora_config.rank,
        len(modules),
        lora_config.targets,
        f"{counts['adapter']:,}",
        f"{counts['full']:,}",
        f"{counts['trainable']:,}",
        f"{counts['frozen']:,}",
    )
    return counts


def _train_in_fp32(
    model: nn.Module, name: str, parameter: nn.Parameter, parameter_context: ParameterContext
) -> None:
    """Make the fully trained parameter `name` (E2, a learnable shift) an fp32 trainable one.

    Every trainable parameter must share one dtype: DeepSpeed's ZeRO-3 optimizer packs them
    into one flat buffer (and asserts on mixed dtypes), and the adapters are fp32. A parameter
    that ZeRO-3 already partitioned (created under zero.Init in the base dtype) is gathered and
    replaced by a plain fp32 parameter, which `deepspeed.initialize` partitions with the
    adapters.
    """
    if not hasattr(parameter, "ds_id"):
        parameter.data = parameter.data.float()
        parameter.requires_grad_(True)
        return
    with parameter_context(parameter):
        value = parameter.data.detach().float().clone()
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    owner._parameters[leaf] = nn.Parameter(value, requires_grad=True)


def _tuner_layers(model: nn.Module) -> list[nn.Module]:
    layer_class = _tuner_layer_class()
    layers = [module for module in model.modules() if isinstance(module, layer_class)]
    if not layers:
        raise ValueError("adapters_disabled: the model has no LoRA adapters (call apply_lora)")
    return layers


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, `model` computes exactly the frozen base: adapters off, E2 at its value when
    `apply_lora` ran. Nothing is copied and no `requires_grad` flag changes (peft's own
    switch would flip them, which a ZeRO optimizer must not see mid-run)."""
    layers = _tuner_layers(model)
    base_embedding = model.get_submodule(BASE_TARGET_TIME_EMBEDDING)
    embedding = model.time_text_embed_2
    previous = [layer._disable_adapters for layer in layers]
    try:
        for layer in layers:
            layer._disable_adapters = True  # what BaseTunerLayer.enable_adapters(False) sets
        embedding.forward = base_embedding.forward  # the module's hooks (ZeRO) still run
        yield model
    finally:
        for layer, state in zip(layers, previous, strict=True):
            layer._disable_adapters = state
        if "forward" in vars(embedding):
            del embedding.forward


def _apex_key(name: str) -> Optional[str]:
    """Apex name of a trainable parameter, or None for a frozen one."""
    match = _ADAPTER_KEY.match(name)
    if match:
        return f"{match['module']}.{match['kind']}.weight"
    if name.startswith(FULL_PARAMETER_PREFIXES):
        return name
    return None


@torch.no_grad()
def lora_state_dict(
    model: nn.Module, parameter_context: Optional[ParameterContext] = None
) -> dict[str, Tensor]:
    """The trainable tensors (adapters, E2, a learnable shift) in apex naming, on the CPU.

    Adapter keys drop peft's adapter name: `<module path>.lora_A.weight`; the others keep
    their model key. Under ZeRO-3 pass a gathering `parameter_context` (every rank must call
    this: each parameter is gathered collectively).
    """
    _tuner_layers(model)
    context = parameter_context or _no_gather
    state = {}
    for name, parameter in model.named_parameters():
        key = _apex_key(name)
        if key is None:
            continue
        with context(parameter):
            state[key] = parameter.data.detach().to("cpu", copy=True)
    return state


def load_lora_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    parameter_context: Optional[ParameterContext] = None,
) -> None:
    """Copy a `lora_state_dict` (apex naming) back into a model with adapters, all keys
    required and no others.

    Raises:
        ValueError: missing, unexpected or mis-shaped keys, all listed.
    """
    _tuner_layers(model)
    context = parameter_context or _no_gather
    targets = {}
    for name, parameter in model.named_parameters():
        key = _apex_key(name)
        if key is not None:
            targets[key] = parameter
    missing = sorted(set(targets) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(targets))
    mismatched = [
        f"{key}: file {list(state_dict[key].shape)}, model "
        f"{list(getattr(targets[key], 'ds_shape', targets[key].shape))}"
        for key in sorted(set(targets) & set(state_dict))
        if tuple(state_dict[key].shape)
        != tuple(getattr(targets[key], "ds_shape", targets[key].shape))
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"LoRA state dict does not fit the model: missing {missing}, unexpected "
            f"{unexpected}, mis-shaped {mismatched}; rank and targets must match the run's "
            "model.lora settings"
        )
    with torch.no_grad():
        for key, parameter in targets.items():
            with context(parameter) as fill_here:
                if fill_here is not False:
                    parameter.data.copy_(state_dict[key])


def _adapter_scale(state_dict: Mapping[str, Tensor], key: str, alpha: Optional[float]) -> float:
    """alpha / rank of the adapter whose lora_A or lora_B is `key` (1 without alpha)."""
    if alpha is None:
        return 1.0
    module = key.rsplit(".lora_", 1)[0]
    rank = state_dict[f"{module}.lora_A.weight"].shape[0]
    return float(alpha) / rank


def to_diffusers_lora(
    state_dict: Mapping[str, Tensor], alpha: Optional[float] = None
) -> dict[str, Tensor]:
    """Adapters in apex naming -> diffusers' LoRA keys, one to one.

    `<path>.lora_A.weight` -> `transformer.<path>.lora_A.weight`, and likewise for lora_B.
    diffusers (and peft without metadata) read a file without alphas as W + B @ A (scale 1);
    with `alpha` given, lora_B is multiplied by alpha / rank so that the file means what the
    run trained. The default rank 64 = alpha 64 changes nothing. The full parameters (E2, a
    learnable shift) have no place in a diffusers LoRA file and are left out; the export
    writes them separately.

    Raises:
        ValueError: a key that is neither an adapter nor a known full parameter, or a lora_B
            without its lora_A.
    """
    converted = {}
    for key, tensor in state_dict.items():
        match = _APEX_ADAPTER_KEY.match(key)
        if match is None:
            if key.startswith(FULL_PARAMETER_PREFIXES):
                continue
            raise ValueError(
                f"{key!r} is not a LoRA state-dict key (expected <module>.lora_A.weight, "
                "<module>.lora_B.weight, time_text_embed_2.* or condition_shift.*)"
            )
        if f"{match['module']}.lora_A.weight" not in state_dict:
            raise ValueError(f"{key!r} has no matching {match['module']}.lora_A.weight")
        if match["kind"] == "lora_B":
            tensor = tensor * _adapter_scale(state_dict, key, alpha)
        converted[DIFFUSERS_PREFIX + key] = tensor
    return converted


def from_diffusers_lora(
    state_dict: Mapping[str, Tensor], alpha: Optional[float] = None
) -> dict[str, Tensor]:
    """diffusers' LoRA keys -> apex naming; the inverse of `to_diffusers_lora` (lora_B is
    divided by alpha / rank when `alpha` is given).

    Raises:
        ValueError: a key outside `transformer.<path>.lora_{A,B}.weight`.
    """
    stripped = {}
    for key, tensor in state_dict.items():
        name = key.removeprefix(DIFFUSERS_PREFIX)
        if name == key or not _APEX_ADAPTER_KEY.match(name):
            raise ValueError(
                f"{key!r} is not a diffusers transformer LoRA key "
                "(expected transformer.<module>.lora_A.weight or .lora_B.weight)"
            )
        stripped[name] = tensor
    return {
        key: tensor / _adapter_scale(stripped, key, alpha) if ".lora_B." in key else tensor
        for key, tensor in stripped.items()
    }
