"""Process set-up shared by the stages that own their loop (PPO)."""

from __future__ import annotations

import os

import torch

from rlhf.errors import UserError


def make_accelerator(gradient_accumulation_steps: int = 1, mixed_precision: str | None = None):
    """An Accelerator that sees every launched process, or a clear refusal.

    Without CUDA, the process group must be created with gloo before the Accelerator, else DeepSpeed
    runs world size 2 inside while accelerate believes it is alone (../shared/docs/environment.md).
    """
    from accelerate import Accelerator, PartialState

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.cuda.is_available():
        PartialState(backend="gloo")
        # Each process defaults to one OpenMP thread per core: N processes on a CPU oversubscribe it
        # (measured: up to 100x slower PPO steps). Share the cores instead.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    if mixed_precision is None:
        mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    acc = Accelerator(gradient_accumulation_steps=gradient_accumulation_steps, mixed_precision=mixed_precision)
    check_world_size(world, acc.num_processes)
    return acc


def check_world_size(world_size_env: int, num_processes: int) -> None:
    """Refuse a launch where the launcher and accelerate disagree on the number of processes: data
    would not be sharded and every metric would be wrong."""
    if world_size_env != num_processes:
        raise UserError(f"launch mismatch: WORLD_SIZE={world_size_env} but accelerate sees {num_processes} "
                        "process(es); on CPU use `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu "
                        "--num_processes N` (plain `--cpu --num_processes N` starts one process)")
