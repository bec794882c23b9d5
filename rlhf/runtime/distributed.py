"""Process set-up shared by every stage: the ones that own their loop (PPO, `make_accelerator`) and the
ones on the HF Trainer (SFT, reward, classifier: `init_processes`)."""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from rlhf.errors import UserError


def make_accelerator(gradient_accumulation_steps: int = 1, mixed_precision: str | None = None,
                     cpu_threads: int | None = None):
    """An Accelerator that sees every launched process, or a clear refusal.

    Without CUDA, the process group must be created with gloo before the Accelerator, else DeepSpeed
    runs world size 2 inside while accelerate believes it is alone (../shared/docs/environment.md).
    """
    from accelerate import Accelerator, PartialState

    if (int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
            and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true"):
        # DDP on CPUs: accelerate must know it is MULTI_CPU (gloo), or it neither wraps the model in DDP
        # (no gradient all-reduce: each process trains alone) nor gathers (every metric is rank 0's)
        PartialState(cpu=True)
    world = _cpu_process_group()
    set_cpu_threads(cpu_threads)
    if mixed_precision is None:
        mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    acc = Accelerator(gradient_accumulation_steps=gradient_accumulation_steps, mixed_precision=mixed_precision)
    check_world_size(world, acc.num_processes)
    return acc


def init_processes() -> int:
    """For the Trainer stages, before anything is loaded: the process group (gloo without CUDA), so ranks
    can wait for each other while rank 0 writes shared files, and a clear refusal of a mis-launch.
    Returns the number of processes. TrainingArguments later rebuilds the process state with
    `ddp_backend()`; the group made here is the one it finds."""
    from accelerate import PartialState

    world = _cpu_process_group()
    if world > 1:
        check_world_size(world, PartialState().num_processes)
    return world


def ddp_backend() -> str | None:
    """TrainingArguments.ddp_backend: gloo for several processes without CUDA. (TrainingArguments resets
    the process state that `init_processes` made and builds its own from this.)"""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return "gloo" if world > 1 and not torch.cuda.is_available() else None


def barrier() -> None:
    """Wait for every process (nothing to wait for when there is one). See main_process_first on why torch's."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_ranks(obj) -> list:
    """`obj` of every process, by rank ([obj] with one process). torch's collective, not accelerate's
    gather_object: see main_process_first on why."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


@contextmanager
def main_process_first():
    """Rank 0 runs the block first (it writes files every rank reads: the built-in tiny base, a merged
    SFT adapter), the other ranks after it, finding them written."""
    # torch's barrier, not accelerate's: a CPU launch with ACCELERATE_USE_CPU gives a PartialState of 2
    # processes whose distributed_type is NO, and its wait_for_everyone then waits for nobody (measured).
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        yield
        return
    first = dist.get_rank() == 0
    if not first:
        dist.barrier()
    yield
    if first:
        dist.barrier()


def _cpu_process_group() -> int:
    """WORLD_SIZE; when above 1 without CUDA, the gloo process group is created now (environment.md)."""
    from accelerate import PartialState

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.cuda.is_available():
        PartialState(backend="gloo")
        set_cpu_threads(None)
    return world


def set_cpu_threads(n: int | None) -> int:
    """Fix torch's intra-op thread count and return it: `n`, else the policy of `rlhf.runtime.threads`
    (the cores this process may use, shared between the local processes, unless OMP_NUM_THREADS says
    otherwise; kept as the `rlhf` command set it, adapting, when it did). Each process would otherwise take
    one OpenMP thread per core: N processes oversubscribe the CPU (measured: up to 100x slower PPO steps)."""
    from rlhf.runtime import threads

    return threads.set_threads(n, adapt=False)  # adapting starts only with a command (rlhf/cli.py)


def check_world_size(world_size_env: int, num_processes: int) -> None:
    """Refuse a launch where the launcher and accelerate disagree on the number of processes: data
    would not be sharded and every metric would be wrong."""
    if world_size_env != num_processes:
        raise UserError(f"launch mismatch: WORLD_SIZE={world_size_env} but accelerate sees {num_processes} "
                        "process(es); on CPU use `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu "
                        "--num_processes N` (plain `--cpu --num_processes N` starts one process)")
