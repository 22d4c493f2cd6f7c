"""Benchmark runner: runs the pytest-benchmark files in bench/, prints one table (shape, ours,
best baseline, speed-up, TFLOP/s, GB/s, % of the roofline floor, peak extra memory) and
writes JSON, a markdown table and a PNG plot under bench/results/<device>/.

    python bench/run.py                 # every bench_*.py
    python bench/run.py -k gram_linear  # a subset (pytest -k expression)

The roofline floor of a case is max(flops / peak_flops[dtype], bytes / peak_bandwidth) with
the peaks MEASURED on this device at start-up (a large matmul per dtype, a large copy), so
'% of floor' = floor / time says how close a kernel is to what this machine can do.
"""
import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _best_time(fn, repeats=5):
    fn()
    _sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - start)
    return best


def measured_peaks():
    """{dtype: flop/s} from a square matmul, and bytes/s from a large copy (read + write)."""
    n = 8192 if DEVICE == "cuda" else 1536
    dtypes = ["float32", "float64"] + (["bfloat16", "float16"] if DEVICE == "cuda" else [])
    peaks = {}
    for name in dtypes:
        dt = getattr(torch, name)
        a = torch.randn(n, n, device=DEVICE).to(dt)
        b = torch.randn(n, n, device=DEVICE).to(dt)
        peaks[name] = 2 * n**3 / _best_time(lambda: a @ b)
    numel = (1 << 28) if DEVICE == "cuda" else (1 << 25)
    src = torch.empty(numel, device=DEVICE, dtype=torch.float32)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / _best_time(lambda: dst.copy_(src))
    return peaks, bandwidth


def device_name():
    if DEVICE == "cuda":
        return torch.cuda.get_device_name(0)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def device_slug(name):
    if DEVICE == "cpu":
        return f"cpu-{os.cpu_count()}core"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_pytest(select, json_path):
    cmd = [sys.executable, "-m", "pytest", HERE, "-q", "-p", "no:cacheprovider",
           "-o", "python_files=bench_*.py",
           "--benchmark-only", f"--benchmark-json={json_path}", "--benchmark-disable-gc"]
    if select:
        cmd += ["-k", select]
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode not in (0, 5):  # 5: nothing selected
        raise SystemExit(f"benchmarks failed (pytest exit {proc.returncode})")


def summarize(raw, peaks, bandwidth):
    """One row per (op, shape): ours against the best baseline."""
    groups = {}
    for bench in raw["benchmarks"]:
        info = bench["extra_info"]
        key = (info["op"], info["shape"])
        groups.setdefault(key, []).append((bench["stats"]["median"], info))
    rows = []
    for (op, shape), entries in sorted(groups.items()):
        ours = [e for e in entries if not e[1]["baseline"]]
        baselines = sorted((e for e in entries if e[1]["baseline"]), key=lambda e: e[0])
        for t_ours, info in ours or [(None, None)]:
            if info is None:
                continue
            flops, nbytes = info["flops"], info["bytes"]
            peak = peaks.get(info.get("dtype", "float32"), peaks["float32"])
            floor = max(flops / peak if flops else 0.0, nbytes / bandwidth if nbytes else 0.0)
            row = {
                "op": op, "shape": shape, "provider": info["provider"], "ours_s": t_ours,
                "tflops": flops / t_ours / 1e12 if flops else None,
                "gbps": nbytes / t_ours / 1e9 if nbytes else None,
                "pct_floor": 100.0 * floor / t_ours if floor else None,
                "peak_extra_mib": (info["peak_extra_bytes"] / 2**20
                                   if info.get("peak_extra_bytes") is not None else None),
                "baselines": {b[1]["provider"]: b[0] for b in baselines},
                "extra": {k: v for k, v in info.items() if k not in (
                    "op", "shape", "provider", "flops", "bytes", "baseline", "device",
                    "peak_extra_bytes", "dtype")},
            }
            if baselines:
                row["best_baseline"] = baselines[0][1]["provider"]
                row["baseline_s"] = baselines[0][0]
                row["speedup"] = baselines[0][0] / t_ours
            rows.append(row)
    return rows


def _fmt(x, spec):
    return format(x, spec) if x is not None else "-"


def table(rows):
    head = ("| op | shape | ours | time (ms) | best baseline | time (ms) | speed-up | TFLOP/s "
            "| GB/s | % of floor | peak extra MiB | notes |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        notes = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in r["extra"].items())
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['provider']} | {_fmt(r['ours_s'] * 1e3, '.3f')} "
            f"| {r.get('best_baseline', '-')} | {_fmt(r.get('baseline_s') and r['baseline_s'] * 1e3, '.3f')} "
            f"| {_fmt(r.get('speedup'), '.2f')}× | {_fmt(r['tflops'], '.3g')} "
            f"| {_fmt(r['gbps'], '.1f')} | {_fmt(r['pct_floor'], '.1f')} "
            f"| {_fmt(r['peak_extra_mib'], '.1f')} | {notes} |")
    return "\n".join(lines)


def plot(rows, path, title):
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no PNG plot (the table and JSON are written)")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("speedup")]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(rows) + 1.5))
    labels = [f"{r['op']}  {r['shape']}" for r in rows]
    ax.barh(range(len(rows)), [r["speedup"] for r in rows],
            color=["tab:green" if r["speedup"] >= 1 else "tab:red" for r in rows])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("speed-up of ours over the best baseline (log scale; > 1 is faster)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", dest="select", default="", help="pytest -k expression")
    parser.add_argument("--out", default=None, help="results folder (default bench/results/<device>)")
    args = parser.parse_args()

    name = device_name()
    out = args.out or os.path.join(HERE, "results", device_slug(name))
    os.makedirs(out, exist_ok=True)
    print(f"device: {name}; measuring peaks ...", flush=True)
    peaks, bandwidth = measured_peaks()
    with tempfile.TemporaryDirectory() as tmp:
        raw_path = os.path.join(tmp, "raw.json")
        run_pytest(args.select, raw_path)
        if not os.path.exists(raw_path) or os.path.getsize(raw_path) == 0:
            raise SystemExit("no benchmark ran")
        with open(raw_path) as f:
            raw = json.load(f)
    rows = summarize(raw, peaks, bandwidth)
    meta = {"device": name, "torch": torch.__version__, "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "peak_tflops_measured": {k: v / 1e12 for k, v in peaks.items()},
            "bandwidth_gbps_measured": bandwidth / 1e9, "select": args.select}
    stem = "results" if not args.select else "results-" + re.sub(r"[^A-Za-z0-9]+", "_", args.select)
    with open(os.path.join(out, stem + ".json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "raw": raw["benchmarks"]}, f, indent=1)
    peak_text = ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in peaks.items())
    header = (f"# Benchmarks on {name}\n\ncommit {meta['commit']}, {meta['date']}, torch "
              f"{meta['torch']}\n\nMeasured peaks (roofline): {peak_text}; copy bandwidth "
              f"{bandwidth / 1e9:.1f} GB/s.\n\n")
    text = table(rows)
    with open(os.path.join(out, stem + ".md"), "w") as f:
        f.write(header + text + "\n")
    plot(rows, os.path.join(out, stem + ".png"), f"{name} — commit {meta['commit']}")
    print()
    print(header + text)
    print(f"\nwritten: {out}/{stem}.{{json,md,png}}")


if __name__ == "__main__":
    main()
