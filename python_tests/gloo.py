"""gloo process groups for the multi-process tests and bench/distributed_gloo.py: one rank's
group, with an ordered teardown, and a spawn with a deadline.

The teardown is ordered so that no rank leaves while a peer still has a gloo collective in
flight, and no rank exits with a live process group:
- the body's last collective is followed by a barrier: once a rank is past it, every rank
  has finished all its collectives, so destroy_process_group cannot pull a connection out
  from under a peer's pending read;
- destroy_process_group runs on every exit path (a gloo group still alive at interpreter
  shutdown aborts the process: "terminate called without an active exception");
- traffic stays on the loopback interface (GLOO_SOCKET_IFNAME, this child only) rather than
  whatever the hostname resolves to, and the rendezvous is a FileStore in the caller's
  folder: no port to choose, none to race for."""
import contextlib
import datetime
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def loopback_interface():
    """The loopback interface's name ('lo' on Linux, 'lo0' on macOS), or None."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (AttributeError, OSError):
        return None
    return next((n for n in names if n.startswith("lo")), None)


@contextlib.contextmanager
def process_group(rank, world, init_file, timeout_s=120):
    """The gloo group of `rank` of `world` (FileStore at init_file, one torch thread), torn
    down in order (see the module docstring)."""
    torch.set_num_threads(1)
    loopback = loopback_interface()
    if loopback is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = loopback
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn, args, nprocs, deadline_s=300):
    """mp.spawn (the 'spawn' start method: fresh interpreters, nothing inherited from the
    caller but its environment), joined with a deadline: a hung rank fails instead of
    hanging CI; the children are killed on the way out.

    The deadline counts the seconds in which the ranks were all blocked — none of their
    threads running or waiting for a CPU (Linux schedstat: the time on a CPU plus the time
    runnable in the run queue grew by less than 0.1 s in that second) —, not the wall time:
    on a loaded machine ranks that run slowly are not hung (a blocked set of ranks uses a
    few ms per second; one runnable rank alone adds about 1 s per second). Without
    /proc/<pid>/task/*/schedstat: wall time."""
    context = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    pids = [process.pid for process in context.processes]
    busy, blocked = _busy_ns(pids), 0.0
    try:
        while True:
            tick = time.monotonic()
            if context.join(timeout=1.0):
                return
            now = _busy_ns(pids)
            if now is None or now - busy < 100_000_000:
                blocked += time.monotonic() - tick
            else:
                blocked = 0.0
            busy = now
            if blocked >= deadline_s:
                raise TimeoutError(f"the {nprocs} ranks were blocked for {deadline_s} s (hung)"
                                   if now is not None else
                                   f"the {nprocs} ranks did not finish in {deadline_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()


def _busy_ns(pids):
    """Σ over the processes' threads of (time on a CPU + time runnable, waiting for one), ns
    (/proc/<pid>/task/<tid>/schedstat; an exited process counts 0), or None without it."""
    if not os.path.exists("/proc/self/schedstat"):
        return None
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    on_cpu, waiting = f.read().split()[:2]
            except (OSError, ValueError):
                continue
            total += int(on_cpu) + int(waiting)
    return total
