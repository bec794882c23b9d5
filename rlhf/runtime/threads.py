"""How many CPU threads each command computes with, and how they wait: one policy for every stage.

Measured on a 2-core machine (issue 22, `benchmarks/threads.py`): beside one busy single-threaded
process, OpenMP's default wait (each thread spins ~300k iterations at every barrier before sleeping)
made PPO 13x and the reward model 4x slower than alone. A thread that spins while the one it waits for
has been descheduled burns the time slice the other one needs; with hundreds of small ops per step,
every op then costs a scheduler slice. Waiting passively (sleeping at once) fixes most of it.

The policy, applied once at the start of every `rlhf` command (`rlhf/cli.py`), before torch loads:
- `configure()`: `OMP_WAIT_POLICY=PASSIVE`, unless the user chose a wait (OMP_WAIT_POLICY, GOMP_SPINCOUNT
  or KMP_BLOCKTIME set). It must be set before OpenMP initialises: libgomp reads it once, when torch
  loads it.
- `set_threads(None)`: intra-op threads = the cores this process may use (its CPU affinity, which
  `taskset` or a cpuset narrows, and the cgroup CPU quota, which docker --cpus or a Kubernetes limit
  sets; not `os.cpu_count()`), divided among the local processes of a multi-process launch. A user's
  `OMP_NUM_THREADS` wins; an explicit count (`ppo.cpu_threads`) wins over both.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Optional

from rlhf.errors import UserError

CGROUP_ROOT = Path("/sys/fs/cgroup")
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")  # a user's choice of how threads wait


def configure(env: Optional[dict] = None) -> None:
    """Set how OpenMP threads wait, in the environment (inherited by child processes: accelerate's ranks,
    the vLLM worker). Call before torch is imported; afterwards it changes nothing in this process."""
    env = os.environ if env is None else env
    if not any(k in env for k in WAIT_VARIABLES):
        env["OMP_WAIT_POLICY"] = "PASSIVE"


def set_threads(n: Optional[int] = None) -> int:
    """Fix torch's intra-op threads and return the count: `n` if given, else the user's OMP_NUM_THREADS
    (left as torch read it), else `default_threads()`."""
    import torch

    if n is None:
        if "OMP_NUM_THREADS" in os.environ:
            return torch.get_num_threads()
        n = default_threads()
    if n < 1:
        raise UserError(f"cpu_threads must be at least 1, got {n}")
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n


def default_threads(env: Optional[Mapping[str, str]] = None, affinity: Optional[int] = None,
                    quota: Optional[float] = -1.0) -> int:
    """The cores this process may use, shared among the processes of this launch on this machine.
    `affinity` / `quota` (CPUs; None: no limit) are read from the system when not given."""
    env = os.environ if env is None else env
    cores = len(os.sched_getaffinity(0)) if affinity is None else affinity
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
