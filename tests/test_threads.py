"""The thread policy (rlhf/runtime/threads.py): cores from the affinity and the cgroup quota, shared by the
local processes, the user's settings winning; fewer threads while other processes hold the cores."""

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
    threads._stop_adaptive()  # no watcher outlives its test
    torch.set_num_threads(before)


def test_user_omp_num_threads_wins(monkeypatch, torch_threads):
    monkeypatch.setattr(threads, "default_threads", lambda *a, **k: 2)
    monkeypatch.setattr(threads, "_start_adaptive", lambda most: None)
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


# --- the command line -------------------------------------------------------------------------------

def test_cli_applies_the_policy_before_the_command(monkeypatch):
    calls = []
    monkeypatch.setattr(threads, "set_threads", lambda n=None: calls.append("set_threads"))
    monkeypatch.setitem(cli.COMMANDS, "generate", lambda argv: calls.append("command"))
    assert cli.main(["generate"]) == 0
    assert calls == ["set_threads", "command"]


# --- following the free cores -----------------------------------------------------------------------

@pytest.mark.parametrize("current, most, waiting, idle, idle_before, expected", [
    (2, 2, 0.0, 0.0, 0.0, 2),  # alone, cores busy with our own work: keep
    (2, 2, 0.6, 0.0, 0.0, 1),  # our threads wait for a CPU another process holds: fewer
    (1, 2, 0.0, 0.0, 0.0, 1),  # the other core is still taken
    (1, 2, 0.0, 0.9, 0.2, 1),  # idle for one interval only: not yet
    (1, 2, 0.0, 0.9, 0.95, 2),  # idle for two: back up
    (16, 16, 4.3, 0.0, 0.0, 12),  # four CPUs' worth of waiting on a big machine
    (8, 16, 0.0, 7.9, 7.8, 16),
    (8, 16, 0.0, 3.2, 3.0, 11),
    (1, 1, 3.0, 0.0, 0.0, 1),  # never below one
])
def test_next_threads(current, most, waiting, idle, idle_before, expected):
    assert threads.next_threads(current, most, waiting, idle, idle_before) == expected


def test_idle_seconds_of_this_process_cpus(tmp_path):
    stat = tmp_path / "stat"
    ticks = threads._CLOCK_TICKS
    stat.write_text(f"cpu  9 0 9 {30 * ticks} 0 0 0 0 0 0\ncpu0 1 0 1 {10 * ticks} {ticks} 0 0 0 0 0\n"
                    f"cpu1 1 0 1 {20 * ticks} 0 0 0 0 0 0\nintr 5\n")
    assert threads._idle([1], stat) == {1: 20.0}  # idle + iowait, in seconds
    assert threads._idle([5, 6], stat) == {0: 11.0, 1: 20.0}  # numbered from 0 here (lxcfs): all of them


def test_adaptive_sets_the_count_on_the_main_thread(monkeypatch, torch_threads):
    """Fake readings: our threads wait (another process holds a core), then the cores stand idle."""
    import time

    clock = {"wait_ns": 0, "idle_s": 0.0, "phase": "busy"}

    def task_waits():
        if clock["phase"] == "busy":
            clock["wait_ns"] += 10**9  # far more waiting than any interval lasts
        return {1: clock["wait_ns"]}

    def idle(cpus, stat=None):
        if clock["phase"] == "idle":
            clock["idle_s"] += 5.0
        return {c: clock["idle_s"] for c in cpus}

    monkeypatch.setattr(threads, "_task_waits", task_waits)
    monkeypatch.setattr(threads, "_idle", idle)
    torch.set_num_threads(2)
    adaptive = threads.Adaptive(2, interval=0.02).start()
    try:
        def main_thread_sees(n):  # Python bytecode runs here, where the pending call lands
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and torch.get_num_threads() != n:
                sum(range(1000))
            return torch.get_num_threads() == n

        assert main_thread_sees(1)
        clock["phase"] = "idle"
        assert main_thread_sees(2)
    finally:
        adaptive.stop()


def test_set_threads_starts_adapting_only_when_nothing_was_chosen(monkeypatch, torch_threads):
    started = []
    monkeypatch.setattr(threads, "_start_adaptive", lambda most: started.append(most))
    monkeypatch.setattr(threads, "default_threads", lambda *a, **k: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    threads.set_threads()
    assert started == []  # the user's OMP_NUM_THREADS: kept as it is
    monkeypatch.delenv("OMP_NUM_THREADS")
    threads.set_threads(2)
    assert started == []  # an explicit count: kept
    assert threads.set_threads() == 2 and started == [2]


def test_thread_count_does_not_change_a_training_step(torch_threads):
    """A forward and backward of a small Llama (the trunk's matmuls, softmax, RMSNorm, embedding gradient)
    give bitwise the same logits and gradients with 1 and 2 threads: training steps at this shape do not
    depend on the count the policy adapts. (Decoding's small matmuls do: see rlhf/runtime/threads.py.)"""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=344, vocab_size=2000))
    ids = torch.randint(0, 2000, (8, 48))
    seen = []
    for n in (1, 2):
        torch.set_num_threads(n)
        model.zero_grad()
        logits = model(input_ids=ids).logits  # (8, 48, 2000)
        logits.float().log_softmax(-1).mean().backward()
        seen.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(seen[0][0], seen[1][0])
    assert all(torch.equal(a, b) for a, b in zip(seen[0][1], seen[1][1]))
