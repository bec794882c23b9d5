"""How many CPU threads each command computes with: one policy for every stage.

Measured on a 2-core machine (issue 22, and `benchmarks/threads.py`): beside one busy single-threaded
process, torch's default (one OpenMP thread per core, spinning at every barrier for 300,000 pauses, about
15 ms here, before it sleeps) made PPO up to 13x and the reward model 4x slower than alone: a thread that spins while the one it
waits for has been descheduled burns the time slice the other one needs, and each of the hundreds of small
parallel ops per step then costs a scheduler slice. One thread has no barriers and ran 1.2-1.35x slower
than alone. OpenMP's passive wait (OMP_WAIT_POLICY=PASSIVE) also survived the neighbour, but alone it lost
most of what the second thread gives (5 quickstart PPO iterations: 7.7-8.1 s against 5.2-5.7 s with the
fast wait, both with this policy's thread count): at small shapes a parallel op is shorter than waking a
sleeping thread. So the threads keep OpenMP's fast wait, and their number follows the machine.

The policy, applied once at the start of every `rlhf` command (`rlhf/cli.py`):
- `set_threads(None)`: intra-op threads = the cores this process may use (its CPU affinity, which
  `taskset` or a cpuset narrows, and the cgroup CPU quota, which docker --cpus or a Kubernetes limit
  sets; not `os.cpu_count()`), divided among the local processes of a multi-process launch; then, on a
  CPU-only Linux machine, fewer while other processes hold the cores and back up when they leave
  (`Adaptive`). A user's `OMP_NUM_THREADS` wins (nothing adapts); an explicit count (`ppo.cpu_threads`)
  wins over both.

Changing the count mid-run changes float rounding: a training forward and backward at the test's shape is
bitwise the same with 1 and 2 threads (tests/test_threads.py), but the decoding steps' small matmuls are
not. Measured on the quickstart's PPO stage, killed after checkpoint-40 and resumed from it while other
jobs came and went: the same samples and scores at every step, the KL equal to 5-6 significant digits, not
bitwise. With the count pinned (`OMP_NUM_THREADS`, `ppo.cpu_threads`) two runs beside other jobs were
bitwise equal: pin it where a resumed run must log exactly what a straight one logs.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Optional

from rlhf.errors import UserError

CGROUP_ROOT = Path("/sys/fs/cgroup")


def set_threads(n: Optional[int] = None, adapt: bool = True) -> int:
    """Fix torch's intra-op threads and return the count: `n` if given, else the user's OMP_NUM_THREADS
    (left as torch read it), else `default_threads()`, then following the cores left free by other
    processes (`Adaptive`, on a CPU-only Linux machine, with `adapt`). Call on the main thread."""
    import torch

    if n is None:
        if _ADAPTIVE is not None:
            return torch.get_num_threads()  # already chosen, and being adapted
        if "OMP_NUM_THREADS" in os.environ:
            return torch.get_num_threads()
        n = default_threads()
        if adapt and n > 1 and not torch.cuda.is_available():
            torch.set_num_threads(n)
            _start_adaptive(n)
            return n
    if n < 1:
        raise UserError(f"cpu_threads must be at least 1, got {n}")
    _stop_adaptive()  # an explicit count is kept
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n


def default_threads(env: Optional[Mapping[str, str]] = None, affinity: Optional[int] = None,
                    quota: Optional[float] = -1.0) -> int:
    """The cores this process may use, shared among the processes of this launch on this machine.
    `affinity` (cores) and `quota` (CPUs, None: no limit) are read from the system when left out (-1)."""
    env = os.environ if env is None else env
    if affinity is None:  # macOS has no affinity call: every core
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = affinity
    limit = cgroup_cpu_limit() if quota == -1.0 else quota
    if limit is not None:
        # Rounded up, as the JVM and Go's runtime do: a quota of 1.5 CPUs runs 2 threads.
        cores = min(cores, max(1, math.ceil(limit)))
    return max(1, cores // local_processes(env))


def local_processes(env: Mapping[str, str]) -> int:
    """Processes of this launch on this machine: torchrun's and accelerate's LOCAL_WORLD_SIZE, else
    WORLD_SIZE (a one-machine launch), else 1."""
    for key in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        value = env.get(key, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Optional[str] = None) -> Optional[float]:
    """The CPU quota of this process's control group and its ancestors, in CPUs (quota / period), the
    smallest one found; None when there is none. cgroup v2 (`cpu.max`: "max 100000" or "150000 100000")
    and v1 (`cpu.cfs_quota_us`, -1 for none, with `cpu.cfs_period_us`). `proc_cgroup`: the text of
    /proc/self/cgroup (read when None)."""
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            proc_cgroup = ""
    limits = []
    for directory in _cgroup_dirs(root, proc_cgroup):
        if (directory / "cpu.max").is_file():
            fields = _read(directory / "cpu.max").split()
            if len(fields) == 2 and fields[0] != "max":
                limits.append(_ratio(fields[0], fields[1]))
        elif (directory / "cpu.cfs_quota_us").is_file():
            limits.append(_ratio(_read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")))
    limits = [x for x in limits if x is not None]
    return min(limits) if limits else None


def _cgroup_dirs(root: Path, proc_cgroup: str) -> list[Path]:
    """Directories that may hold this process's CPU limits, innermost first: its own group under the v2
    mount or the v1 `cpu` controller's, each ancestor up to the mount point (a limit set on a parent
    applies to its children), and the mount point itself (inside a container the group path often is
    not visible under the mount, which then is the container's own group)."""
    dirs: list[Path] = []
    for line in proc_cgroup.splitlines():
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            mounts = [root] if (root / "cgroup.controllers").exists() or (root / "cpu.max").exists() else []
        elif "cpu" in controllers.split(","):
            mounts = [p for p in (root / controllers, root / "cpu", root / "cpu,cpuacct") if p.is_dir()][:1]
        else:
            continue
        for mount in mounts:
            parts = [p for p in path.strip().split("/") if p]
            for i in range(len(parts), -1, -1):
                directory = mount.joinpath(*parts[:i])
                if directory.is_dir() and directory not in dirs:
                    dirs.append(directory)
    if not dirs:
        dirs = [d for d in (root, root / "cpu", root / "cpu,cpuacct") if d.is_dir()]
    return dirs


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _ratio(quota: str, period: str) -> Optional[float]:
    """quota / period in CPUs, or None for no limit (-1, `max`) or an unreadable pair."""
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


# ---------------------------------------------------------------------------------------------------
# following the free cores


WAITING_TO_DROP = 0.25  # CPUs' worth of our threads' waiting that takes a thread away


def next_threads(current: int, most: int, waiting: float, idle: float, idle_before: float) -> int:
    """The thread count for the next interval. `waiting`: CPUs' worth of time this process's threads spent
    runnable but not running in the last interval (another process holds the cores); `idle` and
    `idle_before`: CPUs' worth of idle time of this process's cores in the last two intervals.
    Fewer threads as soon as ours wait; more only when cores stood idle for two intervals, so a burst of
    another job's work does not make the count swing."""
    if current > 1 and waiting > WAITING_TO_DROP:
        return max(1, current - max(1, round(waiting)))
    if current < most and min(idle, idle_before) > 0.75:
        return min(most, current + max(1, int(min(idle, idle_before) + 0.25)))
    return current


class Adaptive:
    """Intra-op threads that follow the cores other processes leave free, between 1 and `most` (see the
    module docstring for why). A daemon thread reads, every `interval` seconds, how long this process's
    threads waited for a CPU (/proc/self/task/*/schedstat) and how idle its cores were (/proc/stat); a
    new count is set on the main thread, by a pending call that runs between two Python bytecodes there
    (OpenMP's thread count belongs to the thread that starts the parallel work)."""

    def __init__(self, most: int, interval: float = 0.5):
        import ctypes

        self.most, self.current, self.interval = most, most, interval
        self.cpus = sorted(os.sched_getaffinity(0))
        self._stop = False
        callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
        self._apply = callback_type(self._set_on_main_thread)
        _CALLBACKS.append(self._apply)  # never freed: a pending call may hold its pointer after stop()
        self._add_pending_call = ctypes.pythonapi.Py_AddPendingCall
        self._add_pending_call.argtypes = [callback_type, ctypes.c_void_p]
        self._wanted = most

    def start(self) -> "Adaptive":
        import atexit
        import threading

        atexit.register(self.stop)  # nothing is set while the interpreter shuts down
        threading.Thread(target=self._watch, name="rlhf-threads", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop = True

    def _set_on_main_thread(self, _arg) -> int:
        if self._stop:
            return 0
        try:
            import torch

            torch.set_num_threads(self._wanted)
            self.current = self._wanted
        except Exception:  # never raise into the bytecode the main thread was running
            pass
        return 0

    def _watch(self) -> None:
        import time

        waits, idle = _task_waits(), _idle(self.cpus)
        idle_before = 0.0
        start = time.monotonic()
        while not self._stop:
            time.sleep(self.interval)
            now = time.monotonic()
            new_waits, new_idle = _task_waits(), _idle(self.cpus)
            seconds = max(now - start, 1e-3)
            waiting = sum(v - waits[t] for t, v in new_waits.items() if t in waits) / 1e9 / seconds
            idle_cpus = sum(new_idle[c] - idle[c] for c in new_idle if c in idle) / seconds if idle else 0.0
            wanted = next_threads(self.current, self.most, waiting, idle_cpus, idle_before)
            if wanted != self.current and wanted != self._wanted:
                self._wanted = wanted
                if self._add_pending_call(self._apply, None) != 0:  # the queue was full: next interval
                    self._wanted = self.current
            waits, idle, idle_before, start = new_waits, new_idle, idle_cpus, now


_ADAPTIVE: Optional[Adaptive] = None
_CALLBACKS: list = []


def _start_adaptive(most: int) -> None:
    global _ADAPTIVE
    if not Path("/proc/self/task").is_dir() or not Path("/proc/stat").is_file():
        return  # not Linux: the count stays as set
    try:
        _ADAPTIVE = Adaptive(most).start()
    except (AttributeError, OSError):  # no ctypes.pythonapi (not CPython)
        _ADAPTIVE = None


def _stop_adaptive() -> None:
    global _ADAPTIVE
    if _ADAPTIVE is not None:
        _ADAPTIVE.stop()
        _ADAPTIVE = None


def _task_waits() -> dict[int, int]:
    """{thread id: nanoseconds it has waited on a run queue} for this process's threads."""
    waits = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            waits[int(tid)] = int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):  # the thread ended meanwhile
            continue
    return waits


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _idle(cpus: list[int], stat: Path = Path("/proc/stat")) -> dict[int, float]:
    """{cpu: seconds idle so far} for `cpus` (idle + iowait of /proc/stat); every CPU listed there when
    none of `cpus` is (a container whose /proc/stat numbers its CPUs from 0)."""
    idle = {}
    try:
        for line in stat.read_text().splitlines():
            fields = line.split()
            if fields and fields[0].startswith("cpu") and fields[0][3:].isdigit():
                idle[int(fields[0][3:])] = (int(fields[4]) + int(fields[5])) / _CLOCK_TICKS
    except (OSError, IndexError, ValueError):
        return {}
    mine = {c: v for c, v in idle.items() if c in set(cpus)}
    return mine or idle
