"""One attention entry point for every model in apex_dist, dispatching to the fastest backend.

`attention(query, key, value, key_padding_mask)` computes softmax attention over
(batch, heads, tokens, head_dim) tensors. With `backend="auto"` (the default, or the backend set
by `set_attention_backend` from `model.kernels.attention_backend`) it runs the first backend of
`rank_backends` that supports the call: its device, dtype, head size, padding and what is
installed.

Backends (fastest first on an H100 at Qwen-Image's shape, see docs/performance.md):

==========  ==========================================================================
flash_attn  the flash-attn package: FA3 (`flash_attn_interface`, Hopper) or FA2
            (`flash_attn`); bf16/fp16, head_dim <= 256 and a multiple of 8, sm80+
            (FA3: sm90). Padding: per-row key lengths (varlen).
cudnn       PyTorch SDPA's cuDNN kernel; bf16/fp16, head_dim <= 128 and a multiple of
            8, sm80+. Padding: rows grouped by key mask, each group without a mask.
flash       PyTorch SDPA's FlashAttention-2; CUDA: bf16/fp16, head_dim <= 256 and a
            multiple of 8, sm80+; padding grouped. CPU: PyTorch's fused CPU kernel, any
            float dtype, boolean key mask passed through.
efficient   PyTorch SDPA's memory-efficient kernel; CUDA only; fp32/bf16/fp16,
            head_dim a multiple of 8 (fp32: of 4). Padding grouped.
math        PyTorch SDPA's reference composition; everything; boolean key mask.
==========  ==========================================================================

Order (`rank_backends`): CUDA sm90+ with FA3: flash_attn, cudnn, flash, efficient, math;
CUDA sm90+ otherwise: cudnn, flash_attn (FA2), flash, efficient, math; CUDA sm80-sm89:
flash_attn, flash, cudnn, efficient, math (cuDNN's lead is measured on Hopper only); CUDA
below sm80: efficient, math; CPU: flash, math; other devices: math.

Padding never becomes a dense float mask: the varlen path packs each row's valid keys, and the
grouping path cuts the padded keys out of each group of rows sharing a mask, so the kernel
runs unmasked. Queries are never dropped, so padded query positions get the same output as
with a boolean key mask (the reference).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional
from torch.nn.attention import SDPBackend, sdpa_kernel

# Backend names accepted by `attention(backend=...)` and `model.kernels.attention_backend`.
BACKENDS = ("flash_attn", "cudnn", "flash", "efficient", "math")
BACKEND_CHOICES = ("auto", *BACKENDS)

# Ways padded keys reach a backend.
PADDING_NONE = "none"  # the call has no padding
PADDING_MASK = "mask"  # a boolean (batch, 1, 1, keys) mask passed to the kernel
PADDING_GROUP = "group"  # rows grouped by mask, padded keys cut out, kernel runs unmasked
PADDING_VARLEN = "varlen"  # per-row key lengths (flash-attn varlen)

HALF_DTYPES = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float32, *HALF_DTYPES)
# Head-size limits of the CUDA kernels (flash-attn 2/3 and PyTorch's flash: 256; PyTorch's
# cuDNN SDPA: 128); head sizes must be multiples of 8 (16-byte loads of half values), or of 4
# for fp32 in the memory-efficient kernel.
FLASH_MAX_HEAD_DIM = 256
CUDNN_MAX_HEAD_DIM = 128
HALF_HEAD_DIM_MULTIPLE = 8
FP32_HEAD_DIM_MULTIPLE = 4
# Compute capabilities: flash and cuDNN kernels need Ampere (8.0); FA3 is written for Hopper
# (9.x), where cuDNN SDPA measured 582 TFLOP/s against 294 for FA2 (architecture.md).
AMPERE = (8, 0)
HOPPER_MAJOR = 9

_SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


@dataclass(frozen=True)
class AttentionCall:
    """What the backend choice depends on, taken from one call.

    Args:
        device_type: "cuda", "cpu", ...
        dtype: dtype of query, key and value.
        head_dim: last dimension of query and key.
        padded: whether a key padding mask is given.
        compute_capability: (major, minor) of the CUDA device; None elsewhere.
    """

    device_type: str
    dtype: torch.dtype
    head_dim: int
    padded: bool = False
    compute_capability: Optional[tuple[int, int]] = None


@dataclass(frozen=True)
class Availability:
    """What is installed: the SDPA backends compiled into PyTorch for the device and the
    flash-attn major version (2, 3, or None when not importable)."""

    sdpa: frozenset[str] = frozenset({"math"})
    flash_attn_version: Optional[int] = None


def unsupported_reason(
    backend: str, call: AttentionCall, availability: Availability
) -> Optional[str]:
    """Why `backend` cannot run `call` (a sentence), or None when it can."""
    if backend not in BACKENDS:
        return f"unknown attention backend {backend!r}; known: {', '.join(BACKEND_CHOICES)}"
    if backend == "math":
        return None
    on_cuda = call.device_type == "cuda"
    capability = call.compute_capability or (0, 0)
    half = call.dtype in HALF_DTYPES
    multiple_of_8 = call.head_dim % HALF_HEAD_DIM_MULTIPLE == 0
    if backend == "flash" and call.device_type == "cpu":
        return None if call.dtype in FLOAT_DTYPES else f"needs a float dtype (got {call.dtype})"
    if not on_cuda:
        return f"needs a CUDA device (got {call.device_type})"
    if backend != "flash_attn" and backend not in availability.sdpa:
        return f"this PyTorch build has no {backend} SDPA kernel for CUDA"
    if backend == "efficient":
        if call.dtype not in FLOAT_DTYPES:
            return f"needs fp32, bf16 or fp16 (got {call.dtype})"
        multiple = HALF_HEAD_DIM_MULTIPLE if half else FP32_HEAD_DIM_MULTIPLE
        if call.head_dim % multiple:
            return f"needs head_dim a multiple of {multiple} (got {call.head_dim})"
        return None
    # flash_attn, cudnn, flash on CUDA
    if not half:
        return f"needs bf16 or fp16 (got {call.dtype})"
    limit = CUDNN_MAX_HEAD_DIM if backend == "cudnn" else FLASH_MAX_HEAD_DIM
    if not multiple_of_8 or call.head_dim > limit:
        return f"needs head_dim <= {limit} and a multiple of 8 (got {call.head_dim})"
    if capability < AMPERE:
        return f"needs compute capability 8.0 or newer (got {capability[0]}.{capability[1]})"
    if backend == "flash_attn":
        if availability.flash_attn_version is None:
            return "flash-attn is not installed (pip install flash-attn; it builds with nvcc)"
        if availability.flash_attn_version == 3 and capability[0] != HOPPER_MAJOR:
            return f"flash-attn 3 runs on Hopper (sm90) only (got sm{capability[0]}{capability[1]})"
    return None


def preference_order(call: AttentionCall, availability: Availability) -> tuple[str, ...]:
    """Backends for the call's device, fastest first (the table in the module docstring)."""
    if call.device_type == "cpu":
        return ("flash", "math")
    if call.device_type != "cuda":
        return ("math",)
    capability = call.compute_capability or (0, 0)
    if capability[0] >= HOPPER_MAJOR:
        if availability.flash_attn_version == 3:
            return ("flash_attn", "cudnn", "flash", "efficient", "math")
        return ("cudnn", "flash_attn", "flash", "efficient", "math")
    if capability >= AMPERE:
        return ("flash_attn", "flash", "cudnn", "efficient", "math")
    return ("efficient", "math")


def rank_backends(call: AttentionCall, availability: Availability) -> list[str]:
    """The backends that can run `call`, fastest first; never empty (math runs everything)."""
    order = preference_order(call, availability)
    return [name for name in order if unsupported_reason(name, call, availability) is None]


def choose_backend(call: AttentionCall, availability: Availability) -> str:
    """The fastest backend that supports `call` (pure logic: testable for any device)."""
    return rank_backends(call, availability)[0]


def padding_strategy(backend: str, device_type: str, padded: bool) -> str:
    """How padded keys reach `backend`: PADDING_NONE, _MASK, _GROUP or _VARLEN."""
    if not padded:
        return PADDING_NONE
    if backend == "flash_attn":
        return PADDING_VARLEN
    if backend == "math" or (backend == "flash" and device_type == "cpu"):
        return PADDING_MASK
    return PADDING_GROUP


# --------------------------------------------------------------------------------------------
# what this machine has


def _flash_attn_module() -> tuple[Optional[int], Optional[object]]:
    """(major version, module) of the installed flash-attn, FA3 preferred; (None, None)."""
    for version, name in ((3, "flash_attn_interface"), (2, "flash_attn")):
        try:
            return version, importlib.import_module(name)
        except ImportError:
            continue
    return None, None


_AVAILABILITY: dict[str, Availability] = {}


def detect_availability(device_type: str) -> Availability:
    """What this machine can run for tensors on `device_type` (cached per device type)."""
    if device_type not in _AVAILABILITY:
        sdpa = {"math"}
        version = None
        if device_type == "cpu":
            sdpa.add("flash")
        elif device_type == "cuda" and torch.cuda.is_available():
            sdpa.add("efficient")
            if torch.backends.cuda.is_flash_attention_available():
                sdpa.add("flash")
            if torch.backends.cudnn.is_available():
                sdpa.add("cudnn")
            version, _ = _flash_attn_module()
        _AVAILABILITY[device_type] = Availability(frozenset(sdpa), version)
    return _AVAILABILITY[device_type]


def describe_call(query: Tensor, padded: bool) -> AttentionCall:
    """The `AttentionCall` of a query tensor on its own device."""
    capability = None
    if query.device.type == "cuda":
        capability = tuple(torch.cuda.get_device_capability(query.device))
    return AttentionCall(query.device.type, query.dtype, query.shape[-1], padded, capability)


# --------------------------------------------------------------------------------------------
# the configured default


_default_backend = "auto"


def set_attention_backend(name: str) -> None:
    """Set the backend used when a call passes none ("auto" restores the automatic choice)."""
    global _default_backend
    if name not in BACKEND_CHOICES:
        raise ValueError(
            f"attention backend {name!r} is unknown; choose one of {', '.join(BACKEND_CHOICES)} "
            "(model.kernels.attention_backend)"
        )
    _default_backend = name


def get_attention_backend() -> str:
    """The backend used when a call passes none."""
    return _default_backend


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Use backend `name` inside the block, then restore the previous default."""
    previous = _default_backend
    set_attention_backend(name)
    try:
        yield
    finally:
        set_attention_backend(previous)


def resolve_backend(query: Tensor, padded: bool, backend: Optional[str] = None) -> str:
    """The backend a call would run: `backend`, else the default, with "auto" resolved.

    A named backend that cannot run the call raises a ValueError saying why.
    """
    name = backend or _default_backend
    call = describe_call(query, padded)
    availability = detect_availability(call.device_type)
    if name == "auto":
        return choose_backend(call, availability)
    reason = unsupported_reason(name, call, availability)
    if reason is not None:
        raise ValueError(
            f"attention backend {name!r} cannot run this call: {reason}. Use "
            "model.kernels.attention_backend=auto to pick a supported one."
        )
    return name


# --------------------------------------------------------------------------------------------
# padding without a dense mask


def _sdpa(backend: str) -> Callable[..., Tensor]:
    """scaled_dot_product_attention restricted to one SDPA backend."""

    def run(query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        with sdpa_kernel(_SDPA_BACKENDS[backend]):
            return functional.scaled_dot_product_attention(query, key, value, attn_mask=mask)

    return run


def attention_grouped_by_mask(
    query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor, run: Callable
) -> Tensor:
    """Attention with padded keys cut out: rows sharing one key mask run as one unmasked call.

    Args:
        query: (B, H, Lq, D); key, value: (B, H, Lk, D).
        key_padding_mask: (B, Lk) bool, True for real keys.
        run: run(query, key, value) -> (b, H, Lq, D), an unmasked attention.

    One host synchronisation finds the distinct masks; a batch whose rows share a mask (the
    common case of equal text lengths) makes one call.
    """
    valid_counts = key_padding_mask.sum(dim=1)
    if bool((valid_counts == 0).any()):
        row = int((valid_counts == 0).nonzero()[0])
        raise ValueError(
            f"key_padding_mask row {row} has no real key: attention over nothing is undefined"
        )
    patterns, group_of_row = torch.unique(key_padding_mask, dim=0, return_inverse=True)
    outputs, row_order = [], []
    for group, pattern in enumerate(patterns):
        rows = (group_of_row == group).nonzero().squeeze(1)
        keep = pattern.nonzero().squeeze(1)
        outputs.append(run(query[rows], key[rows][:, :, keep], value[rows][:, :, keep]))
        row_order.append(rows)
    if len(outputs) == 1:
        return outputs[0]
    grouped = torch.cat(outputs)  # rows in group order
    return grouped[torch.argsort(torch.cat(row_order))]


def attention_varlen(
    query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor, varlen: Callable
) -> Tensor:
    """Attention through a flash-attn style varlen function on packed valid keys.

    Every row keeps all its queries; its keys and values are packed without padding, with
    cumulative lengths telling the kernel where each row starts.

    Args:
        query: (B, H, Lq, D); key, value: (B, H, Lk, D).
        key_padding_mask: (B, Lk) bool, True for real keys.
        varlen: varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) on
            (tokens, H, D) tensors (flash-attn's `flash_attn_varlen_func`).
    """
    batch, heads, query_tokens, head_dim = query.shape
    device = query.device
    key_lengths = key_padding_mask.sum(dim=1, dtype=torch.int32)  # (B,)
    if bool((key_lengths == 0).any()):
        raise ValueError("key_padding_mask has a row with no real key: attention is undefined")
    zero = torch.zeros(1, dtype=torch.int32, device=device)
    cumulative_keys = torch.cat([zero, key_lengths.cumsum(0, dtype=torch.int32)])
    cumulative_queries = torch.arange(
        0, (batch + 1) * query_tokens, query_tokens, dtype=torch.int32, device=device
    )
    packed_query = query.transpose(1, 2).reshape(batch * query_tokens, heads, head_dim)
    packed_key = key.transpose(1, 2)[key_padding_mask]  # (valid keys, H, D)
    packed_value = value.transpose(1, 2)[key_padding_mask]
    output = varlen(
        packed_query,
        packed_key,
        packed_value,
        cumulative_queries,
        cumulative_keys,
        query_tokens,
        int(key_lengths.max()),
    )
    if isinstance(output, tuple):  # some flash-attn 3 releases also return the log-sum-exp
        output = output[0]
    return output.reshape(batch, query_tokens, heads, -1).transpose(1, 2)


def _flash_attn(query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor]) -> Tensor:
    """flash-attn (FA3 or FA2) on (B, H, L, D) tensors, varlen when padded."""
    _, module = _flash_attn_module()
    if mask is not None:
        return attention_varlen(query, key, value, mask, module.flash_attn_varlen_func)
    output = module.flash_attn_func(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    )
    if isinstance(output, tuple):
        output = output[0]
    return output.transpose(1, 2)


# --------------------------------------------------------------------------------------------
# the entry point


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Softmax attention over (B, heads, L, head_dim) tensors with scale 1/sqrt(head_dim).

    Args:
        query: (B, H, Lq, D).
        key, value: (B, H, Lk, D).
        key_padding_mask: optional (B, Lk) bool, True where a key is a real token; None means
            no padding (the fastest kernels run without any mask).
        backend: one of BACKEND_CHOICES, or None for the configured default
            (`set_attention_backend`, "auto" unless configured).
    """
    if query.dim() != 4 or key.shape != value.shape or query.shape[:2] != key.shape[:2]:
        raise ValueError(
            "attention expects (batch, heads, tokens, head_dim) tensors with matching batch and "
            f"heads; got query {tuple(query.shape)}, key {tuple(key.shape)}, "
            f"value {tuple(value.shape)}"
        )
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (key.shape[0], key.shape[2]):
            raise ValueError(
                f"key_padding_mask {tuple(key_padding_mask.shape)} must be (batch, key tokens) = "
                f"({key.shape[0]}, {key.shape[2]})"
            )
        key_padding_mask = key_padding_mask.to(torch.bool)
    padded = key_padding_mask is not None
    name = resolve_backend(query, padded, backend)
    strategy = padding_strategy(name, query.device.type, padded)
    if name == "flash_attn":
        return _flash_attn(query, key, value, key_padding_mask)
    run = _sdpa(name)
    if strategy == PADDING_GROUP:
        return attention_grouped_by_mask(query, key, value, key_padding_mask, run)
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    return run(query, key, value, mask)
