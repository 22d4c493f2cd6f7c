"""Argument checks shared by every op: each error names the op, the argument and what was
expected, so bad input never becomes a segfault or a silent wrong answer.

They run on every call of every op: the passing path is kept to a few attribute reads and
comparisons, the error messages are built only when raising."""
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

def check_tensor(op, name, t, ndim=None, shape_doc=""):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        dim = t.dim()
        if dim != ndim if isinstance(ndim, int) else dim not in ndim:
            want = ndim if isinstance(ndim, int) else " or ".join(str(n) for n in ndim)
            raise ValueError(
                f"{op}: {name} must be a {want}-D tensor ({shape_doc}), "
                f"got shape {tuple(t.shape)}")


def check_float(op, name, t, dtypes=FLOAT_DTYPES):
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have a floating dtype ({names}), got {t.dtype}")


def check_same(op, names, tensors, what):
    """what: 'device' or 'dtype'; all tensors must agree."""
    if type(tensors) is not tuple and type(tensors) is not list:
        tensors = tuple(tensors)
    if len(tensors) == 2 and not getattr(tensors[0], what) != getattr(tensors[1], what):
        return
    values = [getattr(t, what) for t in tensors]
    if any(v != values[0] for v in values):
        listing = ", ".join(f"{n}: {v}" for n, v in zip(names, values))
        raise ValueError(f"{op}: {' and '.join(names)} must have the same {what}, got {listing}")


def check_dim_match(op, name_a, size_a, name_b, size_b, what):
    if size_a != size_b:
        raise ValueError(f"{op}: {name_a} and {name_b} must have the same {what}, "
                         f"got {size_a} and {size_b}")
