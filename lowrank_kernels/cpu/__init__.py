"""CPU kernels: the fastest exact formulation of each op on a CPU (BLAS GEMMs, one triangle of a
symmetric Gram, the cheaper route by a cost model). Each `lowrank_kernels.cpu.<op>.<op>` has the
signature and return convention of `lowrank_kernels.reference.<op>.<op>`; fp32 accumulation
for fp16/bf16/fp32 inputs, float64 for float64.

One module per op; import from the module (lowrank_kernels.cpu.gram_linear).
"""
