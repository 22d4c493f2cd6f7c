"""Triton kernels. Each module is imported on first use, so TRITON_INTERPRET=1 set before
that use (on CPU tensors) selects Triton's interpreter."""
