"""The package's import graph runs one way: optim → capture / natural_gradient / sketch /
subspace / compress → ops → backends (reference, cpu, triton, the native _C), and every op
file reads on its own (it imports shared helpers from ops/_common.py, never another op)."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "lowrank_kernels"
BACKENDS = {"reference", "cpu", "triton", "_C"}
API = {"capture", "natural_gradient", "sketch", "subspace", "compress"}


def _layer(parts):
    top = parts[0]
    if top in BACKENDS:
        return "backend"
    if top == "ops":
        return "ops"
    if top in API:
        return "api"
    if top == "optim":
        return "optim"
    return "core"  # _registry, _checks, _capabilities, __init__, __main__


def _imports(path):
    """The lowrank_kernels submodules (as parts) that `path` imports at module level or in
    functions."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[:len(package) - node.level + 1])
                target = base + (node.module.split(".") if node.module else [])
                names = [] if node.module else [a.name for a in node.names]
            elif node.module and node.module.startswith("lowrank_kernels"):
                target = node.module.split(".")[1:]
                names = [] if target else [a.name for a in node.names]
            else:
                continue
            found += [tuple(target + [n]) for n in names] if names else [tuple(target)]
        elif isinstance(node, ast.Import):
            found += [tuple(a.name.split(".")[1:]) for a in node.names
                      if a.name.startswith("lowrank_kernels.")]
    return parts, [t for t in found if t]


ALLOWED = {  # layer -> the layers it may import
    "backend": {"backend", "core"},
    "ops": {"ops", "backend", "core"},
    "api": {"api", "ops", "core"},
    "optim": {"optim", "api", "ops", "core"},
    "core": {"core", "ops", "api", "optim", "backend"},
}


def test_imports_run_one_way():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts, targets = _imports(path)
        layer = _layer(parts)
        for target in targets:
            if _layer(target) not in ALLOWED[layer]:
                bad.append(f"{'/'.join(parts)} ({layer}) imports {'.'.join(target)} "
                           f"({_layer(target)})")
    assert not bad, "\n".join(bad)


def test_op_files_import_no_other_op():
    bad = []
    for path in sorted((PACKAGE / "ops").glob("*.py")):
        if path.name in ("__init__.py", "_common.py"):
            continue
        parts, targets = _imports(path)
        for target in targets:
            if target[0] == "ops" and target[1] not in ("_common", parts[-1]):
                bad.append(f"ops/{path.name} imports {'.'.join(target)}")
    assert not bad, "\n".join(bad)
