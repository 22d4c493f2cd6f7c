"""Subspace API reliability (issue 12 item 8): bad arguments to every public constructor and
function of lowrank_kernels.subspace raise an error naming the argument and what was
expected — never a silent acceptance (a bool taken for a number, 2.5 truncated to 2)."""
import pytest
import torch

import lowrank_kernels.subspace as sub

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh(), torch.nn.Linear(2, 2))


PROJECTIONS = [sub.DenseProjection, sub.SparseProjection, sub.FastfoodProjection,
               sub.OnTheFlyProjection]


@pytest.mark.parametrize("cls", PROJECTIONS, ids=lambda c: c.__name__)
def test_projection_arguments(cls):
    name = cls.__name__
    for kwargs, error, message in [
        (dict(D=0, d=2), ValueError, rf"{name}: D must be ≥ 1 \(a positive int\), got 0"),
        (dict(D=True, d=2), ValueError, rf"{name}: D must be ≥ 1 \(a positive int\), got True"),
        (dict(D=10, d=2.5), ValueError, rf"{name}: d must be ≥ 1 \(a positive int\), got 2.5"),
        (dict(D=10, d=-1), ValueError, rf"{name}: d must be ≥ 1"),
        (dict(D=10, d=2, seed=True), ValueError, rf"{name}: seed must be an int in \[0, 2\*\*63\)"),
        (dict(D=10, d=2, seed=2 ** 63), ValueError, rf"{name}: seed must be an int"),
        (dict(D=10, d=2, seed=-1), ValueError, rf"{name}: seed must be an int"),
    ]:
        with pytest.raises(error, match=message):
            cls(**kwargs)
    if cls is not sub.OnTheFlyProjection:
        with pytest.raises(TypeError, match=rf"{name}: dtype must be a floating-point "
                                            rf"torch.dtype, got torch.int64"):
            cls(10, 2, dtype=torch.int64)


def test_projection_specific_arguments():
    for density, error in ((0, ValueError), (1.5, ValueError), (float("nan"), ValueError),
                           (True, TypeError), ("0.1", TypeError)):
        with pytest.raises(error, match=r"SparseProjection: density must be"):
            sub.SparseProjection(10, 2, density=density)
    with pytest.raises(ValueError, match=r"OnTheFlyProjection: dist must be 'gaussian' or "
                                         r"'rademacher', got 'uniform'"):
        sub.OnTheFlyProjection(10, 2, dist="uniform")
    with pytest.raises(ValueError, match=r"make_projection: projection must be one of"):
        sub.make_projection(None, 10, 2)


def test_subspace_model_arguments():
    with pytest.raises(TypeError, match=r"SubspaceModel: model must be a torch.nn.Module, "
                                        r"got str"):
        sub.SubspaceModel("mlp", 3)
    for d in (0, True, 2.0):
        with pytest.raises(ValueError, match=r"SubspaceModel: d must be ≥ 1"):
            sub.SubspaceModel(_mlp(), d)
    with pytest.raises(TypeError, match=r"SubspaceModel: projection must be a name"):
        sub.SubspaceModel(_mlp(), 3, projection=3)
    with pytest.raises(ValueError, match=r"projection must be one of"):
        sub.SubspaceModel(_mlp(), 3, "hashed")


def test_intrinsic_dimension_arguments():
    def run(**kwargs):
        args = dict(build_model=_mlp, train_and_evaluate=lambda m, p: 1.0, dims=[1, 2])
        args.update(kwargs)
        return sub.intrinsic_dimension(**args)

    for dims in ([], [0, 2], [2.5], [True], [1, -3]):
        with pytest.raises(ValueError, match=r"intrinsic_dimension: dims must be a non-empty "
                                             r"list of positive ints"):
            run(dims=dims)
    for threshold, error in ((0, ValueError), (1.1, ValueError), (True, TypeError),
                             (float("nan"), ValueError)):
        with pytest.raises(error, match=r"intrinsic_dimension: threshold must be"):
            run(threshold=threshold)
    with pytest.raises(ValueError, match=r"intrinsic_dimension: seed must be an int"):
        run(seed=1.5)
    with pytest.raises(TypeError, match=r"intrinsic_dimension: build_model and "
                                        r"train_and_evaluate must be callables"):
        run(build_model="mlp")
    result = run(dims=[2, 1], projection="dense")  # valid: sorted, every accuracy 1.0
    assert result.dims == [1, 2] and result.d_int == 1


def test_checkpoint_collector_and_build_subspace_arguments():
    model = _mlp()
    for kwargs, error, message in [
        (dict(every=0), ValueError, r"CheckpointCollector: every must be ≥ 1"),
        (dict(every=True), ValueError, r"CheckpointCollector: every must be ≥ 1"),
        (dict(every=1.5), ValueError, r"CheckpointCollector: every must be ≥ 1"),
        (dict(max_checkpoints=0), ValueError, r"CheckpointCollector: max_checkpoints must be"),
        (dict(dtype="float32"), TypeError, r"CheckpointCollector: dtype must be a "
                                           r"floating-point torch.dtype"),
    ]:
        with pytest.raises(error, match=message):
            sub.CheckpointCollector(model, **kwargs)
    with pytest.raises(TypeError, match=r"CheckpointCollector: model must be a torch.nn.Module"):
        sub.CheckpointCollector([torch.zeros(3)])
    w = sub.flatten_parameters(model.parameters())
    with pytest.raises(TypeError, match=r"build_subspace: dtype must be a floating-point"):
        sub.build_subspace([w], dtype=torch.int32)
    with pytest.raises(TypeError, match=r"build_subspace: shard must be a bool, got int 1"):
        sub.build_subspace([w], shard=1)
    with pytest.raises(TypeError, match=r"build_subspace: pin_memory must be a bool"):
        sub.build_subspace([w], pin_memory="yes")
    with pytest.raises(TypeError, match=r"build_subspace: checkpoints\[1\] must be floating "
                                        r"point, got torch.int64"):
        sub.build_subspace([w, torch.ones(w.numel(), dtype=torch.int64)])
    with pytest.raises(ValueError, match=r"build_subspace: checkpoints\[0\] contains "
                                         r"non-finite values"):
        sub.build_subspace([w.index_fill(0, torch.tensor([2]), float("nan")), w + 1])
    with pytest.raises(TypeError, match=r"build_subspace: checkpoints\[0\] must be a flat "
                                        r"tensor or a state_dict, got list"):
        sub.build_subspace([[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"build_subspace: checkpoints must hold at least one"):
        sub.build_subspace([])
