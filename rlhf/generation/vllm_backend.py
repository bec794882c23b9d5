"""`VLLMBackend`: the vLLM engine client (rlhf/generation/vllm_engine.py) behind the generation interface
of rlhf/generation/engine.py. It turns the engine's token lists into a `GenerationResult`, derives each
request's seed, hands the policy's weights over (`update_weights`), and lets a GPU engine sleep while the
trainer runs."""

from __future__ import annotations

import shutil
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable, Optional

import torch

from policies.models import read_json
from rlhf.generation.engine import GenerationResult, finish
from rlhf.generation.prompts import left_pad
from rlhf.generation.sampling import Sampling
from rlhf.generation.vllm_engine import (
    EngineError,
    VLLMConfig,
    VLLMEngine,
    node_weights_file,
    pad_responses,
    request_seeds,
    write_adapter,
    write_full_weights,
)


class VLLMBackend:
    """One vLLM engine (`client`) for this process. `open_policy()` gives the trained policy, for the
    duration of a weight sync (a PeftModel whose active adapter is served, or a full causal LM); None: the
    engine serves fixed weights. Without a seed, request i of weights version v samples with a seed that
    is a function of (`seed`, v, `rank`, i): a resumed run samples what the straight run sampled."""

    def __init__(self, client: VLLMEngine, pad_id: int, device: Optional[torch.device], *, seed: int, rank: int = 0,
                 open_policy: Optional[Callable[[], AbstractContextManager]] = None,
                 weights_file: Optional[Path] = None, local_main: bool = True):
        self.client, self.pad_id, self.device = client, pad_id, device
        self.seed, self.rank, self.version = seed, rank, 0
        self.open_policy, self.weights_file, self.local_main = open_policy, weights_file, local_main

    def generate(self, prompts: list[list[int]], sampling: Sampling, seed: Optional[int] = None) -> GenerationResult:
        seeds = request_seeds(self.seed, self.version, self.rank, len(prompts)) if seed is None \
            else request_seeds(seed, 0, 0, len(prompts))
        self.client.wake_up()
        tokens, logprobs = self.client.generate(prompts, sampling, seeds)
        self.client.sleep()
        responses, logprobs = pad_responses(tokens, logprobs, self.pad_id, self.device)  # (B, A), (B, A)
        ids, mask = left_pad(prompts, self.pad_id)
        return finish(ids.to(self.device), mask.to(self.device), responses, logprobs, sampling.stop_id, self.pad_id)

    def update_weights(self, version: int) -> None:
        """The policy adapter alone (LoRA), or the full weights written once per node and loaded by every
        process's engine (full; gathered under ZeRO-3 by `open_policy`)."""
        from rlhf.runtime.distributed import barrier

        self.client.wake_up()
        with self.open_policy() as policy:
            if self.client.lora_rank is not None:
                adapter = write_adapter(policy, policy.active_adapter, self.client.adapter_root / f"v{version}")
                self.client.set_adapter(str(adapter), version)
                stale = self.client.adapter_root / f"v{version - 2}"  # the one before the previous: not served
                shutil.rmtree(stale, ignore_errors=True)
            elif self.local_main:
                write_full_weights(policy, self.weights_file)
        if self.client.lora_rank is None:
            barrier()
            self.client.load_weights(str(self.weights_file))
            barrier()  # every engine has read the file before it is overwritten
        self.client.sleep()
        self.version = version

    def close(self) -> None:
        self.client.close()  # also removes the engine's private folder, with the weights file in it

    @property
    def description(self) -> str:
        return f"vLLM engine started in {self.client.start_seconds:.1f} s (log: {self.client.log_path})"


def start_for_training(cfg: VLLMConfig, base_path: str, *, dtype: str, max_model_len: int, lora_rank: Optional[int],
                       max_num_seqs: int, log_path: Path, device: torch.device, engine_seed: int,
                       seed: int, accelerator, pad_id: int,
                       open_policy: Callable[[], AbstractContextManager]) -> VLLMBackend:
    """An engine serving a trainer's policy: its base (LoRA, adapters handed over) or its initial weights (full).
    `engine_seed`: the engine's own; `seed`: the run's, from which each request's seed is derived."""
    client = VLLMEngine(cfg, base_path, dtype=dtype, seed=engine_seed, max_model_len=max_model_len, lora_rank=lora_rank,
                        log_path=log_path, max_num_seqs=max_num_seqs, device=device, threads=torch.get_num_threads())
    return VLLMBackend(client, pad_id, device, seed=seed, rank=accelerator.process_index, open_policy=open_policy,
                       weights_file=node_weights_file(client, accelerator),
                       local_main=accelerator.is_local_main_process)


def serve(path: str, cfg: VLLMConfig, *, max_model_len: int, seed: int, pad_id: int) -> VLLMBackend:
    """An engine serving the model at `path` (a model directory or hub id; a peft LoRA adapter directory is
    served as an adapter on its base), for the commands that sample a saved model."""
    adapter_cfg = Path(path) / "adapter_config.json"
    lora, base = None, path
    if adapter_cfg.exists():
        info = read_json(adapter_cfg)  # one line naming the file if it is malformed
        if info.get("peft_type") != "LORA":
            raise EngineError(f"{path}: vLLM serves LoRA adapters only, not {info.get('peft_type')}; merge it first "
                              "(rlhf merge) or use --engine hf")
        lora, base = info.get("r", 16), info["base_model_name_or_path"]
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    client = VLLMEngine(cfg, base, dtype=dtype, seed=seed, lora_rank=lora, max_model_len=max_model_len,
                        device=torch.device("cuda") if torch.cuda.is_available() else None,
                        threads=torch.get_num_threads())
    if lora is not None:
        client.set_adapter(str(Path(path).resolve()), 0)
    return VLLMBackend(client, pad_id, None, seed=seed)
