"""Compile the Triton kernels of lowrank_kernels for a GPU (target cuda sm_90, down to a cubin)
without one. The interpreter (TRITON_INTERPRET=1) runs the kernels on CPU but never
type-checks them as the compiler does, so a kernel could pass every interpreter test and still
fail to compile on a GPU.

A test file names the kernel modules it covers (COVERAGE) and its cases: functions that return
the launches to compile. `compile_in_child(file, case)` runs the file as a script in a child
process without TRITON_INTERPRET (where @triton.jit gives compilable functions, not
interpreted ones); the script calls `main(CASES)`, which compiles every launch of the case and
prints the kernels compiled as "module:kernel", and lists every launch that failed (its argument
types, constexprs and the compiler's first diagnostic). The launches are shared among up to 4
children (one per CPU).

A launch is either recorded — `record(modules, drive)` runs launcher code with a recorder in
place of every `_..._kernel` of the modules, and each distinct `kernel[grid](*args, **kwargs)`
is specialized exactly as Triton's JIT would for the same arguments on a GPU (types, integers
equal to 1 made constants, 16-divisible integers and 16-byte aligned pointers marked so) — or
written out (`explicit`). The compile cache is Triton's (TRITON_CACHE_DIR, else ~/.triton).
"""
import ast
import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TRITON_DIR = Path(__file__).resolve().parents[1] / "lowrank_kernels" / "triton"

# Which file compiles which kernel modules of lowrank_kernels/triton: every module with a
# `_..._kernel` is covered by exactly one file (test_triton_compile_others.py checks it).
COVERAGE = {
    "test_triton_compile_layers.py": ("gram_linear", "weighted_sum_linear", "project_linear"),
    "test_subspace_triton_sm90.py": ("fwht", "subspace_project", "random_subspace"),
    "test_triton_compile_others.py": ("gram_embedding", "weighted_sum_embedding",
                                      "project_embedding", "sketch_omega", "sketch_matmul"),
}


def _jit_functions(path):
    """Names of the @triton.jit functions defined in a source file (static: no import)."""
    names = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef):
            for decorator in node.decorator_list:
                target = decorator.func if isinstance(decorator, ast.Call) else decorator
                if ast.unparse(target) in ("triton.jit", "jit"):
                    names.append(node.name)
    return names


def is_kernel(name):
    return name.startswith("_") and name.endswith("_kernel")


def kernels_by_module():
    """{module: its `_..._kernel` @triton.jit functions} for lowrank_kernels/triton/*.py."""
    found = {}
    for path in sorted(TRITON_DIR.glob("*.py")):
        kernels = [name for name in _jit_functions(path) if is_kernel(name)]
        if kernels:
            found[path.stem] = kernels
    return found


def jit_helper_modules():
    """Modules with @triton.jit functions but no kernel (called from other modules' kernels)."""
    return sorted(path.stem for path in TRITON_DIR.glob("*.py")
                  if _jit_functions(path) and not any(map(is_kernel, _jit_functions(path))))


def expected_kernels(modules):
    """The "module:kernel" names of every kernel in the given modules."""
    found = kernels_by_module()
    return sorted(f"{module}:{name}" for module in modules for name in found[module])


@dataclasses.dataclass
class Launch:
    """One kernel compile: what Triton's JIT would pass to triton.compile."""
    fn: object
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    grid: tuple = ()

    def name(self):
        return f"{self.fn.__module__.rsplit('.', 1)[-1]}:{self.fn.__name__}"

    def describe(self):
        """name(runtime argument types; constexpr values) num_warps."""
        names = self.fn.arg_names
        args = [f"{name}: {kind}" for name, kind in self.signature.items() if kind != "constexpr"]
        args += [f"{names[path[0]]}={value!r}" for path, value in sorted(self.constexprs.items())]
        return f"{self.name()}({', '.join(args)}) num_warps={self.options.get('num_warps')}"

    def key(self):
        return (self.name(), repr(self.signature), repr(sorted(self.constexprs.items())),
                repr(sorted(self.attrs.items())), repr(sorted(self.options.items())))


def _backend():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    return make_backend(GPUTarget("cuda", 90, 32))


def specialize(fn, args, kwargs, grid=()):
    """The Launch of fn[grid](*args, **kwargs) on an sm_90 GPU: Triton's own binder and
    argument packing (as in JITFunction.run; Triton internals of 3.9), so types and
    specializations match a real launch (CPU tensors stand in for CUDA ones: the same dtypes,
    the same alignment of views)."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(kwargs)  # the compile options JITFunction.run adds to every launch
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    backend = _backend()
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args,
                                                          specialization, options)
    grid = grid if callable(grid) else tuple(grid)
    return Launch(fn, signature, constexprs, attrs, dict(options.__dict__), grid)


def explicit(fn, signature, constexprs, **options):
    """A written-out Launch: types of the runtime arguments, values of the constexprs (by
    name), compile options (num_warps, ...); no alignment or divisibility attributes."""
    from triton.compiler import ASTSource

    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    constants = ASTSource(fn, signature, constexprs).constants
    return Launch(fn, signature, constants, {}, options)


class _Recorder:
    """Stands in for a @triton.jit kernel: kernel[grid](*args, **kwargs) records its Launch."""

    def __init__(self, fn, launches):
        self.fn = fn
        self.launches = launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            recorded = specialize(self.fn, args, kwargs, grid)
            self.launches.setdefault(recorded.key(), recorded)
        return launch


def record(modules, drive):
    """Run drive() with every `_..._kernel` of the modules replaced by a recorder; the distinct
    launches it made, in order."""
    import pytest

    launches = {}
    patch = pytest.MonkeyPatch()
    for module in modules:
        for name in dir(module):
            if is_kernel(name):
                patch.setattr(module, name, _Recorder(getattr(module, name), launches))
    try:
        drive()
    finally:
        patch.undo()
    return list(launches.values())


def compile_sm90(launch):
    """Compile a Launch for sm_90 (cuda); the compiled kernel must have PTX and a cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn=launch.fn, signature=launch.signature, constexprs=launch.constexprs,
                       attrs=launch.attrs)
    with tempfile.TemporaryFile(mode="w+") as log:
        # The compiler's diagnostics go to file descriptor 2: keep them for the message.
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                      options=launch.options)
            error = None
        except Exception as exception:
            error = exception
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        diagnostics = log.read()
    sys.stderr.write(diagnostics)
    what = launch.describe()
    if error is not None:
        first = (diagnostics.strip().splitlines() or [""])[0]
        cause = error
        while cause.__cause__ is not None:  # a CompilationError's cause is the real error
            cause = cause.__cause__
        reason = " ".join(f"{first} ({type(cause).__name__}: {cause})".split())[-600:]
        raise AssertionError(f"{what} does not compile for sm_90: {reason}") from error
    assert ".entry" in compiled.asm.get("ptx", ""), f"{what}: no PTX entry"
    assert compiled.asm.get("cubin"), f"{what}: no cubin"
    return compiled


def main(cases):
    """Child-process entry: `file case [shard shards]` compiles launch shard, shard + shards, ...
    of the case (all without a shard), prints the kernels compiled; a launch that fails does
    not stop the others: all failures are listed last (on stderr, exit status 1)."""
    assert "TRITON_INTERPRET" not in os.environ, "compile in a process without the interpreter"
    shard, shards = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (0, 1)
    launches = sorted(cases[sys.argv[1]](), key=Launch.key)[shard::shards]
    failures = []
    for launch in launches:
        try:
            compile_sm90(launch)
        except AssertionError as error:
            failures.append(str(error))
    print("\n".join(sorted({launch.name() for launch in launches})))
    if failures:
        print(f"\n{len(failures)} of {len(launches)} launches failed to compile:",
              *failures, sep="\n", file=sys.stderr)
        sys.exit(1)


def compile_in_child(test_file, case, timeout=900):
    """Run `test_file case shard shards` (whose __main__ calls main(CASES)) without
    TRITON_INTERPRET in one child process per CPU (at most 4), each compiling its share of the
    launches; the "module:kernel" names compiled. Skips where Triton has no CUDA backend."""
    import pytest

    pytest.importorskip("triton.backends.nvidia", reason="Triton without its CUDA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    shards = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                        else os.cpu_count() or 1))
    logs = [(tempfile.TemporaryFile(mode="w+"), tempfile.TemporaryFile(mode="w+"))
            for _ in range(shards)]
    children = [subprocess.Popen([sys.executable, str(test_file), case, str(shard), str(shards)],
                                 env=env, stdout=out, stderr=err, text=True)
                for shard, (out, err) in enumerate(logs)]
    names, errors = set(), []
    try:
        for child, (out, err) in zip(children, logs):
            child.wait(timeout=timeout)
            out.seek(0)
            names.update(out.read().split())
            if child.returncode != 0:
                err.seek(0)
                errors.append(err.read()[-8000:])
    finally:
        for child, (out, err) in zip(children, logs):
            if child.poll() is None:
                child.kill()
                child.wait()
            out.close()
            err.close()
    assert not errors, "\n".join(errors)
    return sorted(names)
