"""Per-call cost of the op layer, per op, on tiny inputs (the op-layer tests' samples), one
torch thread: what is measured is Python and dispatch.

- "dispatch <op>": lowrank_kernels.<op>(...) against the kernel the dispatcher runs on this
  device called directly (the backend function of a Python kernel; for a C++ kernel the op
  itself, the floor; below the autograd layer for an op with an autograd formula). The
  layer's overhead is the median over rounds of the two back-to-back samples' difference
  (run.paired_difference), but for a kernel of tens of µs it still drowns in the kernel's
  own spread on a shared machine, so also:
- "layer <op>", for each op whose CUDA kernel is launched from Python (Triton): that
  path's layer alone, measured on CPU — the same schema, checks and dispatcher path as <op>
  (registered as probe_<op> with a kernel that returns a preallocated result, behind the
  CUDA kernel's dtype table and `supports` and op's autograd layer if it has one), called
  through the public entry point lowrank_kernels.<op> (its op swapped for the probe while
  measured), against that trivial kernel called directly. Targets: ≤ 5 µs over the kernel
  for native ops, ≤ 10 µs for the others.
A provider call is CALLS calls back to back; the table's times are per call.
"""
import dataclasses
import os
import sys

import torch
from common import DEVICE, Case, Setup, Skip, baseline, ours

import lowrank_kernels as lk
from lowrank_kernels import _registry

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python_tests"))

CALLS = 50
def _loop(fn):
    def run():
        for _ in range(CALLS):
            out = fn()
        return out
    return run


def _public_call(op, args, kwargs):
    """lowrank_kernels.<op> called as a user would: the sample's arguments by name (a Conv2d
    op's schema `geometry` as the pairs and groups it packs), the ones it leaves out at the
    entry point's defaults."""
    _, arguments = _registry._BY_OVERLOAD[getattr(torch.ops.lowrank_kernels, op).default]
    named = {a.name: v for a, v in zip(arguments, args)} | kwargs
    geometry = named.pop("geometry", None)
    if geometry is not None:
        pairs = ("kernel_size",) * (len(geometry) == 9) + ("stride", "padding", "dilation")
        named |= {name: geometry[2 * i:2 * i + 2] for i, name in enumerate(pairs)}
        named["groups"] = geometry[-1]
    fn = getattr(lk, op)
    return lambda: fn(**named)


def _case(op):
    def build():
        if DEVICE != "cpu":
            raise Skip("the CUDA kernels' Python is measured by the GPU pass")
        from test_op_layer import CASES  # tiny valid inputs for every op

        args, kwargs = CASES[op][0]
        overload = getattr(torch.ops.lowrank_kernels, op).default
        spec, arguments = _registry._BY_OVERLOAD[overload]
        full = _registry._complete(arguments, args, kwargs)
        backend = _registry._KERNELS[op, "cpu"]
        run = spec.backends[backend].run
        kernel = (lambda: run(*full)) if backend != "native" else (lambda: overload(*full))
        name = f"{backend} kernel direct" if backend != "native" else "C++ kernel via the op"
        loop = _loop(kernel)
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"{_registry.NAMESPACE}::{op}",
                                                          "Autograd"):
            def loop(inner=loop):  # the kernel without the op's autograd layer (its floor)
                with torch._C._AutoDispatchBelowAutograd():
                    return inner()
            name += " below autograd"
        return Setup([ours(f"lk.{op}", _loop(_public_call(op, args, kwargs))),
                      baseline(name, loop)],
                     calls=CALLS, tol=1e-5, dtype="float32",
                     notes={"kernel": backend})
    return build


def _probe(op, result):
    """probe_<op>: op's schema, checks and fake, every kernel returning `result` — on CPU the
    path of op's CUDA kernel: its dtype table and `supports`, and an autograd kernel where op
    has one (a formula registered from Python; without grad it is a pass-through)."""
    name = f"probe_{op}"
    if not hasattr(torch.ops.lowrank_kernels, name):
        spec = lk.REGISTRY[op]
        cuda = spec.backends[_registry._KERNELS[op, "cuda"]]
        stub = _registry.Backend(lambda *args: result, {"cpu": cuda.dtypes["cuda"]},
                                 cuda.supports)
        _registry.register(dataclasses.replace(
            spec, name=name, backends={"reference": stub, "cpu": stub},
            auto={"cpu": ("cpu",), "cuda": ()}))
        del lk.REGISTRY[name]  # a probe, not a public op
        qualname = f"{_registry.NAMESPACE}::{op}"
        if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Autograd"):
            torch.library.register_autograd(f"{_registry.NAMESPACE}::{name}",
                                            lambda ctx, *grads: None)
    return getattr(torch.ops.lowrank_kernels, name).default


def _layer_case(op):
    def build():
        if DEVICE != "cpu":
            raise Skip("the CUDA kernels' Python is measured by the GPU pass")
        from test_op_layer import CASES

        args, kwargs = CASES[op][0]
        overload = getattr(torch.ops.lowrank_kernels, op).default
        _, arguments = _registry._BY_OVERLOAD[overload]
        full = _registry._complete(arguments, args, kwargs)
        result = overload(*full)
        probe = _probe(op, result)
        spec = _registry._BY_OVERLOAD[probe][0]

        def trivial():
            return result

        public, module = _public_call(op, args, kwargs), sys.modules[getattr(lk, op).__module__]
        name = next(n for n, v in vars(module).items() if v is overload)

        def layer():  # the entry point with its op swapped for the probe
            setattr(module, name, probe)
            try:
                return _loop(public)()
            finally:
                setattr(module, name, overload)

        return Setup([ours("layer over a trivial kernel", layer),
                      baseline("trivial kernel direct", _loop(trivial), check=False)],
                     calls=CALLS, tol=1e-5, notes={"check": spec.check.__module__})
    return build


CASES = ([Case(f"dispatch {op}", "tiny (test_op_layer sample)", _case(op), threads=1)
          for op in sorted(lk.REGISTRY)]
         + [Case(f"layer {op}", "tiny, trivial kernel", _layer_case(op), threads=1)
            for op in sorted(lk.REGISTRY)
            if _registry._KERNELS[op, "cuda"] != "native"])  # a Python (Triton) path
