"""Benchmark runner: times every case of bench/bench_*.py (ours against the best exact
plain-PyTorch formulations), prints one table and writes JSON, a markdown table and a PNG under
bench/results/<device>/.

    python bench/run.py                  # every case, reduced shapes on CPU (minutes)
    python bench/run.py --full           # the full sweep (or LOWRANK_BENCH_FULL=1)
    python bench/run.py -k gram_linear   # a subset: words matched in 'file op | shape',
                                         # with and / or / not and parentheses, as pytest -k
    python bench/run.py --list           # the cases, nothing timed

How a case is timed (in a worker process, never in this one):
- ours and its baselines run interleaved in the same process: one round calls each provider
  once (as many back-to-back calls as make a sample of --sample-ms), in an order that rotates
  every round, so load from other processes falls on all of them alike;
- rounds go on until every provider's median is known to --ci (the 95% order-statistic
  interval of the median, relative to it) after at least --min-rounds, or until the case's
  measuring budget (--budget seconds) is spent (at least 3 rounds);
- the table gives the medians, the spread IQR/median of each, the rounds, and flags (⚠) a row
  whose spread exceeds 10% or whose median is known only to worse than ±5%;
- a case that runs past --case-timeout is recorded as timed out and the run goes on; a case
  that fails is recorded with its error.
Thread settings: each setting runs in its own worker process, set once at its start (never
toggled: MKL's batched LU spins forever after set_num_threads(1) then (2)). Cases use the run's
setting, --threads: on CPU 1 by default (on a shared or oversubscribed machine two OpenMP
threads spin against other processes and one sample in a few takes 10-30x longer; --threads 2
on a dedicated 2-core machine), torch's default on a GPU machine. Cases that pin a setting
(the dispatch and training-step cases: 1) get a worker of their own when it differs.
Results are rewritten after every case (JSON and markdown, 'complete': false until the end),
so an interrupted run keeps what it measured. The roofline floor of a row is
max(flops / peak_flops[dtype], bytes / bandwidth), with the peaks measured at start-up.
"""
import argparse
import datetime
import gc
import importlib
import json
import math
import os
import platform
import queue
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MARK = "@@lowrank-bench@@ "
WIDE_SPREAD = 0.10  # IQR / median above which a row is flagged
WIDE_CI = 0.10  # relative width of the median's 95% interval above which a row is flagged


# ---- cases ------------------------------------------------------------------------------

def load_cases():
    """[(file stem, Case)] of every bench_*.py, in file order then declaration order."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    found = []
    for name in sorted(os.listdir(HERE)):
        if name.startswith("bench_") and name.endswith(".py"):
            module = importlib.import_module(name[:-3])
            found += [(name[:-3], case) for case in module.CASES]
    ids = [case.id for _, case in found]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise SystemExit(f"duplicate case ids: {duplicates}")
    return found


def selected(expr, text):
    """pytest -k semantics: words (case-insensitive substrings of text), and / or / not, ()."""
    if not expr.strip():
        return True
    text = text.lower()
    out = []
    for token in re.findall(r"\(|\)|[^\s()]+", expr):
        if token in ("(", ")") or token.lower() in ("and", "or", "not"):
            out.append(token.lower() if token not in "()" else token)
        else:
            out.append(str(token.lower() in text))
    try:
        return bool(eval(" ".join(out), {"__builtins__": {}}))  # only True/False/and/or/not
    except SyntaxError:
        raise SystemExit(f"bad -k expression: {expr!r}")


# ---- the worker: builds and times cases --------------------------------------------------

def _sorted_stats(samples):
    s = sorted(samples)
    n = len(s)

    def q(p):
        x = p * (n - 1)
        lo = math.floor(x)
        hi = min(lo + 1, n - 1)
        return s[lo] + (s[hi] - s[lo]) * (x - lo)

    median = q(0.5)
    k = math.floor((n - 1.96 * math.sqrt(n)) / 2)  # order-statistic 95% CI of the median
    ci = (s[n - 1 - k] - s[k]) / median if k >= 0 and median > 0 else float("inf")
    return {"median": median, "iqr_rel": (q(0.75) - q(0.25)) / median if median > 0 else 0.0,
            "ci_rel": ci, "min": s[0], "rounds": n}


def _tensors(out):
    if out is None:
        return []
    if hasattr(out, "detach"):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    return []


def _compare(name, ours_out, out, tol):
    a, b = _tensors(ours_out), _tensors(out)
    if not a or not b:
        raise AssertionError(f"{name}: no tensor output to compare with ours")
    x, y = a[0].detach().double().reshape(-1), b[0].detach().double().reshape(-1)
    if x.numel() != y.numel():
        raise AssertionError(f"{name}: {y.numel()} outputs against ours' {x.numel()}")
    scale = float(y.abs().max()) or 1.0
    err = float((x.cpu() - y.cpu()).abs().max()) / scale
    if not err <= tol:
        raise AssertionError(f"{name} disagrees with ours: max error {err:.2e} of the largest "
                             f"entry (> {tol:g})")


def time_case(case, opts):
    """Build the case, check the baselines against ours, time the providers interleaved."""
    import torch
    from common import DEVICE, sync

    saved_env = {k: os.environ.get(k) for k in case.env}
    os.environ.update(case.env)
    try:
        setup = case.build()
        providers = setup.providers
        first = next(p for p in providers if p.role == "ours")
        peak_extra = None
        outs = {}
        for p in providers:  # warm-up: compilation, autotuning, allocator, lazy init
            outs[p.name] = p.fn()
            sync()
        for p in providers:
            if p.role == "baseline" and p.check:
                _compare(p.name, outs[first.name], outs[p.name], setup.tol)
        del outs
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            first.fn()
            sync()
            peak_extra = torch.cuda.max_memory_allocated() - base
        number = {}
        for p in providers:  # calls per sample: a sample of at least sample_ms
            start = time.perf_counter()
            p.fn()
            sync()
            once = max(time.perf_counter() - start, 1e-7)
            number[p.name] = max(1, min(10_000, math.ceil(opts["sample_s"] / once)))
        samples = {p.name: [] for p in providers}
        budget = opts["budget"] * case.budget_scale
        converged = False
        gc.collect()
        gc.disable()
        start = time.perf_counter()
        rounds = 0
        try:
            while True:
                shift = rounds % len(providers)
                for p in providers[shift:] + providers[:shift]:
                    n = number[p.name]
                    t0 = time.perf_counter()
                    for _ in range(n):
                        p.fn()
                    sync()
                    samples[p.name].append((time.perf_counter() - t0) / n)
                rounds += 1
                stats = [_sorted_stats(s) for s in samples.values()]
                if rounds >= opts["min_rounds"] and all(s["ci_rel"] <= opts["ci"] for s in stats):
                    converged = True
                    break
                if rounds >= opts["max_rounds"]:
                    break
                if rounds >= 3 and time.perf_counter() - start >= budget:
                    break
        finally:
            gc.enable()
        measured_s = time.perf_counter() - start
        if setup.after is not None:
            try:
                setup.after()
            except AssertionError as exc:  # the timings stand; the rows say what failed
                setup.notes["CHECK FAILED"] = str(exc) or "assertion after timing"
        result = {
            "providers": [dict(name=p.name, role=p.role, extra=p.extra, number=number[p.name],
                               samples=samples[p.name], **_sorted_stats(samples[p.name]))
                          for p in providers],
            "flops": float(setup.flops), "bytes": float(setup.bytes_moved),
            "dtype": setup.dtype, "calls": setup.calls, "notes": setup.notes,
            "rounds": rounds, "converged": converged, "measured_s": measured_s,
            "peak_extra_bytes": peak_extra, "threads": torch.get_num_threads(),
        }
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return result


def measured_peaks():
    """{dtype: flop/s} from a square matmul, and bytes/s from a large copy (read + write)."""
    import torch
    from common import DEVICE, sync

    def best(fn, repeats=5):
        fn()
        sync()
        t = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            t = min(t, time.perf_counter() - start)
        return t

    n = 8192 if DEVICE == "cuda" else 1536
    dtypes = ["float32", "float64"] + (["bfloat16", "float16"] if DEVICE == "cuda" else [])
    peaks = {}
    for name in dtypes:
        dt = getattr(torch, name)
        a = torch.randn(n, n, device=DEVICE).to(dt)
        b = torch.randn(n, n, device=DEVICE).to(dt)
        peaks[name] = 2 * n ** 3 / best(lambda a=a, b=b: a @ b)
    numel = (1 << 28) if DEVICE == "cuda" else (1 << 25)
    src = torch.empty(numel, device=DEVICE, dtype=torch.float32)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / best(lambda: dst.copy_(src))
    return {"peaks": peaks, "bandwidth": bandwidth}


def worker_main():
    """Reads one JSON command a line on stdin, answers one MARK line each on stdout."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the code under test prints goes to the log, not the protocol
    import torch

    cases = {case.id: case for _, case in load_cases()}

    def send(obj):
        out.write(MARK + json.dumps(obj) + "\n")
        out.flush()

    send({"ready": True, "threads": torch.get_num_threads()})
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "peaks":
                send({"ok": measured_peaks()})
            else:
                send({"ok": time_case(cases[cmd["id"]], cmd["opts"])})
        except Exception as exc:  # noqa: BLE001  (recorded in the row; the run goes on)
            from common import Skip
            if isinstance(exc, Skip):
                send({"skipped": str(exc)})
            else:
                traceback.print_exc()
                send({"error": f"{type(exc).__name__}: {exc}"[:500]})
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class Worker:
    """A worker process with a fixed torch thread count (None: torch's default)."""

    def __init__(self, threads, log, full):
        env = dict(os.environ, LOWRANK_BENCH_FULL="1" if full else "0", PYTHONUNBUFFERED="1")
        if threads is not None:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                     env=env, text=True, cwd=ROOT, start_new_session=True)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.threads = self.ask(None, 300)["threads"]

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith(MARK):
                self.lines.put(json.loads(line[len(MARK):]))
        self.lines.put({"died": self.proc.wait()})

    def ask(self, cmd, timeout):
        """Send cmd (None: just wait for the next answer); None back when it timed out."""
        if cmd is not None:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        try:
            answer = self.lines.get(timeout=timeout)
        except queue.Empty:
            return None
        if "died" in answer:
            raise RuntimeError(f"worker exited with {answer['died']} (see the log)")
        return answer

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()


# ---- results: rows, table, plot -----------------------------------------------------------

def rows_of(case, result, meta):
    """One row per ours provider of a case (or one row saying why there is no timing)."""
    base = {"id": case.id, "op": case.op, "shape": case.shape}
    if "ok" not in result:
        status = next(k for k in ("timeout", "skipped", "error") if k in result)
        return [dict(base, provider="-", status=status, note=str(result[status]),
                     label=f"{case.op}  {case.shape}")]
    r = result["ok"]
    provs = r["providers"]
    ours_list = [p for p in provs if p["role"] == "ours"]
    baselines = sorted((p for p in provs if p["role"] == "baseline"), key=lambda p: p["median"])
    calls = r["calls"]
    rows = []
    for o in ours_list:
        t = o["median"] / calls
        peak = meta["peaks"].get(r["dtype"], meta["peaks"].get("float32"))
        floor = max(r["flops"] / calls / peak if r["flops"] and peak else 0.0,
                    r["bytes"] / calls / meta["bandwidth"] if r["bytes"] else 0.0)
        row = dict(base, status="ok", provider=o["name"], ours_s=t, ours_spread=o["iqr_rel"],
                   ours_ci=o["ci_rel"], rounds=r["rounds"], converged=r["converged"],
                   threads=r["threads"], calls=calls,
                   tflops=r["flops"] / calls / t / 1e12 if r["flops"] else None,
                   gbps=r["bytes"] / calls / t / 1e9 if r["bytes"] else None,
                   pct_floor=100.0 * floor / t if floor else None,
                   peak_extra_mib=(r["peak_extra_bytes"] / 2 ** 20
                                   if r["peak_extra_bytes"] is not None else None),
                   baselines={b["name"]: b["median"] / calls for b in baselines},
                   notes=dict(r["notes"], **o["extra"]),
                   label=(f"{o['name']}  —  {case.shape}" if len(ours_list) > 1
                          else f"{case.op}  {case.shape}"))
        spreads = [o["iqr_rel"]]
        cis = [o["ci_rel"]]
        if baselines:
            b = baselines[0]
            row.update(best_baseline=b["name"], baseline_s=b["median"] / calls,
                       baseline_spread=b["iqr_rel"], speedup=b["median"] / o["median"])
            spreads.append(b["iqr_rel"])
            cis.append(b["ci_rel"])
            row["notes"].update({f"baseline {k}": v for k, v in b["extra"].items()})
            if calls > 1:
                row["notes"]["overhead_per_call_us"] = (o["median"] - b["median"]) / calls * 1e6
            if case.op.startswith(OVERHEAD_PREFIXES):
                row["overhead_s"] = paired_difference(o["samples"], b["samples"]) / calls
        row["flag"] = max(spreads) > WIDE_SPREAD or max(cis) > WIDE_CI
        rows.append(row)
    return rows


def paired_difference(ours, baseline):
    """The median over rounds of ours − baseline, each round's two samples taken back to back
    (time_case interleaves the providers): the cost of a layer over its kernel without the
    drift between rounds that a difference of the two medians carries, which is many times
    the few µs measured when the kernel takes tens of µs."""
    return statistics.median(o - b for o, b in zip(ours, baseline))


def _fmt(x, spec, scale=1.0):
    return format(x * scale, spec) if x is not None else "-"


def _note(k, v):
    return f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"


# Rows that time the op layer over its kernel (bench_dispatch.py) rather than an op against
# a baseline formulation, and their targets in µs per call (the op-layer issue's).
OVERHEAD_PREFIXES = ("dispatch ", "layer ")
OVERHEAD_TARGET_US = {"native": 5.0, "other": 10.0}
# Optimizer-step rows: an optimizer against SGD, not an op against its formulation; compiled
# model steps under Capture against the same steps eager (bench_compile.py).
OPTIM_OP = "optim_step"
COMPILE_PREFIX = "compile_step"


def kind_of(row):
    """'overhead', 'optim', 'compile' or 'op' (the rows held to >= 1.0x their best
    baseline)."""
    if row["op"].startswith(OVERHEAD_PREFIXES):
        return "overhead"
    if row["op"].startswith(COMPILE_PREFIX):
        return "compile"
    return "optim" if row["op"] == OPTIM_OP else "op"


def overhead_table(rows):
    """The op layer's cost per call over the kernel it runs, against its target."""
    lines = [("| row | kernel | ours µs/call | kernel direct µs/call | overhead µs (paired) "
              "| target µs | met |"), "|" + "---|" * 7]
    for r in rows:
        if r["status"] != "ok" or "baseline_s" not in r:
            lines.append(f"| {r['op']} | - | - | - | - | - | **{r['status']}** |")
            continue
        kernel = r["notes"].get("kernel", "python (probe)")
        target = OVERHEAD_TARGET_US["native" if kernel == "native" else "other"]
        over = r.get("overhead_s", r["ours_s"] - r["baseline_s"]) * 1e6
        lines.append(f"| {r['op']} | {kernel} | {r['ours_s'] * 1e6:.2f} "
                     f"| {r['baseline_s'] * 1e6:.2f} | {over:.2f} | ≤ {target:g} "
                     f"| {'yes' if over <= target else '**no**'} |")
    return "\n".join(lines)


def summary(rows):
    """How many op rows are at or above 1.0x their best baseline."""
    ops = [r for r in rows if kind_of(r) == "op" and r.get("speedup") is not None]
    losing = [f"{r['op']} {r['shape']} {r['speedup']:.2f}×" for r in ops if r["speedup"] < 1.0]
    text = f"Op rows at or above 1.0× their best baseline: **{len(ops) - len(losing)} of {len(ops)}**."
    return text + (" Below: " + "; ".join(losing) + "." if losing else "")


def table(rows):
    head = ("| op | shape | ours | ms | ± | best baseline | ms | ± | speed-up | rounds "
            "| TFLOP/s | GB/s | % of floor | notes |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['op']} | {r['shape']} | - | - | - | - | - | - | - | - | - | - "
                         f"| - | **{r['status']}**: {r['note']} |")
            continue
        notes = ", ".join(_note(k, v) for k, v in r["notes"].items())
        if r.get("peak_extra_mib") is not None:
            notes = f"peak extra {r['peak_extra_mib']:.1f} MiB" + (", " + notes if notes else "")
        speed = _fmt(r.get("speedup"), ".2f") + ("×" if r.get("speedup") else "")
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['provider']} | {_fmt(r['ours_s'], '.3f', 1e3)} "
            f"| {_fmt(r['ours_spread'], '.0f', 100)}% | {r.get('best_baseline', '-')} "
            f"| {_fmt(r.get('baseline_s'), '.3f', 1e3)} "
            f"| {_fmt(r.get('baseline_spread'), '.0f', 100) + '%' if 'baseline_s' in r else '-'} "
            f"| {speed}{' ⚠' if r['flag'] else ''} "
            f"| {r['rounds']}{'' if r['converged'] else '*'} | {_fmt(r['tflops'], '.3g')} "
            f"| {_fmt(r['gbps'], '.1f')} | {_fmt(r['pct_floor'], '.1f')} | {notes} |")
    return "\n".join(lines)


LEGEND = (
    "ms: median time of one call; ±: its spread, IQR / median; ours and the baselines ran "
    "interleaved, round by round, in one process. speed-up: best baseline's median / ours' "
    "(> 1: ours is faster). rounds: timed rounds (* = the case's budget ran out before every "
    "median was known to ±{ci:.1%}). ⚠: spread > {wide:.0%} or a median known only to worse "
    "than ±{half:.0%}: read that row's ratio with care. % of floor: the roofline floor "
    "(measured peaks) / ours' time.")


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
    labels = [r["label"] for r in rows]
    width = min(30.0, 4.5 + 0.065 * max(map(len, labels)))
    fig, ax = plt.subplots(figsize=(width, 0.24 * len(rows) + 1.6))
    speed = [r["speedup"] for r in rows]
    bars = ax.barh(range(len(rows)), speed,
                   color=["tab:green" if s >= 1 else "tab:red" for s in speed])
    for bar, r in zip(bars, rows):
        if r["flag"]:
            bar.set_alpha(0.45)
            bar.set_hatch("///")
        ax.text(bar.get_width() * 1.04, bar.get_y() + bar.get_height() / 2,
                f"{r['speedup']:.2f}×{' ⚠' if r['flag'] else ''}", va="center", fontsize=6)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylim(len(rows) - 0.4, -0.6)
    ax.set_xscale("log")
    lo, hi = min(speed + [1.0]), max(speed + [1.0])
    ax.set_xlim(lo / 1.5, hi * 2.0)
    ax.set_xlabel("speed-up of ours over the best exact baseline (log scale; > 1: ours is "
                  "faster; hatched ⚠: wide spread)", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ---- the parent: workers, progress, files --------------------------------------------------

def device_name(device):
    if device == "cuda":
        import torch
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


def device_slug(device, name):
    if device == "cpu":
        return f"cpu-{os.cpu_count()}core"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def backend_table():
    """`python -m lowrank_kernels`: the build and the backend auto takes per op and device."""
    try:
        return subprocess.run([sys.executable, "-m", "lowrank_kernels"], capture_output=True,
                              text=True, timeout=120, cwd=HERE, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


class Progress:
    """tqdm when it is installed, else one line per case with an ETA."""

    def __init__(self, total):
        self.total, self.done, self.start = total, 0, time.time()
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="case", dynamic_ncols=True, file=sys.stderr)
        except ImportError:
            self.bar = None

    def begin(self, text):
        if self.bar is not None:
            self.bar.set_description_str(text[:70])
        else:
            eta = ""
            if self.done:
                left = (time.time() - self.start) / self.done * (self.total - self.done)
                eta = f", ETA {left / 60:.1f} min"
            print(f"[{self.done + 1}/{self.total}{eta}] {text}", file=sys.stderr, flush=True)

    def end(self, status):
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(status)
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def write_results(out, stem, meta, rows, raw, device_label, final):
    meta = dict(meta, complete=final,
                date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    tmp = os.path.join(out, stem + ".json.tmp")
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "rows": rows, "raw": raw}, f, indent=1)
    os.replace(tmp, os.path.join(out, stem + ".json"))
    peak_text = ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in meta["peaks"].items())
    state = "" if final else f"**PARTIAL: {len(raw)} of {meta['cases']} cases so far.**\n\n"
    threads = sorted({r["threads"] for r in rows if r.get("threads")})
    header = (f"# Benchmarks on {device_label}\n\n{state}commit {meta['commit']}, {meta['date']}, "
              f"torch {meta['torch']}, {'full' if meta['full'] else 'reduced'} shapes, torch "
              f"threads {'/'.join(map(str, threads)) or meta['threads']} (one worker process "
              f"per setting), load average {meta['load']}; wall time {meta['wall_s']:.0f} s."
              f"\n\nMeasured peaks (roofline): {peak_text}; copy "
              f"bandwidth {meta['bandwidth'] / 1e9:.1f} GB/s.\n\n")
    legend = LEGEND.format(ci=meta["opts"]["ci"] / 2, wide=WIDE_SPREAD, half=WIDE_CI / 2)
    sections = []
    ops = [r for r in rows if kind_of(r) == "op"]
    if ops:
        sections.append("## Ops against the best plain-PyTorch formulation\n\n" + summary(rows)
                        + "\n\n" + table(ops))
    optim = [r for r in rows if kind_of(r) == "optim"]
    if optim:
        sections.append("## Optimizer steps against an SGD step\n\n" + table(optim))
    compiled = [r for r in rows if kind_of(r) == "compile"]
    if compiled:
        sections.append("## torch.compile'd model steps under Capture against eager\n\n"
                        + table(compiled))
    overhead = [r for r in rows if kind_of(r) == "overhead"]
    if overhead:
        sections.append("## Call overhead of the op layer (tiny inputs, 1 thread)\n\n"
                        + overhead_table(overhead))
    body = "\n\n".join(sections)
    text = header + body + "\n\n" + legend + "\n"
    if meta.get("backends"):
        text += "\nBackends (`python -m lowrank_kernels`):\n\n```\n" + meta["backends"] + "\n```\n"
    tmp = os.path.join(out, stem + ".md.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(out, stem + ".md"))
    return header + body + "\n\n" + legend


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", dest="select", default="", help="case selection (pytest -k style)")
    parser.add_argument("--full", action="store_true", default=None,
                        help="the full sweep (default: $LOWRANK_BENCH_FULL, else reduced on CPU)")
    parser.add_argument("--out", default=None,
                        help="results folder (default bench/results/<device>)")
    parser.add_argument("--budget", type=float, default=None,
                        help="measuring seconds per case (default 2.5 reduced, 10 full)")
    parser.add_argument("--case-timeout", type=float, default=None,
                        help="seconds after which a case is recorded as timed out "
                             "(default 90 reduced, 600 full)")
    parser.add_argument("--min-rounds", type=int, default=7)
    parser.add_argument("--max-rounds", type=int, default=400)
    parser.add_argument("--ci", type=float, default=0.05,
                        help="stop when each median's 95%% interval is this narrow (relative)")
    parser.add_argument("--sample-ms", type=float, default=2.0,
                        help="fast ops: back-to-back calls per sample to reach this")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the cases that pin none (default: 1 on CPU, "
                             "torch's default on a GPU machine)")
    parser.add_argument("--list", action="store_true", help="list the selected cases and exit")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main()

    if args.full is None:
        args.full = os.environ.get("LOWRANK_BENCH_FULL", "0") == "1"
    os.environ["LOWRANK_BENCH_FULL"] = "1" if args.full else "0"
    wall_start = time.time()
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    full = args.full or device == "cuda"
    if args.threads is None and device == "cpu":
        args.threads = 1
    found = [(f, c) for f, c in load_cases() if selected(args.select, f"{f} {c.id}")]
    if args.list:
        for f, c in found:
            print(f"{f}: {c.id}" + (f"  [threads {c.threads}]" if c.threads else ""))
        return
    if not found:
        raise SystemExit("no case selected")
    opts = {"budget": args.budget or (10.0 if full else 2.5), "min_rounds": args.min_rounds,
            "max_rounds": args.max_rounds, "ci": args.ci, "sample_s": args.sample_ms / 1e3}
    case_timeout = args.case_timeout or (600.0 if full else 90.0)

    name = device_name(device)
    out = args.out or os.path.join(HERE, "results", device_slug(device, name))
    os.makedirs(out, exist_ok=True)
    stem = "results" + ("-full" if args.full and device == "cpu" else "")
    if args.select:
        stem += "-" + re.sub(r"[^A-Za-z0-9]+", "_", args.select).strip("_")
    log_path = os.path.join(out, stem + ".log")
    order = {c.id: i for i, (_, c) in enumerate(found)}
    groups = {}
    for _, c in found:
        groups.setdefault(c.threads or args.threads, []).append(c)
    meta = {"device": name, "torch": torch.__version__, "commit": git_commit(),
            "full": full, "select": args.select, "opts": opts, "case_timeout_s": case_timeout,
            "cases": len(found), "threads": args.threads or torch.get_num_threads(),
            "backends": backend_table(), "peaks": {}, "bandwidth": 0.0, "wall_s": 0.0,
            "load": " ".join(f"{x:.1f}" for x in os.getloadavg()) + f" on {os.cpu_count()} cores"}
    print(f"device: {name}; {len(found)} cases ({'full' if full else 'reduced'} shapes), "
          f"~{opts['budget']:.0f} s each; log: {os.path.relpath(log_path)}", flush=True)

    rows, raw = [], {}
    progress = Progress(len(found))
    text = ""
    worker = None
    with open(log_path, "w") as log:
        try:
            for threads, cases in groups.items():
                for case in cases:
                    if worker is None:
                        progress.begin(f"starting a worker ({threads or 'default'} threads)")
                        worker = Worker(threads, log, args.full)
                        if not meta["peaks"]:
                            progress.begin("measuring peaks")
                            p = worker.ask({"cmd": "peaks"}, case_timeout)["ok"]
                            meta["peaks"], meta["bandwidth"] = p["peaks"], p["bandwidth"]
                    progress.begin(case.id)
                    log.write(f"\n=== {case.id}\n")
                    log.flush()
                    case_start = time.time()
                    try:
                        result = worker.ask({"cmd": "case", "id": case.id, "opts": opts},
                                            case_timeout)
                    except RuntimeError as exc:  # the worker died (a crash, out of memory)
                        result = {"error": str(exc)}
                        worker.kill()
                        worker = None
                    if result is None:
                        result = {"timeout": f"timed out after {case_timeout:.0f} s"}
                        worker.kill()
                        worker = None
                    result["wall_s"] = time.time() - case_start
                    raw[case.id] = result
                    rows = sorted(rows + rows_of(case, result, meta), key=lambda r: order[r["id"]])
                    meta["wall_s"] = time.time() - wall_start
                    write_results(out, stem, meta, rows, raw, name, final=False)
                    status = next(k for k in result if k != "wall_s")
                    if status == "ok":
                        ratios = [r["speedup"] for r in rows
                                  if r["id"] == case.id and r.get("speedup")]
                        status = " ".join(f"{s:.2f}×" for s in ratios) or "ok"
                    progress.end(status)
                if worker is not None:
                    worker.kill()
                    worker = None
        finally:
            if worker is not None:
                worker.kill()
            progress.close()
            meta["wall_s"] = time.time() - wall_start
            if rows:
                text = write_results(out, stem, meta, rows, raw, name,
                                     final=len(raw) == len(found))
    plot(rows, os.path.join(out, stem + ".png"), f"{name} — commit {meta['commit']}")
    print()
    print(text)
    print(f"\nwritten: {os.path.relpath(out)}/{stem}.{{json,md,png,log}} in "
          f"{time.time() - wall_start:.0f} s")


if __name__ == "__main__":
    main()
