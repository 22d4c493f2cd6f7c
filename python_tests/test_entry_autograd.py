"""The entry points of the ops with an autograd formula (fwht, subspace_project/_expand,
random_subspace_project/_expand) call the default kernels below the autograd layer when no
input requires grad (_registry.on_backend): the same results, no graph, the thread's
dispatch state restored (after an error too); with an input that requires grad the formula
runs as before."""
import pytest
import torch

import lowrank_kernels as lk

pytestmark = pytest.mark.usefixtures("one_thread")

_KEY = torch._C.DispatchKey.AutogradFunctionality


def _excluded():
    return torch._C._dispatch_tls_is_dispatch_key_excluded(_KEY)


def _cases():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g)  # noqa: E731
    P = r(37, 5)
    return {  # name: (entry point, its inputs, the index of the differentiable one)
        "fwht": (lk.fwht, (r(4, 32),), 0),
        "subspace_project": (lk.subspace_project, (P, r(37)), 1),
        "subspace_expand": (lk.subspace_expand, (P, r(5), r(37)), 1),
        "random_subspace_expand": (lambda a, b: lk.random_subspace_expand(a, 1, 33, 0.2,
                                                                          "gaussian", b),
                                   (r(6), r(33)), 0),
        "random_subspace_project": (lambda v: lk.random_subspace_project(v, 1, 6, 0.2),
                                    (r(33),), 0),
    }


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_without_grad_the_same_result_and_no_graph(name):
    fn, inputs, _ = CASES[name]
    op = getattr(torch.ops.lowrank_kernels, name).default
    extra = {"random_subspace_expand": (1, 33, 0.2, "gaussian"),
             "random_subspace_project": (1, 6, 0.2)}.get(name)
    expected = op(*inputs) if extra is None else op(inputs[0], *extra, *inputs[1:])
    got = fn(*inputs)
    assert got.grad_fn is None and not got.requires_grad
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not _excluded()


@pytest.mark.parametrize("name", sorted(CASES))
def test_with_grad_the_formula_runs(name):
    """The default path's gradient, against finite differences (float64)."""
    fn, inputs, i = CASES[name]
    leaf = inputs[i].clone().requires_grad_(True)
    args = inputs[:i] + (leaf,) + inputs[i + 1:]
    assert fn(*args).grad_fn is not None
    torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7)
    assert not _excluded()


def test_dispatch_state_restored_after_an_error_and_inside_no_grad():
    with pytest.raises(ValueError, match="subspace_expand"):
        lk.subspace_expand(torch.ones(4, 3), torch.ones(2))
    assert not _excluded()
    with torch.no_grad():
        x = torch.ones(2, 8, requires_grad=True)
        assert lk.fwht(x).grad_fn is None
    assert not _excluded()
