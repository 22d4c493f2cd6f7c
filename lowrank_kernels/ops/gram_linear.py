"""lowrank_kernels::gram_linear — the per-sample-gradient Gram of a linear layer over T tokens:

    K_ij = ⟨g_i, g_j⟩ = Σ_{t,s} (a_it·a_js + b)(e_it·e_js),   g_i = Σ_t e_it ã_itᵀ,

(T = 1: K = (A Aᵀ + b) ⊙ (E Eᵀ)), ã = [a, 1] and b = 1 with bias=True, A (B, d_in) or
(B, T, d_in) the layer inputs, E (B[, T], d_out) the gradients of its outputs. With A2/E2 the
cross-Gram K_ij = ⟨g_i, h_j⟩ (B × B2); diagonal=True returns the B vector diag(K) (per-sample
squared gradient norms; with A2/E2 of the same B: ⟨g_i, h_i⟩). Output float32 (float64 for
float64 inputs on the reference backend); for the symmetric K only the tiles on and above the
diagonal are computed, the rest mirrored.

route: "token_pair" (2·B²·T²·(d_in + d_out) flops: X = (A Aᵀ + b) ⊙ (E Eᵀ) per sample pair),
"per_sample" (per-sample gradients built in a bounded workspace, then their Gram:
2·B·T·d_in·d_out + 2·B²·d_in·d_out flops), or "auto": the cheaper by `choose_route`.
"""
import torch

from .. import _capabilities as caps
from .. import _checks
from .._registry import Backend, OpSpec, register
from ..reference.gram_linear import gram_linear as reference_gram_linear

OP = "gram_linear"
ROUTES = ("auto", "token_pair", "per_sample")
# Flops one byte of workspace traffic is worth in the route model (the per-sample route writes
# and reads its fp32 per-sample gradients once): about a GPU's L2 flop/byte balance.
_FLOPS_PER_BYTE = 16


def choose_route(B1, B2, T, d_in, d_out, groups, bias, cross, diagonal):
    """The cheaper route for these sizes (per group: d_in, d_out) by a flop/byte model."""
    pairs = B1 if diagonal else (B1 * B2 if cross else B1 * (B1 + 1) // 2)
    samples = B1 + B2 if cross else B1
    params = d_out * (d_in + int(bias))
    token_pair = groups * pairs * T * T * 2 * (d_in + d_out)
    per_sample = groups * (2 * samples * T * params + 2 * pairs * params
                           + _FLOPS_PER_BYTE * 8 * samples * params)
    return "token_pair" if token_pair <= per_sample else "per_sample"


def check_route(op, route):
    if route not in ROUTES:
        raise ValueError(f"{op}: route must be one of {', '.join(map(repr, ROUTES))}, "
                         f"got {route!r}")


def check_cross(op, names, first, second, diagonal):
    """The optional second batch (names: its two argument names) comes whole and agrees with
    the first in device, dtype and every dimension but the batch (and in that too with
    diagonal=True: ⟨g_i, h_i⟩ pairs sample i of one batch with sample i of the other)."""
    given = [t is not None for t in second]
    if any(given) and not all(given):
        raise ValueError(f"{op}: {names[0]} and {names[1]} must be given together "
                         f"(the second batch of the cross-Gram)")
    if not all(given):
        return
    for name, t, ref in zip(names, second, first):
        _checks.check_tensor(op, name, t)
        _checks.check_same(op, (name, "the first batch"), (t, ref), "device")
        _checks.check_same(op, (name, "the first batch"), (t, ref), "dtype")
        if t.dim() != ref.dim() or t.shape[1:] != ref.shape[1:]:
            raise ValueError(f"{op}: {name} must have the first batch's shape but for dim 0, "
                             f"got {tuple(t.shape)} against {tuple(ref.shape)}")
    if second[0].shape[0] != second[1].shape[0]:
        raise ValueError(f"{op}: {names[0]} and {names[1]} must have the same batch size "
                         f"(dim 0), got {second[0].shape[0]} and {second[1].shape[0]}")
    if diagonal and second[0].shape[0] != first[0].shape[0]:
        raise ValueError(f"{op}: diagonal=True with {names[0]}/{names[1]} needs the first "
                         f"batch's size {first[0].shape[0]}, got {second[0].shape[0]}")


def check_linear_layer(op, A, E):
    """A (B[, T], d_in) and E (B[, T], d_out) of one linear layer: same dtype, device, B, T."""
    _checks.check_tensor(op, "A", A, (2, 3), "B x d_in or B x T x d_in: layer inputs")
    _checks.check_tensor(op, "E", E, (2, 3),
                         "B x d_out or B x T x d_out: gradients of the layer outputs")
    _checks.check_float(op, "A", A)
    _checks.check_float(op, "E", E)
    _checks.check_same(op, ("A", "E"), (A, E), "device")
    _checks.check_same(op, ("A", "E"), (A, E), "dtype")
    _checks.check_dim_match(op, "A", A.shape[0], "E", E.shape[0], "batch size B (dim 0)")
    _checks.check_dim_match(op, "A", A.dim(), "E", E.dim(), "number of dims")
    if A.dim() == 3:
        _checks.check_dim_match(op, "A", A.shape[1], "E", E.shape[1], "token count T (dim 1)")


def check(A, E, bias, A2, E2, diagonal, route):
    check_linear_layer(OP, A, E)
    check_cross(OP, ("A2", "E2"), (A, E), (A2, E2), diagonal)
    check_route(OP, route)
    return A


def _out_shape(A, A2, diagonal):
    return (A.shape[0],) if diagonal else (A.shape[0], (A2 if A2 is not None else A).shape[0])


def fake(A, E, bias, A2, E2, diagonal, route):
    dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    return A.new_empty(_out_shape(A, A2, diagonal), dtype=dtype)


def resolve_route(A, E, bias, A2, diagonal, route):
    if route != "auto":
        return route
    T = A.shape[1] if A.dim() == 3 else 1
    B2 = A2.shape[0] if A2 is not None else A.shape[0]
    return choose_route(A.shape[0], B2, T, A.shape[-1], E.shape[-1], 1, bias, A2 is not None,
                        diagonal)


def _reference(A, E, bias, A2, E2, diagonal, route):
    return reference_gram_linear(A, E, bias, A2, E2, diagonal,
                                 resolve_route(A, E, bias, A2, diagonal, route))


def _triton(A, E, bias, A2, E2, diagonal, route):
    from ..triton.gram_linear import gram_linear as triton_gram_linear

    return triton_gram_linear(A, E, bias, A2, E2, diagonal,
                              resolve_route(A, E, bias, A2, diagonal, route))


def _native(A, E, bias, A2, E2, diagonal, route):
    return torch.ops.lowrank_native.gram_linear(A, E, bias)


def _native_supports(A, E, bias, A2, E2, diagonal, route):
    if A.dim() != 2:
        return "the native kernel takes T = 1 (2-D A and E)"
    if A2 is not None or diagonal:
        return "the native kernel computes the symmetric Gram only (no A2/E2, no diagonal)"
    if route == "per_sample":
        return "the native kernel has the token-pair route only"
    return None


if caps.native_built():
    @torch.library.register_fake("lowrank_native::gram_linear")
    def _native_fake(A, E, bias):
        return A.new_empty((A.shape[0], A.shape[0]), dtype=torch.float32)


_ALL = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# The interpreter computes bf16 wrongly (see DESIGN §4): bf16 Triton is GPU-only.
TRITON_DTYPES = {"cpu": (torch.float32, torch.float16),
                 "cuda": (torch.float32, torch.float16, torch.bfloat16)}


def reference_and_triton(reference, triton):
    """OpSpec backends of a layer op without a native kernel: the reference (every device and
    dtype; auto on CPU, where it is BLAS GEMMs) and Triton (auto on CUDA)."""
    return dict(backends={"reference": Backend(reference, {"cpu": _ALL, "cuda": _ALL}),
                          "triton": Backend(triton, TRITON_DTYPES)},
                auto={"cpu": ("reference",), "cuda": ("triton", "reference")})
SPEC = register(OpSpec(
    name=OP,
    schema="(Tensor A, Tensor E, bool bias=False, Tensor? A2=None, Tensor? E2=None, "
           "bool diagonal=False, str route=\"auto\", str? backend=None) -> Tensor",
    check=check,
    fake=fake,
    backends={
        "reference": Backend(_reference, {"cpu": _ALL, "cuda": _ALL}),
        "triton": Backend(_triton, TRITON_DTYPES),
        "native": Backend(_native, {"cpu": (torch.float32, torch.float16),
                                    "cuda": (torch.float32, torch.float16, torch.bfloat16)},
                          _native_supports),
    },
    auto={"cpu": ("native", "reference"), "cuda": ("triton", "native", "reference")},
    finite_inputs=("A", "E", "A2", "E2"),
    doc="K_ij = Σ_{t,s} (a_it·a_js + b)(e_it·e_js)",
))


def gram_linear(A: torch.Tensor, E: torch.Tensor, bias: bool = False, *, A2=None, E2=None,
                diagonal: bool = False, route: str = "auto", backend: str | None = None):
    """Per-sample-gradient Gram of a linear layer, K_ij = Σ_{t,s} (a_it·a_js + b)(e_it·e_js)
    (T = 1: K = (A Aᵀ + b) ⊙ (E Eᵀ); b = 1 with bias).

    A: (B, d_in) or (B, T, d_in) layer inputs, E: (B, d_out) or (B, T, d_out) output gradients
    (same dtype and device). A2/E2: a second batch, for the cross-Gram (B × B2).
    diagonal: return diag(K) (B), the per-sample squared gradient norms (with A2/E2 of the
    same batch size: ⟨g_i, h_i⟩).
    route: 'auto' (default), 'token_pair' or 'per_sample' (see the module docstring).
    backend: 'auto' (default, or $LOWRANK_BACKEND), 'reference', 'triton' or 'native'.
    Returns float32 (float64 for float64 inputs)."""
    return torch.ops.lowrank_kernels.gram_linear(A, E, bias, A2, E2, diagonal, route, backend)
