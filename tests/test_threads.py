"""The thread policy (rlhf/runtime/threads.py): cores from the affinity and the cgroup quota, shared by the
local processes, the user's settings winning; the wait policy set before torch loads."""

import os

import pytest
import torch

from rlhf import cli
from rlhf.errors import UserError
from rlhf.runtime import threads


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# --- cgroup quota -----------------------------------------------------------------------------------

def test_cgroup_v2_quota(tmp_path):
    write(tmp_path / "cgroup.controllers", "cpu memory")
    write(tmp_path / "cpu.max", "150000 100000\n")
    assert threads.cgroup_cpu_limit(tmp_path, "0::/\n") == 1.5
    write(tmp_path / "cpu.max", "max 100000\n")
    assert threads.cgroup_cpu_limit(tmp_path, "0::/\n") is None


def test_cgroup_v2_smallest_limit_of_the_group_and_its_ancestors(tmp_path):
    write(tmp_path / "cgroup.controllers", "cpu")
    write(tmp_path / "cpu.max", "max 100000")
    write(tmp_path / "user.slice" / "cpu.max", "300000 100000")
    write(tmp_path / "user.slice" / "job" / "cpu.max", "max 100000")
    assert threads.cgroup_cpu_limit(tmp_path, "0::/user.slice/job\n") == 3.0
    write(tmp_path / "user.slice" / "job" / "cpu.max", "50000 100000")
    assert threads.cgroup_cpu_limit(tmp_path, "0::/user.slice/job\n") == 0.5


def test_cgroup_v1_cfs_quota(tmp_path):
    proc = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n"
    group = tmp_path / "cpu,cpuacct" / "docker" / "abc"
    write(group / "cpu.cfs_quota_us", "200000")
    write(group / "cpu.cfs_period_us", "100000")
    write(tmp_path / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1")
    write(tmp_path / "cpu,cpuacct" / "cpu.cfs_period_us", "100000")
    assert threads.cgroup_cpu_limit(tmp_path, proc) == 2.0
    write(group / "cpu.cfs_quota_us", "-1")
    assert threads.cgroup_cpu_limit(tmp_path, proc) is None


def test_cgroup_group_not_visible_under_the_mount_reads_the_mount(tmp_path):
    # inside a container /proc/self/cgroup names the host's path; the mount is the container's own group
    write(tmp_path / "cpu" / "cpu.cfs_quota_us", "100000")
    write(tmp_path / "cpu" / "cpu.cfs_period_us", "100000")
    assert threads.cgroup_cpu_limit(tmp_path, "3:cpu:/kubepods/pod1/abc\n") == 1.0


def test_no_cgroup_files_is_no_limit(tmp_path):
    assert threads.cgroup_cpu_limit(tmp_path, "") is None
    assert threads.cgroup_cpu_limit(tmp_path, "0::/\n1:cpu:/\n") is None


# --- thread count -----------------------------------------------------------------------------------

@pytest.mark.parametrize("env, affinity, quota, expected", [
    ({}, 8, None, 8),
    ({}, 8, 1.5, 2),  # a quota is rounded up
    ({}, 8, 0.5, 1),
    ({}, 2, 16.0, 2),  # the affinity is the tighter limit
    ({"LOCAL_WORLD_SIZE": "4"}, 8, None, 2),
    ({"LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "16"}, 8, None, 2),  # four of the sixteen ranks are on this machine
    ({"WORLD_SIZE": "3"}, 2, None, 1),  # never below one
    ({"LOCAL_WORLD_SIZE": "2"}, 8, 3.0, 1),
])
def test_default_threads(env, affinity, quota, expected):
    assert threads.default_threads(env, affinity, quota) == expected


def test_default_threads_reads_this_process_affinity(monkeypatch):
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda *a, **k: None)
    assert threads.default_threads({}) == len(os.sched_getaffinity(0))


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_user_omp_num_threads_wins(monkeypatch, torch_threads):
    monkeypatch.setattr(threads, "default_threads", lambda *a, **k: 2)
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.set_threads() == 1 == torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads.set_threads() == 2 == torch.get_num_threads()


def test_explicit_count_wins_over_everything(monkeypatch, torch_threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.set_threads(2) == 2 == torch.get_num_threads()
    with pytest.raises(UserError, match="cpu_threads must be at least 1, got 0"):
        threads.set_threads(0)


# --- wait policy ------------------------------------------------------------------------------------

@pytest.mark.parametrize("env, expected", [
    ({}, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ({"OMP_WAIT_POLICY": "ACTIVE"}, {"OMP_WAIT_POLICY": "ACTIVE"}),  # the user's choice stays
    ({"GOMP_SPINCOUNT": "10000"}, {"GOMP_SPINCOUNT": "10000"}),
    ({"KMP_BLOCKTIME": "0"}, {"KMP_BLOCKTIME": "0"}),
])
def test_wait_policy(env, expected):
    threads.configure(env)
    assert env == expected


def test_cli_applies_the_policy_before_the_command(monkeypatch):
    calls = []
    monkeypatch.setattr(threads, "configure", lambda env=None: calls.append("configure"))
    monkeypatch.setattr(threads, "set_threads", lambda n=None: calls.append("set_threads"))
    monkeypatch.setitem(cli.COMMANDS, "generate", lambda argv: calls.append("command"))
    assert cli.main(["generate"]) == 0
    assert calls == ["configure", "set_threads", "command"]


def test_cli_sets_the_wait_policy_before_torch_loads(tmp_path):
    import subprocess
    import sys

    # the wait policy is in the environment, and torch not yet loaded, when main() sets it
    code = ("import os, sys; from rlhf import cli; from rlhf.runtime import threads; real = threads.configure\n"
            "def configure(env=None):\n    real(env); print('torch' in sys.modules, os.environ.get('OMP_WAIT_POLICY'))\n"
            "threads.configure = configure; cli.main(['merge', '--help'])")
    env = {k: v for k, v in os.environ.items() if k not in threads.WAIT_VARIABLES}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path,
                         check=True)
    assert out.stdout.strip().splitlines()[0] == "False PASSIVE"
