"""Triton kernels for kiln fused ops."""
