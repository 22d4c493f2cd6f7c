"""The argument checks shared by every op (lowrank_kernels._checks): each error names the op,
the argument and what was expected."""
import pytest
import torch

from lowrank_kernels import _checks


def test_check_messages():
    A, E = torch.ones(2, 3), torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^op: A and E must have the same dtype, got A: "
                                         r"torch.float32, E: torch.float64$"):
        _checks.check_same("op", ("A", "E"), (A, E), "dtype")
    with pytest.raises(ValueError, match=r"^op: A and E and F must have the same dtype, got "
                                         r"A: torch.float32, E: torch.float32, F: "
                                         r"torch.float64$"):
        _checks.check_same("op", ("A", "E", "F"), (A, A, E), "dtype")
    _checks.check_same("op", ("A", "E", "F"), iter((A, A, A)), "device")
    with pytest.raises(ValueError, match=r"^op: A must be a 2 or 3-D tensor \(doc\), got "
                                         r"shape \(2, 3, 1, 1\)$"):
        _checks.check_tensor("op", "A", A[..., None, None], (2, 3), "doc")
    with pytest.raises(ValueError, match=r"^op: A must be a 1-D tensor \(doc\), got shape "):
        _checks.check_tensor("op", "A", A, 1, "doc")
    with pytest.raises(TypeError, match=r"^op: A must be a torch.Tensor, got list$"):
        _checks.check_tensor("op", "A", [1.0])
    with pytest.raises(TypeError, match=r"^op: A must have a floating dtype \(float32, "
                                        r"float64\), got torch.int64$"):
        _checks.check_float("op", "A", A.long(), (torch.float32, torch.float64))


@pytest.mark.parametrize("op", ["gram_conv2d", "weighted_sum_conv2d", "project_conv2d"])
@pytest.mark.parametrize("name,value,minimum", [("stride", (1,), 1), ("padding", (1, 1, 1), 0),
                                                ("dilation", 0, 1), ("padding", -1, 0)])
def test_conv_geometry_errors_name_the_argument(op, name, value, minimum):
    """The entry point names a wrong geometry argument (the schema packs it into one int[])."""
    import lowrank_kernels as lk

    X, E = torch.ones(2, 4, 5, 5), torch.ones(2, 6, 5, 5)
    args = {"gram_conv2d": (X, E, 3), "weighted_sum_conv2d": (X, E, torch.ones(2), 3),
            "project_conv2d": (X, E, torch.ones(6, 4, 3, 3))}[op]
    geometry = {"stride": 1, "padding": 1, "dilation": 1, name: value}
    with pytest.raises(ValueError, match=rf"^{op}: {name} must be an int or a pair of ints "
                                         rf"≥ {minimum}, got "):
        getattr(lk, op)(*args, **geometry)
