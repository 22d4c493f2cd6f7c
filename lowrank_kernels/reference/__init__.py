"""Pure-PyTorch kernels: float64-capable, any device. The test oracle and the fallback.

One module per op; import from the module (lowrank_kernels.reference.gram_linear).
"""
