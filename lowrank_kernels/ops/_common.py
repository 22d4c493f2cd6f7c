"""Argument checks, fake-output helpers and backend tables shared by the public ops: one
module, so that each op file reads on its own and imports no other op."""
import torch

from .. import _capabilities as caps
from .. import _checks
from .._registry import Backend


def native_check(name):
    """lowrank_kernels._C.<name>: an op's C++ argument checks for plain tensors (csrc/
    layer_py_checks.cpp; False where it cannot read the arguments, a FakeTensor say, and the
    Python check runs), or None without the extension."""
    module = caps._native_import()[0]
    return getattr(module, name, None)

# ---- Conv2d geometry -----------------------------------------------------------------------

def pair(op, name, value, minimum):
    """An int or a pair of ints (each ≥ minimum) as a list of two ints."""
    if (type(value) is list or type(value) is tuple) and len(value) == 2 and \
            type(value[0]) is int and type(value[1]) is int and value[0] >= minimum and \
            value[1] >= minimum:
        return list(value)  # what the dispatcher passes: checked in one expression
    integer = (int, torch.SymInt)  # SymInt: a kernel size read from V's shape while tracing
    values = [value, value] if isinstance(value, integer) else \
        list(value) if isinstance(value, (list, tuple)) else None
    if values is None or len(values) != 2 or \
            not all(isinstance(v, integer) and v >= minimum for v in values):
        raise ValueError(f"{op}: {name} must be an int or a pair of ints ≥ {minimum}, "
                         f"got {value!r}")
    return values


def output_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


# The schema's `int[] geometry` of the Conv2d ops: one list argument (the dispatcher's argument
# parse costs ~0.5 µs per int[2] and per int, not per element), laid out as
# [kh, kw,] stride_h, stride_w, padding_h, padding_w, dilation_h, dilation_w, groups
# (project_conv2d without the kernel size: its kernel is V's).
GEOMETRY = ("kernel_size", "stride", "padding", "dilation")
_MINIMUM = {"kernel_size": 1, "stride": 1, "padding": 0, "dilation": 1}


def conv_geometry(op, kernel_size, stride, padding, dilation, groups):
    """The `geometry` of the public arguments, a tuple of ints (ints or pairs; kernel_size None:
    without it), each named in the error when it is not an int or a pair of ints ≥ its
    minimum."""
    s = (stride, stride) if type(stride) is int else stride
    p = (padding, padding) if type(padding) is int else padding
    d = (dilation, dilation) if type(dilation) is int else dilation
    k = (1, 1) if kernel_size is None else \
        (kernel_size, kernel_size) if type(kernel_size) is int else kernel_size
    try:  # the common case in one expression; the errors from pair()
        (k0, k1), (s0, s1), (p0, p1), (d0, d1) = k, s, p, d
        ok = type(k0) is int and type(k1) is int and type(s0) is int and type(s1) is int and \
            type(p0) is int and type(p1) is int and type(d0) is int and type(d1) is int and \
            k0 >= 1 and k1 >= 1 and s0 >= 1 and s1 >= 1 and p0 >= 0 and p1 >= 0 and \
            d0 >= 1 and d1 >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        if kernel_size is not None:
            k0, k1 = pair(op, "kernel_size", kernel_size, 1)
        (s0, s1), (p0, p1), (d0, d1) = (pair(op, "stride", stride, 1),
                                        pair(op, "padding", padding, 0),
                                        pair(op, "dilation", dilation, 1))
    if kernel_size is None:  # a tuple: the dispatcher reads one ~0.8 µs faster than a list
        return (s0, s1, p0, p1, d0, d1, groups)
    return (k0, k1, s0, s1, p0, p1, d0, d1, groups)


def _check_geometry(op, geometry, with_kernel):
    """The slow path of check_conv2d: the geometry list itself, each pair named in the error.
    Returns (kernel_size or None, stride, padding, dilation, groups)."""
    names = GEOMETRY if with_kernel else GEOMETRY[1:]
    n = 2 * len(names) + 1
    if not isinstance(geometry, (list, tuple)) or len(geometry) != n or \
            not all(isinstance(v, (int, torch.SymInt)) for v in geometry):
        layout = ", ".join(f"{name}[{i}]" for name in names for i in range(2))
        raise ValueError(f"{op}: geometry must be {n} ints [{layout}, groups], got {geometry!r}")
    pairs = [pair(op, name, list(geometry[2 * i:2 * i + 2]), _MINIMUM[name])
             for i, name in enumerate(names)]
    return (None,) * (not with_kernel) + tuple(pairs) + (geometry[-1],)


def check_conv2d(op, X, E, geometry, kernel=None, x_name="X"):
    """X (B, C_in, H, W) and E (B, C_out, H_out, W_out) of one Conv2d call: ranks, dtypes,
    devices, the batch, channels divisible by groups, and H_out, W_out as the geometry gives
    (kernel: (kh, kw) when geometry has no kernel size, project_conv2d's V). Returns
    (C_in, C_out)."""
    # The common case in one expression; errors come from the checks below.
    try:
        if kernel is None:
            k0, k1, s0, s1, p0, p1, d0, d1, groups = geometry
        else:
            (k0, k1), (s0, s1, p0, p1, d0, d1, groups) = kernel, geometry
        B, C, H, W = X.shape
        B_e, C_e, H_e, W_e = E.shape
    except (AttributeError, TypeError, ValueError):
        pass
    else:
        if type(X) is torch.Tensor and type(E) is torch.Tensor and X.dtype is E.dtype and \
                X.dtype in ALL_FLOAT and X.device == E.device and type(groups) is int and \
                groups >= 1 and k0 >= 1 and k1 >= 1 and s0 >= 1 and s1 >= 1 and \
                d0 >= 1 and d1 >= 1 and p0 >= 0 and p1 >= 0 and B == B_e and \
                not C % groups and not C_e % groups and \
                H_e == (H + 2 * p0 - d0 * (k0 - 1) - 1) // s0 + 1 >= 1 and \
                W_e == (W + 2 * p1 - d1 * (k1 - 1) - 1) // s1 + 1 >= 1:
            return C, C_e
    _checks.check_tensor(op, x_name, X, 4, "B x C_in x H x W: the layer input")
    _checks.check_tensor(op, "E", E, 4, "B x C_out x H_out x W_out: the output gradient")
    _checks.check_float(op, x_name, X)
    _checks.check_float(op, "E", E)
    _checks.check_same(op, (x_name, "E"), (X, E), "device")
    _checks.check_same(op, (x_name, "E"), (X, E), "dtype")
    _checks.check_dim_match(op, x_name, X.shape[0], "E", E.shape[0], "batch size B (dim 0)")
    kernel_size, stride, padding, dilation, groups = _check_geometry(op, geometry,
                                                                     kernel is None)
    kernel_size = list(kernel) if kernel is not None else kernel_size
    if not isinstance(groups, int) or groups < 1 or X.shape[1] % groups or E.shape[1] % groups:
        raise ValueError(f"{op}: groups must be a positive int dividing C_in ({X.shape[1]}) "
                         f"and C_out ({E.shape[1]}), got {groups!r}")
    expected = tuple(output_size(X.shape[2 + d], kernel_size[d], stride[d], padding[d],
                                 dilation[d]) for d in range(2))
    if tuple(E.shape[2:]) != expected or min(expected) < 1:
        raise ValueError(f"{op}: E must be the gradient of the conv output, of spatial size "
                         f"{expected} for {x_name} {tuple(X.shape[2:])} with kernel_size "
                         f"{kernel_size}, stride {stride}, padding {padding}, dilation "
                         f"{dilation}; got {tuple(E.shape[2:])}")
    return X.shape[1], E.shape[1]


# ---- linear layers, the Gram route model, backend tables -----------------------------------

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
    if second[0] is None and second[1] is None:
        return
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
    """A (B[, T], d_in) and E (B[, T], d_out) of one linear layer: same dtype, device, B, T.
    Returns (d_in, d_out)."""
    if type(A) is torch.Tensor and type(E) is torch.Tensor and A.dtype is E.dtype and \
            A.dtype in ALL_FLOAT and A.device == E.device:
        a, e = A.shape, E.shape
        n = len(a)
        if (n == 2 or n == 3) and len(e) == n and a[0] == e[0] and (n == 2 or a[1] == e[1]):
            return a[-1], e[-1]  # the common case in one expression; errors from the checks below
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
    return A.shape[-1], E.shape[-1]


ALL_FLOAT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# The interpreter computes bf16 wrongly (see DESIGN §4): bf16 Triton is GPU-only.
TRITON_DTYPES = {"cpu": (torch.float32, torch.float16),
                 "cuda": (torch.float32, torch.float16, torch.bfloat16)}


def layer_backends(reference, triton, native_cpu=False):
    """OpSpec backends of a layer op: the reference (every device and dtype: the default
    kernel), Triton (the CUDA kernel) and, with native_cpu=True, the C++ CPU kernel
    registered from csrc/<op>.cpp (the op itself)."""
    backends = {"reference": Backend(reference, {"cpu": ALL_FLOAT, "cuda": ALL_FLOAT}),
                "triton": Backend(triton, TRITON_DTYPES)}
    if native_cpu:
        backends["native"] = Backend(None, {"cpu": ALL_FLOAT})
    auto_cpu = ("native",) if native_cpu else ()
    return dict(backends=backends, auto={"cpu": auto_cpu, "cuda": ("triton",)})


# ---- weighted sums -------------------------------------------------------------------------

def check_coefficients(op, c, lead):
    """c (B,) or (B, m): floating, on lead's device, one coefficient per sample."""
    if type(c) is torch.Tensor and c.dtype in ALL_FLOAT and c.device == lead.device:
        shape = c.shape
        if (len(shape) == 1 or len(shape) == 2) and shape[0] == lead.shape[0]:
            return  # the common case in one expression; errors come from the checks below
    _checks.check_tensor(op, "c", c, (1, 2), "B or B x m: the coefficients, one row a sample")
    _checks.check_float(op, "c", c)
    _checks.check_same(op, ("c", "the layer tensors"), (c, lead), "device")
    _checks.check_dim_match(op, "c", c.shape[0], "E", lead.shape[0], "batch size B (dim 0)")


def fake_outputs(lead, c, weight_shape, n_out, bias):
    """The (weight part, bias part or None) pair of a weighted sum."""
    dtype = torch.float64 if lead.dtype == torch.float64 else torch.float32
    stack = tuple(c.shape[1:])
    return (lead.new_empty(stack + tuple(weight_shape), dtype=dtype),
            lead.new_empty(stack + (n_out,), dtype=dtype) if bias else None)


# ---- projections ---------------------------------------------------------------------------

def check_directions(op, V, V_bias, shape, lead):
    """V (shape) or (m, *shape), V_bias (shape[0],) or (m, shape[0]) — floating, on lead's
    device, one V_bias row per direction."""
    n = len(shape)
    device = lead.device
    if type(V) is torch.Tensor and V.dtype in ALL_FLOAT and V.device == device:
        v = tuple(V.shape)  # a tuple slices faster than a torch.Size
        m = len(v) - n  # 1 for m directions
        if (m == 0 or m == 1) and v[m:] == shape and (V_bias is None or (
                type(V_bias) is torch.Tensor and V_bias.dtype in ALL_FLOAT and
                V_bias.device == device and V_bias.shape == v[:m] + shape[:1])):
            return  # the common case in one expression; errors come from the checks below
    _checks.check_tensor(op, "V", V, (n, n + 1), f"{' x '.join(map(str, shape))} or m x that: "
                                                 "weight-shaped directions")
    _checks.check_float(op, "V", V)
    _checks.check_same(op, ("V", "the layer tensors"), (V, lead), "device")
    if tuple(V.shape[-n:]) != tuple(shape):
        raise ValueError(f"{op}: V must have the weight's shape {tuple(shape)} in its last "
                         f"{n} dims, got {tuple(V.shape)}")
    if V_bias is None:
        return
    _checks.check_tensor(op, "V_bias", V_bias, V.dim() - n + 1, "the bias part of each direction")
    _checks.check_float(op, "V_bias", V_bias)
    _checks.check_same(op, ("V_bias", "V"), (V_bias, V), "device")
    expected = tuple(V.shape[:-n]) + (shape[0],)
    if tuple(V_bias.shape) != expected:
        raise ValueError(f"{op}: V_bias must have shape {expected} (one bias vector per "
                         f"direction of V), got {tuple(V_bias.shape)}")


def fake_projection(lead, V, n):
    dtype = torch.float64 if lead.dtype == torch.float64 else torch.float32
    return lead.new_empty((lead.shape[0],) + tuple(V.shape[:-n]), dtype=dtype)

# ---- embeddings ----------------------------------------------------------------------------



def check_idx_E(op, idx_name, idx, E_name, E):
    """idx (B, T) int64 and E (B, T, d) floating, on one device."""
    if type(idx) is torch.Tensor and type(E) is torch.Tensor and idx.dtype is torch.int64 and \
            E.dtype in ALL_FLOAT and idx.device == E.device:
        i, e = idx.shape, E.shape
        if len(i) == 2 and len(e) == 3 and i[0] == e[0] and i[1] == e[1]:
            return  # the common case in one expression; errors come from the checks below
    _checks.check_tensor(op, idx_name, idx, 2, "B x T: token indices")
    if idx.dtype != torch.int64:
        raise TypeError(f"{op}: {idx_name} must be an int64 tensor of indices, got {idx.dtype}")
    _checks.check_tensor(op, E_name, E, 3, "B x T x d: gradients of the embedding outputs")
    _checks.check_float(op, E_name, E)
    _checks.check_same(op, (idx_name, E_name), (idx, E), "device")
    if tuple(E.shape[:2]) != tuple(idx.shape):
        raise ValueError(f"{op}: {idx_name} and {E_name} must have the same (B, T) leading "
                         f"dims, got {tuple(idx.shape)} and {tuple(E.shape)}")


def check_num_embeddings(op, num_embeddings, padding_idx):
    if num_embeddings < 1:
        raise ValueError(f"{op}: num_embeddings must be positive, got {num_embeddings}")
    if padding_idx is not None and not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"{op}: padding_idx must be in [-num_embeddings, num_embeddings) = "
                         f"[{-num_embeddings}, {num_embeddings}), got {padding_idx}")


def normalized_padding(padding_idx, num_embeddings):
    """padding_idx as nn.Embedding stores it (a negative one counts from the end)."""
    if padding_idx is None or padding_idx >= 0:
        return padding_idx
    return padding_idx + num_embeddings


def without_padding(idx, E, padding_idx):
    """E with the rows of padding tokens zeroed (torch.where: a NaN there is dropped too, as
    the Triton kernels skip those tokens) — padding_idx gets no gradient."""
    if padding_idx is None:
        return E
    return torch.where((idx == padding_idx)[..., None], torch.zeros((), dtype=E.dtype), E)


def check_index_range(op, name, idx, num_embeddings):
    """Every index in [0, num_embeddings), asserted on the device without a host sync (on a
    GPU a bad index stops the stream with this message, as torch's embedding does)."""
    if idx.numel():
        torch._assert_async(((idx >= 0) & (idx < num_embeddings)).all(),
                            f"{op}: {name} must hold indices in [0, {num_embeddings})")

# ---- sketches ------------------------------------------------------------------------------

DISTS = ("gaussian", "rademacher")


def check_dist(op, dist):
    if dist not in DISTS:
        raise ValueError(f"{op}: dist must be 'gaussian' or 'rademacher', got {dist!r}")


def check_seed(op, seed):
    """seed: an int in [0, 2**63) (the Philox key; the schema's int is int64)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, torch.SymInt)):
        raise TypeError(f"{op}: seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2 ** 63:
        raise ValueError(f"{op}: seed must be in [0, 2**63), got {seed}")
