"""apex_kernels: attention dispatch and fused ops, each with a PyTorch reference and a fallback."""

from apex_kernels.attention import attention

__all__ = ["attention"]
