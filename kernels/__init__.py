"""apex_kernels: attention dispatch and fused ops, each with a PyTorch reference and a fallback.

- `attention`: one entry point, dispatching to flash-attn, cuDNN, flash, memory-efficient or
  math attention (`apex_kernels.attention` module docstring has the rule table).
- `rms_norm_rotary`, `layer_norm_modulate`, `gated_residual`: fused Triton kernels on CUDA,
  PyTorch references elsewhere (`apex_kernels.fused` says when each runs).
- `compile_blocks`: torch.compile per transformer block.
- `configure`: applies the `model.kernels` section of the run configuration.
"""

from apex_kernels.attention import (
    BACKEND_CHOICES,
    attention,
    attention_backend,
    choose_backend,
    get_attention_backend,
    set_attention_backend,
)
from apex_kernels.compile import compile_blocks
from apex_kernels.fused import (
    fused_kernels,
    fused_kernels_enabled,
    get_fused_kernels,
    set_fused_kernels,
)
from apex_kernels.modulation import gated_residual, layer_norm_modulate
from apex_kernels.norm_rope import rms_norm_rotary


def configure(attention_backend: str = "auto", fused: bool = True) -> None:
    """Set the process-wide attention backend and fused-kernel switch.

    Args:
        attention_backend: "auto" or a backend of BACKEND_CHOICES
            (`model.kernels.attention_backend`).
        fused: run the fused Triton kernels on CUDA (`model.kernels.fused`).
    """
    set_attention_backend(attention_backend)
    set_fused_kernels(bool(fused))


__all__ = [
    "BACKEND_CHOICES",
    "attention",
    "attention_backend",
    "choose_backend",
    "compile_blocks",
    "configure",
    "fused_kernels",
    "fused_kernels_enabled",
    "gated_residual",
    "get_attention_backend",
    "get_fused_kernels",
    "layer_norm_modulate",
    "rms_norm_rotary",
    "set_attention_backend",
    "set_fused_kernels",
]
