"""The intrinsic dimension of an objective landscape (Li et al., ICLR 2018): train the model in
random subspaces of growing dimension d; d_int90 is the smallest d whose accuracy reaches 90%
of the full model's."""
import dataclasses
import json

from . import _args
from .model import SubspaceModel


@dataclasses.dataclass
class IntrinsicDimension:
    dims: list
    accuracies: list
    full_accuracy: float
    threshold: float
    d_int: int | None  # smallest d with accuracy ≥ threshold · full_accuracy (None: none did)
    projection: str
    num_parameters: int

    def to_json(self, path):
        with open(path, "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=2)

    def plot(self, path, title=None):
        """This sweep as a PNG (see plot_intrinsic_dimension)."""
        plot_intrinsic_dimension([self], path, title)


def plot_intrinsic_dimension(results, path, title=None):
    """Accuracy against d (log axis) of one or more sweeps (one per projection), with the full
    model's accuracy, the threshold and each d_int marked; written to `path` (PNG). Needs
    matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    first = results[0]
    ax.axhline(first.full_accuracy, color="k", ls="--",
               label=f"full model, D = {first.num_parameters:,}")
    ax.axhline(first.threshold * first.full_accuracy, color="gray", ls=":",
               label=f"{first.threshold:.0%} of full")
    for result in results:
        line, = ax.semilogx(result.dims, result.accuracies, "o-",
                            label=f"subspace ({result.projection})")
        if result.d_int is not None:
            ax.axvline(result.d_int, color=line.get_color(), ls="-.", alpha=0.7,
                       label=f"d_int{round(100 * result.threshold)} = {result.d_int} "
                             f"({result.projection})")
    ax.set_xlabel("subspace dimension d")
    ax.set_ylabel("test accuracy")
    ax.set_title(title or "intrinsic dimension")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def intrinsic_dimension(build_model, train_and_evaluate, dims, projection="fastfood",
                        threshold=0.9, seed=0, **projection_kwargs) -> IntrinsicDimension:
    """Sweep d over `dims`: accuracy of SubspaceModel(build_model(), d, projection) trained by
    train_and_evaluate(model, trainable_parameters) → accuracy, against the full model
    (train_and_evaluate(build_model(), its parameters)). d_int = min{d : acc(d) ≥ threshold ·
    acc_full}. build_model() must return a freshly initialized model each call."""
    op = "intrinsic_dimension"
    if not callable(build_model) or not callable(train_and_evaluate):
        raise TypeError(f"{op}: build_model and train_and_evaluate must be callables")
    dims = list(dims)
    if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
        raise ValueError(f"{op}: dims must be a non-empty list of positive ints, got {dims}")
    dims = sorted(dims)
    threshold = _args.real_in(op, "threshold", threshold, 0, 1)
    _args.seed(op, seed)
    full_model = build_model()
    num_parameters = sum(p.numel() for p in full_model.parameters())
    full = float(train_and_evaluate(full_model, list(full_model.parameters())))
    accuracies = []
    for d in dims:
        model = SubspaceModel(build_model(), d, projection, seed=seed, **projection_kwargs)
        accuracies.append(float(train_and_evaluate(model, [model.coords])))
    d_int = next((d for d, a in zip(dims, accuracies) if a >= threshold * full), None)
    return IntrinsicDimension(dims=dims, accuracies=accuracies, full_accuracy=full,
                              threshold=threshold, d_int=d_int, projection=str(projection),
                              num_parameters=num_parameters)
