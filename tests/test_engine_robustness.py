"""The rollout engine's process and socket under failure, with a stand-in worker (tests/fake_engine_worker.py,
the real worker's connection code without vLLM): a worker that stops answering or dies ends the request in
one line, on time; close() ends the worker's whole process group; no other local connection can block or
impersonate the worker; the engine's private folder (socket, adapters, full weights) is 0700, removed on
close and on SIGTERM, and the folder a killed run left is removed by the next start."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO

from rlhf.errors import UserError
from rlhf.generation.vllm_engine import (
    RUN_PREFIX,
    EngineError,
    Sampling,
    VLLMConfig,
    VLLMEngine,
    owner_pid,
    run_root,
)

FAKE = Path(__file__).with_name("fake_engine_worker.py")
SAMPLING = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=4, stop_id=None)
MARGIN_S = 3.0  # scheduling slack on a loaded 2-core machine


def fake_engine(mode: str, tmp_path: Path, *, pids: bool = False, request_timeout: float = 60.0,
                start_timeout: float = 60.0, grace_s: float = 1.0, log: bool = True, argv=None) -> VLLMEngine:
    worker = argv or [sys.executable, str(FAKE), mode, *([str(tmp_path / "pids")] if pids else [])]
    return VLLMEngine(VLLMConfig(request_timeout=request_timeout, start_timeout=start_timeout), "no-model",
                      dtype="float32", max_model_len=64, seed=0, log_path=tmp_path / "engine.log" if log else None,
                      worker=worker, grace_s=grace_s)


def running(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's zombie may wait long for its reaper here)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def gone(*pids: int, within: float = 2.0) -> bool:
    deadline = time.monotonic() + within
    while any(running(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def my_run_dirs() -> list[Path]:
    return sorted(run_root().glob(f"{RUN_PREFIX}{os.getpid()}-*"))


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, UserError), msg  # the CLI prints a UserError as one line
    return msg


@pytest.mark.parametrize("how", ["hangs in generate", "is stopped (SIGSTOP)"])
def test_worker_that_stops_answering_times_out_in_one_line(tmp_path, how):
    # a grace period longer than the margin: the error must not wait for it
    engine = fake_engine("hang" if how == "hangs in generate" else "echo", tmp_path, pids=True, request_timeout=2,
                         grace_s=10.0)
    worker, child = map(int, (tmp_path / "pids").read_text().split())
    assert running(worker) and running(child)
    if how == "is stopped (SIGSTOP)":
        os.kill(worker, signal.SIGSTOP)
    t0 = time.monotonic()
    with pytest.raises(EngineError) as e:
        engine.generate([[1, 2, 3]], SAMPLING, [0])
    elapsed = time.monotonic() - t0
    assert 2 <= elapsed < 2 + MARGIN_S, elapsed
    assert "did not answer generate within 2 s (vllm.request_timeout" in one_line(e)
    assert gone(worker, child)  # the hung worker and what it started are stopped with the error
    with pytest.raises(EngineError, match="stopped after an error; it cannot generate"):
        engine.generate([[1]], SAMPLING, [0])  # not a second wait on a dead stream
    engine.close()
    assert not engine.run_dir.exists()


def test_close_ends_the_whole_group_of_a_worker_that_ignores_stop_and_sigterm(tmp_path):
    engine = fake_engine("deaf", tmp_path, pids=True, grace_s=1.0)
    worker, child = map(int, (tmp_path / "pids").read_text().split())
    assert engine.generate([[1, 2, 3]], SAMPLING, [0])[0] == [[3, 2, 1]]  # alive and answering until the stop
    t0 = time.monotonic()
    engine.close()  # stop unanswered (1 s), SIGTERM ignored (1 s), then SIGKILL to the group
    elapsed = time.monotonic() - t0
    assert 2 <= elapsed < 2 + MARGIN_S, elapsed
    assert gone(worker, child, within=1.0)
    assert not engine.run_dir.exists()
    engine.close()  # a second close does nothing


def test_worker_that_dies_is_reported_with_its_last_log_lines(tmp_path):
    engine = fake_engine("die", tmp_path, log=False)
    t0 = time.monotonic()
    with pytest.raises(EngineError) as e:
        engine.generate([[1, 2, 3]], SAMPLING, [0])
    assert time.monotonic() - t0 < MARGIN_S  # seen at once, not after vllm.request_timeout (60 s)
    msg = one_line(e)
    assert "died during generate (exit code 3; last log lines:" in msg
    assert "RuntimeError: CUDA out of memory (fake engine)" in msg
    engine.close()
    assert engine.log_path.exists() and str(engine.log_path) in msg  # a failed engine's temporary log is kept
    assert "CUDA out of memory" in engine.log_path.read_text()
    shutil.rmtree(engine.log_path.parent)


def test_worker_that_exits_or_hangs_at_start(tmp_path):
    crash = [sys.executable, "-c", "import sys; print('ImportError: No module named vllm'); sys.exit(1)"]
    with pytest.raises(EngineError) as e:
        fake_engine("", tmp_path, argv=crash)
    assert "exited at start (exit code 1; last log lines: ImportError: No module named vllm)" in one_line(e)
    t0 = time.monotonic()
    with pytest.raises(EngineError) as e:
        fake_engine("", tmp_path, argv=[sys.executable, "-c", "import time; time.sleep(60)"], start_timeout=1.5)
    assert time.monotonic() - t0 < 1.5 + MARGIN_S
    assert "did not answer start within 1.5 s (vllm.start_timeout" in one_line(e)
    assert my_run_dirs() == []  # nothing left of either


def test_a_clean_close_removes_the_temporary_log_and_the_worker_gets_no_telemetry(tmp_path):
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    engine = fake_engine("echo", tmp_path, log=False)
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # SIGTERM now reaches close()
    log = engine.log_path
    assert log.parent.name.startswith(f"{RUN_PREFIX}log-") and log.exists()
    assert "VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1" in log.read_text()
    engine.close()
    assert not log.parent.exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # as it was


def test_other_local_connections_neither_block_nor_impersonate_the_worker(tmp_path):
    """The worker (`slow`) connects after 2 s; before it, one process connects and stays silent, one sends
    a wrong token, one sends garbage. The engine takes the worker's connection alone, drops the others
    without a word, and the socket is gone once the worker is in."""
    strangers: dict[str, socket.socket] = {}

    def connect_first():
        deadline = time.monotonic() + 10
        while not (paths := list(run_root().glob(f"{RUN_PREFIX}{os.getpid()}-*/engine.sock"))):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for name, payload in (("silent", b""), ("wrong token", bytes(32)), ("garbage", b"x" * 1000)):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(paths[0]))
            s.sendall(payload)
            strangers[name] = s

    thread = threading.Thread(target=connect_first)
    thread.start()
    engine = fake_engine("slow", tmp_path)
    thread.join()
    try:
        assert set(strangers) == {"silent", "wrong token", "garbage"}  # all were in before the worker
        assert engine.start_seconds >= 2
        assert engine.generate([[5, 6, 7], [8]], SAMPLING, [0, 1]) == ([[7, 6, 5], [8]], [[-1.0] * 3, [-1.0]])
        for name, s in strangers.items():
            s.settimeout(5)
            try:
                got = s.recv(100)
            except ConnectionResetError:
                got = b""
            assert got == b"", name  # closed, never spoken to
        assert not (engine.run_dir / "engine.sock").exists()
        assert engine.run_dir.stat().st_mode & 0o777 == 0o700
    finally:
        engine.close()
        for s in strangers.values():
            s.close()


def test_private_folder_removed_on_close_and_stale_folders_of_dead_processes_swept(tmp_path):
    root = run_root()
    dead_pid = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_pid.wait()
    stale = root / f"{RUN_PREFIX}{dead_pid.pid}-test{os.getpid()}"
    stale.mkdir(mode=0o700)
    (stale / "weights.safetensors").write_bytes(bytes(1024))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    live = root / f"{RUN_PREFIX}{sleeper.pid}-test{os.getpid()}"
    live.mkdir(mode=0o700)
    try:
        engine = fake_engine("echo", tmp_path)
        assert not stale.exists()  # its process is gone: removed
        assert live.exists()  # its process runs: left alone
        run_dir = engine.run_dir
        assert run_dir.parent == root and owner_pid(run_dir) == os.getpid()
        assert run_dir.stat().st_mode & 0o777 == 0o700 and run_dir.stat().st_uid == os.getuid()
        assert engine.weights_file.parent == run_dir and engine.adapter_root.parent == run_dir
        engine.weights_file.write_bytes(bytes(1024))  # as the trainer does for full fine-tuning
        (engine.adapter_root / "v0").mkdir(parents=True)
        engine.close()
        assert not run_dir.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
        for path in (stale, live):
            if path.exists():
                path.rmdir()


TRAINER = """
import sys, time
from rlhf.generation.vllm_engine import Sampling, VLLMConfig, VLLMEngine
engine = VLLMEngine(VLLMConfig(), "no-model", dtype="float32", max_model_len=64, seed=0, log_path=sys.argv[1],
                    worker=[sys.executable, sys.argv[2], "hang", sys.argv[3]])
try:
    print(engine.run_dir, flush=True)
    engine.generate([[1, 2, 3]], Sampling(1.0, 1.0, 4, None), [0])
finally:
    engine.close()
"""


def start_trainer(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", TRAINER, str(tmp_path / "engine.log"), str(FAKE),
                             str(tmp_path / "pids")], env=env, stdout=subprocess.PIPE, text=True)
    run_dir = Path(proc.stdout.readline().strip())
    worker, child = map(int, (tmp_path / "pids").read_text().split())
    time.sleep(0.5)  # into generate
    return proc, run_dir, worker, child


def test_sigterm_to_the_trainer_closes_the_engine(tmp_path):
    proc, run_dir, worker, child = start_trainer(tmp_path)
    assert run_dir.is_dir() and running(worker) and running(child)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 128 + signal.SIGTERM  # SystemExit: the finally ran
    assert gone(worker, child) and not run_dir.exists()


def test_killed_trainer_takes_its_engine_along_and_the_next_start_removes_its_folder(tmp_path):
    proc, run_dir, worker, child = start_trainer(tmp_path)
    proc.kill()
    proc.wait()
    assert gone(worker, child, within=5.0)  # the worker saw its parent go and killed its group
    assert run_dir.is_dir()  # nothing could remove it: the next start does
    engine = fake_engine("echo", tmp_path / "next")
    assert not run_dir.exists()
    engine.close()


def test_request_timeout_is_checked_like_every_field():
    from rlhf.validate import validate

    with pytest.raises(UserError, match="request_timeout"):
        validate(VLLMConfig(request_timeout=0))
    validate(VLLMConfig(request_timeout=0.5))


def _node_weights_file(rank: int, local_ranks: tuple, init_file: str, out: str) -> None:
    from types import SimpleNamespace

    import torch.distributed as dist

    from rlhf.generation.vllm_engine import node_weights_file

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(local_ranks))
    engine = SimpleNamespace(weights_file=Path(f"/dev/shm/engine-of-rank-{rank}/weights.safetensors"))
    accelerator = SimpleNamespace(process_index=rank, local_process_index=local_ranks[rank])
    Path(out, str(rank)).write_text(str(node_weights_file(engine, accelerator)))
    dist.destroy_process_group()


@pytest.mark.parametrize("local_ranks, writer", [((0, 1), (0, 0)), ((0, 0), (0, 1))], ids=["one node", "two nodes"])
def test_every_process_reads_the_weights_its_nodes_main_process_writes(tmp_path, local_ranks, writer):
    import torch.multiprocessing as mp

    mp.spawn(_node_weights_file, args=(local_ranks, str(tmp_path / "init"), str(tmp_path)), nprocs=len(local_ranks))
    for rank, w in enumerate(writer):
        assert (tmp_path / str(rank)).read_text() == f"/dev/shm/engine-of-rank-{w}/weights.safetensors"


def test_a_built_vllm_environment_is_found():
    """The README's test command builds `.venv-vllm` before pytest: then the vLLM tests must find it and run,
    not skip (a path that moved with the code once made them skip silently)."""
    from conftest import REPO

    from rlhf.generation.vllm_engine import available

    built = REPO / ".venv-vllm" / "bin" / "python"
    if not built.exists() and not os.environ.get("RLHF_VLLM_PYTHON"):
        pytest.skip("no vLLM environment here (the README's test command creates .venv-vllm)")
    assert available() is not None, f"{built} exists but the engine does not find a vLLM Python"
