"""torch.compile of a model under Capture: the captured layers of the torch types trace into
the graph with their recording as custom ops (capture._traced); the others (and their
hooks) run as eager calls (torch.compiler disable). The compiled model compiles once per
input shape — no recompile on every step from the capture's bookkeeping — and its Gram
equals the eager model's. Models: Linear /
LayerNorm, a parameter used directly in a block's forward (followed op by op, eagerly: that
block runs eager while captured, the rest compiles) and GPT-2 from transformers (Conv1D,
tied wte/lm_head, a position table broadcast over the batch). Also: FNGD, SENG and KFAC
stepping a compiled model give the eager losses. The backend is aot_eager (dynamo and
AOTAutograd, the parts that trace the hooks; inductor's C++ code generation takes 30-110 s
per model on the 2-core CPU and adds nothing that the capture touches). No timings are
asserted here: they belong to bench/."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowrank_kernels as lk
from lowrank_kernels.optim import FNGD, KFAC, SENG

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64
V, T, STEPS = 11, 6, 6


class CountingBackend:
    """A torch.compile backend that counts the graphs dynamo hands it (one per compile of a
    frame, recompiles included) and then runs aot_eager."""

    def __init__(self):
        self.graphs = 0
        self.ops = []  # per graph: the names of the functions it calls

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        self.ops.append({getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes
                         if n.op in ("call_function", "call_method")})
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


@pytest.fixture
def backend():
    torch._dynamo.reset()
    yield CountingBackend()
    torch._dynamo.reset()


class PositionBlock(nn.Module):
    """A learned position table added in the block's own forward (a parameter used directly,
    like a ViT's pos_embed), then a LayerNorm."""

    def __init__(self, d):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, T, d) * 0.1)
        self.norm = nn.LayerNorm(d)

    def forward(self, h):
        return self.norm(h + self.pos[:, :h.shape[1]])


class DirectModel(nn.Module):
    def __init__(self, d=8, classes=3):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.block = PositionBlock(d)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        return self.head(torch.tanh(self.block(self.emb(ids))).mean(1))


def _mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))


def _gpt2():
    transformers = pytest.importorskip(
        "transformers", reason="transformers is a test-only dependency (scripts/install.sh)")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=8, vocab_size=V,
                                  bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def _labels(B):
    return torch.arange(B) % 3


def _mlp_loss(model, x):
    return F.cross_entropy(model(x), _labels(x.shape[0]))


def _lm_loss(model, ids):
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))


def _float_batch(B, seed=0):
    return torch.randn(B, 6, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _id_batch(B, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# name: (build, batch(B, seed), loss(model, batch))
MODELS = {
    "mlp": (_mlp, _float_batch, _mlp_loss),
    "direct_parameter": (DirectModel, _id_batch, _mlp_loss),
    "gpt2": (_gpt2, _id_batch, _lm_loss),
}


def _build(name):
    build, batch, loss = MODELS[name]
    torch.manual_seed(0)
    return build().to(F64).eval(), batch, loss


def _captured_gram(model, run, loss, x):
    model.zero_grad()
    with lk.Capture(model) as cap:
        loss(run, x).backward()
        return cap.gram()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", MODELS)
def test_compiled_model_under_capture_compiles_once_per_shape(name, backend):
    """STEPS captured steps at B = 4, each followed by an uncaptured no_grad evaluation (the
    hooks come and go with the `with` block), then the same at B = 3 (GPT-2: B = 4 only, its
    ~18 graphs take 30 s per shape): after the first pass at a shape nothing compiles again,
    and every compiled Gram equals the eager one."""
    model, batch, loss = _build(name)
    compiled = torch.compile(model, backend=backend)
    graphs = {}
    for B in (4,) if name == "gpt2" else (4, 3):
        x = batch(B)
        eager = _captured_gram(model, model, loss, x)
        for step in range(STEPS):
            K = _captured_gram(model, compiled, loss, x)
            assert _rel(K, eager) < 1e-6, f"step {step}, B = {B}: {_rel(K, eager):.3g}"
            with torch.no_grad():
                loss(compiled, x)
            if step == 0:
                graphs[B] = backend.graphs
        assert backend.graphs == graphs[B], (
            f"B = {B}: {backend.graphs - graphs[B]} graph(s) compiled after the first step "
            f"({graphs[B]} then)")
    assert backend.graphs > 0, "nothing was compiled"


def test_captured_layers_trace_into_the_graph(backend):
    """While captured, the layers whose handlers record in-graph (emb, head: capture._traced)
    are traced, with the recording as the custom op _capture_call; the block that owns a
    directly used parameter runs as an eager call (the graph breaks at its boundary); the
    code between them (tanh, mean) compiles. Uncaptured, the model compiles whole."""
    model, batch, loss = _build("direct_parameter")
    compiled = torch.compile(model, backend=backend)
    _captured_gram(model, compiled, loss, batch(4))
    captured = set().union(*backend.ops)
    assert {"embedding", "linear", "tanh", "mean", "_capture_call.default"} <= captured, captured
    assert "layer_norm" not in captured, f"the direct-parameter block was traced: {captured}"
    with torch.no_grad():
        loss(compiled, batch(4))
    assert any({"embedding", "linear", "tanh", "layer_norm"} <= ops for ops in backend.ops), \
        backend.ops


def test_captured_mlp_compiles_as_one_graph(backend):
    """A model of Linear / LayerNorm layers under Capture compiles as one graph (no graph
    break at any captured layer: only the capture's batch hook on the model runs before it,
    eagerly) and its Gram equals the eager one."""
    model, batch, loss = _build("mlp")
    x = batch(4)
    eager = _captured_gram(model, model, loss, x)
    compiled = torch.compile(model, backend=backend)
    K = _captured_gram(model, compiled, loss, x)
    assert _rel(K, eager) < 1e-12
    assert backend.graphs == 1, backend.graphs


class LinearStack(nn.Module):
    """Linear layers, each after a pointwise tanh·2 + 1 (which inductor fuses); with
    share=True the second one is called again at the end (weight sharing). Returns Σ h²."""

    def __init__(self, share, d=32, depth=4):
        super().__init__()
        self.stack = nn.ModuleList(nn.Linear(d, d) for _ in range(depth))
        self.order = (*self.stack, self.stack[1]) if share else tuple(self.stack)

    def forward(self, h):
        for layer in self.order:
            h = layer(torch.tanh(h) * 2.0 + 1.0)
        return (h * h).sum()


@pytest.mark.parametrize(("compile_backend", "share"),
                         [("aot_eager", True), ("inductor", False), ("inductor", True)])
def test_compiled_captures_equal_eager_under_buffer_reuse(compile_backend, share):
    """Inductor reuses a buffer after its last use in the graph (the plain stack: without
    capture._traced's copies the output gradients it keeps are overwritten) and may
    recompute an activation for the backward: the captured inputs and output gradients are
    the eager ones all the same, and the two calls of a shared layer each get their own
    output gradient (the ticket). Gram by parameter, float64, 1e-12."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = LinearStack(share).to(F64)
    x = torch.randn(5, 32, dtype=F64)

    def grams(run):
        model.zero_grad()
        with lk.Capture(model) as cap:
            run(x).backward()
            return cap.gram(by="parameter")

    eager = grams(model)
    compiled = torch.compile(model, backend=compile_backend)
    for _ in range(2):
        got = grams(compiled)
        for name, K in eager.items():
            assert _rel(got[name], K) < 1e-12, (name, _rel(got[name], K))
    torch._dynamo.reset()


OPTIMIZERS = {
    "FNGD": lambda model: FNGD(model, lr=0.05, damping=1.0, steps_per_epoch=2),
    "SENG": lambda model: SENG(model, lr=0.05, damping=1.0, momentum=0.0),
    "KFAC": lambda model: KFAC(model, lr=0.05, momentum=0.0, inverse_every=2),
}


def _train(model, run, method, loss, x, after_step=lambda step: None):
    """STEPS steps of one optimizer; after_step(k) is called after step k (from 0)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="KFAC:")
        opt = OPTIMIZERS[method](model)
    history = []
    for step in range(STEPS):
        opt.zero_grad()
        value = loss(run, x)
        value.backward()
        opt.step()
        history.append(float(value))
        after_step(step)
    if hasattr(opt, "close"):
        opt.close()
    return history


@pytest.mark.parametrize("method", OPTIMIZERS)
@pytest.mark.parametrize("name", ["mlp", "direct_parameter"])
def test_optimizer_steps_a_compiled_model(name, method, backend):
    """STEPS optimizer steps through the compiled model: the losses are finite, equal the
    eager run's (1e-6 relative) and nothing compiles again after the first step — for FNGD,
    after the first step of each phase: its reuse steps (from step steps_per_epoch = 2 on)
    run the captured layers through Capture.weighted's own autograd Function, eagerly, a
    second program that compiles once (each frame at most once more)."""
    model, batch, loss = _build(name)
    twin = copy.deepcopy(model)
    x = batch(4)
    compiled = torch.compile(model, backend=backend)
    graphs = []
    history = _train(model, compiled, method, loss, x,
                     lambda step: graphs.append(backend.graphs))
    settled = 2 if method == "FNGD" else 0
    assert backend.graphs == graphs[settled], (
        f"{backend.graphs - graphs[settled]} recompile(s) after step {settled + 1}")
    assert graphs[settled] - graphs[0] <= graphs[0], graphs
    eager = _train(twin, twin, method, loss, x)
    assert all(math.isfinite(h) for h in history), history
    for k, (a, b) in enumerate(zip(history, eager)):
        assert abs(a - b) <= 1e-6 * abs(b), f"step {k}: compiled {a} vs eager {b}"
    assert history[-1] < history[0], f"{method}: loss did not decrease {history}"


class Conv1D(nn.Module):
    """Named and shaped as transformers' Conv1D but computing tanh(x W + b): Capture's check
    of a Conv1D's first call must refuse it."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.tanh(x @ self.weight + self.bias)


def test_compiled_conv1d_impostor_raises_as_eager(backend):
    """The Conv1D check runs inside the compiled graph's recording op at the first call:
    the same TypeError as eagerly, naming the module."""
    model = nn.Sequential(Conv1D(4, 3))
    x = torch.randn(5, 3)
    for run in (model, torch.compile(model, backend=backend)):
        with pytest.raises(TypeError, match=r"module '0' \(Conv1D\) is not y = x W \+ b"):
            with lk.Capture(model) as cap:
                run(x).sum().backward()
                cap.gram()
