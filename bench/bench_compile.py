"""A torch.compile'd model step under Capture against the same step eager (issue 14: "a
compiled step is no slower than an eager one"), in the same process, interleaved: for a small
MLP (the shape of python_tests/test_capture_compile.py, wider) and a small pre-norm
transformer block stack, three steps each —

- capture: zero_grad, forward + backward inside `with Capture(model)`, the Gram cap.gram();
- fngd: one FNGD step in its first epoch (Gram, Woodbury solve, weighted sum) after the
  forward and backward of the model;
- seng: one SENG step (refresh every step);
- plain: the forward and backward alone, no capture: what torch.compile itself gives this
  model (the reference for the three above: on CPU a tiny model's compiled step carries
  dynamo's guards and AOTAutograd's wrappers, ~0.1–0.2 ms, which a capture cannot remove).

The eager row is the baseline, the compiled row "ours": its speed-up is eager / compiled
(> 1: the compiled step is faster). Compile time is excluded (the build warms both up) and is
given in the notes, with the number of graphs dynamo compiled (after timing: none more, no
recompile). The captured torch layers trace into the graph with their recording as custom
ops (capture._traced): each model compiles as one graph (graphs = 1), the capture's batch
hook on the model running before it. FNGD's rows time its first epoch (its reuse steps run
the captured layers through Capture.weighted, as eager calls).
LOWRANK_BENCH_COMPILE_BACKEND picks the torch.compile backend (inductor by default).

    python bench/run.py -k compile
"""
import copy
import os
import time

import torch
import torch.nn.functional as F
from bench_optim_step import Block  # the pre-norm transformer block (causal SDPA, GELU MLP)
from common import DEVICE, FULL, Case, Provider, Setup, baseline, sync
from torch import nn

import lowrank_kernels as lk
from lowrank_kernels.optim import FNGD, SENG

BACKEND = os.environ.get("LOWRANK_BENCH_COMPILE_BACKEND", "inductor")
HUGE = 10 ** 9
WARM_STEPS = 3  # compiles at the first; the others settle the caches


class Transformer(nn.Module):
    def __init__(self, d_in, d, heads, layers, classes):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.blocks(self.inp(x)).mean(1))


def _mlp():
    width, B = (512, 256) if FULL else (128, 64)
    model = nn.Sequential(nn.Linear(32, width), nn.LayerNorm(width), nn.Tanh(),
                          nn.Linear(width, width), nn.GELU(), nn.Linear(width, 10))
    return model, torch.randn(B, 32), B


def _transformer():
    d, layers, B, T = (256, 4, 32, 128) if FULL else (64, 2, 16, 32)
    return Transformer(16, d, 4, layers, 10), torch.randn(B, T, 16), B


MODELS = {"mlp": _mlp, "transformer": _transformer}
LABELS = ({"mlp": "MLP 32-512-512-10 LayerNorm B=256", "transformer":
           "transformer d=256 4 blocks B=32 T=128"} if FULL else
          {"mlp": "MLP REDUCED 32-128-128-10 LayerNorm B=64",
           "transformer": "transformer REDUCED d=64 2 blocks B=16 T=32"})


def _step(kind, model, run, x, y):
    """() -> loss: one step of `kind` through run (model itself, or its compiled twin)."""
    if kind == "plain":
        def step():
            model.zero_grad(set_to_none=True)
            loss = F.cross_entropy(run(x), y)
            loss.backward()
            return loss
        return step, None
    if kind == "capture":
        cap = lk.Capture(model)

        def step():
            model.zero_grad(set_to_none=True)
            with cap:
                loss = F.cross_entropy(run(x), y)
                loss.backward()
                cap.gram()
            return loss
        return step, None
    opt = (FNGD(model, lr=1e-3, steps_per_epoch=HUGE) if kind == "fngd" else
           SENG(model, lr=1e-3, update_freq=1))

    def step():
        loss = F.cross_entropy(run(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss
    return step, opt


def _case(name, kind):
    def build():
        torch.manual_seed(0)
        model, x, B = MODELS[name]()
        model, x = model.to(DEVICE), x.to(DEVICE)
        y = (torch.arange(B) % 10).to(DEVICE)
        twin = copy.deepcopy(model)
        torch._dynamo.reset()
        graphs = []

        def count(gm, example_inputs):
            graphs.append(len(gm.graph.nodes))
            return torch._dynamo.lookup_backend(BACKEND)(gm, example_inputs)

        compiled = torch.compile(twin, backend=count)
        eager_step, eager_opt = _step(kind, model, model, x, y)
        compiled_step, compiled_opt = _step(kind, twin, compiled, x, y)
        start = time.perf_counter()
        compiled_step()
        sync()
        compile_s = time.perf_counter() - start
        for _ in range(WARM_STEPS):
            eager_step()
            compiled_step()
        first = len(graphs)

        def after():
            for opt in (eager_opt, compiled_opt):
                if opt is not None:
                    skipped = int(opt.state["skipped"])
                    assert not skipped, f"{skipped} skipped steps"
                    opt.close()
            assert len(graphs) == first, f"{len(graphs) - first} recompiles while timed"

        return Setup([baseline("eager", eager_step, check=False),
                      Provider("compiled", compiled_step, role="ours")],
                     notes={"backend": BACKEND, "compile_s": round(compile_s, 1),
                            "graphs": first}, after=after)
    return build


# One torch thread on CPU (a worker of its own), as the other training-step cases.
CASES = [Case(f"compile_step {kind}", LABELS[name] + (", 1 thread" if DEVICE == "cpu" else ""),
              _case(name, kind), threads=1 if DEVICE == "cpu" else None)
         for name in MODELS for kind in ("plain", "capture", "fngd", "seng")]
