"""Find and write checkpoints safely."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from rlhf.errors import UserError

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def complete_checkpoints(output_dir: str | Path, marker: str = "trainer_state.json") -> list[Path]:
    """Checkpoint dirs that were written to the end (their `marker` file is written last), oldest first.

    A run killed while saving leaves a checkpoint without its marker; it is skipped, so resuming
    falls back to the previous whole one.
    """
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _CKPT.match(p.name)) and (p / marker).exists()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str | None, output_dir: str | Path, marker: str = "trainer_state.json") -> str | None:
    """`latest` -> newest complete checkpoint in output_dir; a path -> that checkpoint; None -> None.
    The checkpoint is checked for pickles that could run code (`refuse_unsafe_pickles`) before anything
    reads it or the run writes anything."""
    if resume is None:
        return None
    if resume == "latest":
        ckpts = complete_checkpoints(output_dir, marker)
        if not ckpts:
            raise UserError(f"--resume latest: no complete checkpoint in '{output_dir}'")
        resume = str(ckpts[-1])
    elif not (Path(resume) / marker).exists():
        raise UserError(f"--resume '{resume}' is not a complete checkpoint directory (no {marker})")
    from policies.models import check_json_files

    refuse_unsafe_pickles(resume)
    check_json_files(resume, UserError)  # trainer_state.json, ppo_state.json, ...: one line naming file and line
    return resume


def publish_dir(tmp_dir: str | Path, out_dir: str | Path) -> None:
    """Move every file of `tmp_dir` into `out_dir`, each with an atomic rename, then remove tmp_dir.

    The files are written completely in tmp_dir (same filesystem) first, so `out_dir` never holds a
    half-written weight file.
    """
    tmp_dir, out_dir = Path(tmp_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for src in tmp_dir.rglob("*"):
        if src.is_file():
            dst = out_dir / src.relative_to(tmp_dir)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
    shutil.rmtree(tmp_dir)


# ---------------------------------------------------------------------------------------------
# Nothing in a checkpoint may run code when it is read.
#
# A pickle can name any Python callable to rebuild an object, so unpickling a file from a checkpoint
# someone else made (a shared run, a downloaded one) can run arbitrary code. Our own state is JSON and
# safetensors (PPO: ppo_state.json with the scheduler, KL controller, reward statistics and data position;
# rng_state_{rank}.safetensors/.json). What accelerate, DeepSpeed and the HF Trainer still write with
# torch.save (optimizer states, DeepSpeed's model states) is checked with torch's restricted unpickler
# (`weights_only=True`: tensors, numbers, strings and plain containers only) before anything loads it.

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")
NEVER_LOADED = ("training_args.bin",)  # the HF Trainer writes it for the record; resuming never reads it


def refuse_unsafe_pickles(checkpoint_dir: str | Path) -> None:
    """Raise UserError unless every pickle-format file under `checkpoint_dir` holds only tensors and plain
    data. `custom_checkpoint_*.pkl` (accelerate's pickled custom objects) is refused outright."""
    import torch

    for f in sorted(Path(checkpoint_dir).rglob("*")):
        if not f.is_file() or f.suffix not in PICKLE_SUFFIXES or f.name in NEVER_LOADED:
            continue
        if f.name.startswith("custom_checkpoint_"):
            raise UserError(f"checkpoint file '{f}' is a pickled Python object; loading it could run code, so "
                            "it is refused (checkpoints written by this version keep that state in JSON)")
        try:
            with _trusted_plain_globals():
                torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # an UnpicklingError names the global that is not allowed
            reason = str(e).strip().splitlines()
            reason = next((line for line in reason if "GLOBAL" in line or "global" in line), reason[0] if reason else "")
            raise UserError(f"checkpoint file '{f}' holds Python objects other than tensors and plain data "
                            f"({reason[:200]}); loading it could run code, so it is refused") from None


def _trusted_plain_globals():
    """The few non-tensor types our own checkpoints contain, allowed by name to torch's restricted
    unpickler. Each is plain data rebuilt without running user code: numpy arrays and dtypes (the HF
    Trainer's rng_state.pth holds numpy's RNG state) and DeepSpeed's enum-like config values."""
    import torch

    allowed = []
    try:
        import numpy as np

        try:
            from numpy._core.multiarray import _reconstruct  # numpy 2 (numpy.core warns there)
        except ImportError:
            from numpy.core.multiarray import _reconstruct  # numpy 1
        # the array's dtype class is what torch's unpickler asks for by name (UInt32DType: numpy's RNG keys)
        allowed += [_reconstruct, np.ndarray, np.dtype, type(np.dtype("uint32"))]
    except ImportError:
        pass
    try:  # DeepSpeed's optimizer states name these plain classes (a loss-scale record, an enum, a tuple)
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed += [LossScaler, ZeroStageEnum, fragment_address]
    except ImportError:
        pass
    return torch.serialization.safe_globals(allowed)


def save_rng_state(directory: str | Path, rank: int) -> None:
    """This process's random generators as safetensors (torch CPU and CUDA states) + JSON (Python's and
    numpy's), in place of accelerate's pickled random_states_{rank}.pkl (which is removed)."""
    import random

    import numpy as np
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    save_file(tensors, directory / f"rng_state_{rank}.safetensors")
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    (directory / f"rng_state_{rank}.json").write_text(json.dumps({
        "python": [version, list(state), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}))
    (directory / f"random_states_{rank}.pkl").unlink(missing_ok=True)


def load_rng_state(directory: str | Path, rank: int) -> None:
    import random

    import numpy as np
    import torch
    from safetensors.torch import load_file

    directory = Path(directory)
    tensors = load_file(directory / f"rng_state_{rank}.safetensors")
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["cuda"]))
    state = json.loads((directory / f"rng_state_{rank}.json").read_text())
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
