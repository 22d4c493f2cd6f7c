"""`python -m lowrank_kernels`: what a bug report needs — versions, GPU, how the extension
was built, and which backend each op runs on CPU and on CUDA."""
import os
import platform
import sys

import torch

import lowrank_kernels as lk
from lowrank_kernels import _capabilities as caps
from lowrank_kernels._registry import backend_table


def report() -> str:
    lines = [
        f"lowrank_kernels {lk.__version__}",
        f"python          {sys.version.split()[0]} ({platform.platform()})",
        f"torch           {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton          {caps.triton_version() or 'not installed'}"
        + (" (interpreter: TRITON_INTERPRET=1)" if caps.triton_interpreter() else ""),
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"gpu {i}           {p.name}, sm_{p.major}{p.minor}, "
                         f"{p.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("gpu             none visible")
    lines.append(f"native _C       {caps.native_build_info()}")
    if not caps.native_built():
        lines.append(f"                ({caps.native_import_error()})")
    if os.environ.get("LOWRANK_BACKEND"):
        lines.append(f"LOWRANK_BACKEND {os.environ['LOWRANK_BACKEND']} (overrides 'auto' below)")
    lines.append("")
    table = backend_table()
    width = max(len(name) for name in table) if table else 2
    lines.append(f"{'op'.ljust(width)}  {'cpu':<12}  cuda")
    for name, row in sorted(table.items()):
        lines.append(f"{name.ljust(width)}  {row['cpu']:<12}  {row['cuda']}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
