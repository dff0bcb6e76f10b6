"""When the fused Triton kernels run, and loading them.

The fused ops (`rms_norm_rotary`, `layer_norm_modulate`, `gated_residual`) run their Triton
kernel when `fused_kernels_enabled(tensor)` is true and their PyTorch reference otherwise:

- mode "auto" (the default; `model.kernels.fused: true`): CUDA tensors, Triton importable.
- mode "never" (`model.kernels.fused: false`): always the PyTorch reference.
- mode "always": also CPU tensors when Triton's interpreter is on (TRITON_INTERPRET=1 before
  the kernels load), which is how the CPU tests run the kernels; without the interpreter CPU
  tensors still take the reference.

The kernels module is imported on first use, so importing apex_kernels never needs Triton.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Optional

from torch import Tensor

FUSED_MODES = ("auto", "always", "never")
_TRITON_MODULE = "apex_kernels._triton"

_mode = "auto"


def set_fused_kernels(mode: bool | str) -> None:
    """True/"auto": fused on CUDA; False/"never": never; "always": also interpreted on CPU."""
    global _mode
    if mode is True:
        mode = "auto"
    elif mode is False:
        mode = "never"
    if mode not in FUSED_MODES:
        raise ValueError(
            f"fused kernel mode {mode!r} is unknown; choose one of {', '.join(FUSED_MODES)} "
            "(model.kernels.fused is true for auto, false for never)"
        )
    _mode = mode


def get_fused_kernels() -> str:
    """The current mode: "auto", "always" or "never"."""
    return _mode


@contextlib.contextmanager
def fused_kernels(mode: bool | str) -> Iterator[None]:
    """Use fused-kernel `mode` inside the block, then restore the previous one."""
    previous = _mode
    set_fused_kernels(mode)
    try:
        yield
    finally:
        set_fused_kernels(previous)


@functools.cache
def triton_available() -> bool:
    """Whether the triton package is importable (looked up once)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_requested() -> bool:
    """Whether TRITON_INTERPRET=1 is set now."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_kernels(reload: bool = False) -> ModuleType:
    """The kernels module, imported on first use (or re-imported with `reload`).

    Triton decides between compiling and interpreting when a kernel is defined, so a module
    imported before TRITON_INTERPRET=1 was set is re-imported when the interpreter is asked
    for later.
    """
    module = sys.modules.get(_TRITON_MODULE)
    stale = module is not None and interpreter_requested() != module.INTERPRETED
    if module is None or reload or stale:
        if module is not None:
            del sys.modules[_TRITON_MODULE]
        module = importlib.import_module(_TRITON_MODULE)
    return module


def fused_kernels_enabled(tensor: Tensor, mode: Optional[str] = None) -> bool:
    """Whether an op on `tensor` runs its Triton kernel under `mode` (default: the current)."""
    mode = mode or _mode
    if mode == "never" or not triton_available():
        return False
    if tensor.is_cuda:
        return True
    return mode == "always" and tensor.device.type == "cpu" and interpreter_requested()
