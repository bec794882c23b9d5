"""Find and write checkpoints safely."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from contextlib import contextmanager
from fnmatch import fnmatch
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
    The checkpoint is checked for links, tags and pickles that could run code (`refuse_unsafe_checkpoint`)
    before anything reads it or the run writes anything."""
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

    check_json_files(resume, UserError)  # trainer_state.json, ppo_state.json, ...: one line naming file and line
    refuse_unsafe_checkpoint(resume)
    _refuse_links_where_the_run_writes(output_dir)
    return resume


def _refuse_links_where_the_run_writes(output_dir: str | Path) -> None:
    """The resumed run writes its next checkpoints into the checkpoint-N folders of output_dir, and the HF
    Trainer writes into one that exists (one a killed run left incomplete, or one planted): a symlink there
    would send those writes outside the run (found by the checkpoint fuzzing)."""
    out = Path(output_dir)
    for folder in sorted(out.iterdir()) if out.is_dir() else []:
        if _CKPT.match(folder.name):
            for path in [folder, *(sorted(_entries(folder)) if not folder.is_symlink() else [])]:
                if path.is_symlink():
                    raise UserError(f"'{_shown(path)}' is a symbolic link -> '{_shown(os.readlink(path))}' where the "
                                    "resumed run writes its checkpoints; expected plain files and folders only")


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
# torch.save (optimizer states, DeepSpeed's model states) is read with torch's restricted unpickler
# (`weights_only=True`: tensors, numbers, strings, plain containers and the allow-list below), twice:
#
# 1. before anything runs or is written (`refuse_unsafe_checkpoint`, from `resolve_resume`), so a bad
#    checkpoint ends in one line. The checkpoint's layout is checked first: the loaders choose what to
#    read by names found inside it (DeepSpeed's `latest` tag file names the folder it loads), and a tag
#    such as `../stash` or a symlinked `global_stepN` would send them to files this scan never saw.
#    So a checkpoint holds plain files and folders only, and a tag names a folder beside it.
# 2. while the stages load it (`tensor_only_loads`, around `trainer.train(resume_from_checkpoint=...)`
#    and `accelerator.load_state`): DeepSpeed calls `torch.load(..., weights_only=False)` on its model and
#    optimizer states; torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD switch makes every torch.load in between use
#    the restricted unpickler whatever the caller asked. The scan and the load then apply one rule, and a
#    file the scan missed still cannot run code.
# torch.distributed checkpoints (FSDP's sharded state) keep their index `.metadata` as a plain pickle read
# with `pickle.load`, which neither switch reaches: they are refused.

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")
NEVER_LOADED = ("training_args.bin",)  # the HF Trainer writes it for the record; resuming never reads it
TAG_FILES = ("latest", "latest_universal")  # DeepSpeed loads the folder these name when not given a tag
_MODEL_STATES = re.compile(r"(zero_pp_rank_\d+_)?mp_rank_00_model_states\.pt")  # DeepSpeed globs mp_rank_*
_FORCE, _NO_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def refuse_unsafe_checkpoint(checkpoint_dir: str | Path) -> None:
    """Raise UserError unless `checkpoint_dir` holds only plain files and folders, each DeepSpeed tag file
    names a checkpoint folder beside it, and every pickle-format file holds only tensors and plain data."""
    root = Path(checkpoint_dir)
    for path in sorted(_entries(root)):
        _check_entry(root, path)
    best = _best_checkpoint(root)
    if best is not None and best.resolve() != root.resolve():
        for path in sorted(_entries(best)):
            _check_entry(best, path)
        refuse_unsafe_pickles(best)
    refuse_unsafe_pickles(root)


def _best_checkpoint(root: Path) -> Path | None:
    """The best checkpoint that the HF Trainer's trainer_state.json names (None if none or gone): the Trainer
    loads it with the same loaders at the end of a run (load_best_model_at_end), so it is checked now rather
    than refused hours later. It may lie elsewhere (a run folder copied to resume on another disk)."""
    state_file = root / "trainer_state.json"
    if not state_file.is_file():
        return None
    try:
        best = json.loads(state_file.read_text()).get("best_model_checkpoint")
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise UserError(f"checkpoint file '{_shown(state_file)}' is not the JSON object the HF Trainer writes") from None
    return Path(best) if isinstance(best, str) and Path(best).is_dir() else None  # the Trainer ignores one that is gone


def _entries(root: Path):
    """Every file and folder under root; a symlinked folder is listed, not entered."""
    for dirpath, dirnames, filenames in os.walk(root):
        yield from (Path(dirpath, name) for name in dirnames + filenames)


def _check_entry(root: Path, path: Path) -> None:
    if path.is_symlink():
        raise UserError(f"checkpoint '{_shown(root)}' holds a symbolic link '{_shown(path)}' -> "
                        f"'{_shown(os.readlink(path))}'; expected "
                        "plain files and folders only (a link lets a loader read outside the checkpoint)")
    if not (path.is_file() or path.is_dir()):
        raise UserError(f"checkpoint '{_shown(root)}' holds '{_shown(path)}', which is neither a file nor a folder; expected "
                        "plain files and folders only")
    if path.name == ".metadata" or path.suffix == ".distcp":
        raise UserError(f"checkpoint file '{_shown(path)}' belongs to a torch.distributed (sharded FSDP) checkpoint, whose "
                        "index is a plain pickle that could run code, so it is refused; save FSDP runs with "
                        "fsdp_state_dict_type: FULL_STATE_DICT to resume them")
    if path.name in TAG_FILES and path.is_file():
        _check_tag(path)
    if fnmatch(path.name, "*mp_rank_*_model_states.pt") and not _MODEL_STATES.fullmatch(path.name):
        raise UserError(f"checkpoint file '{_shown(path)}' is named like DeepSpeed model states of another model-parallel "
                        "rank; DeepSpeed loads every such file of the step folder and fails on a second one (this "
                        "project trains without model parallelism: only mp_rank_00; found by the checkpoint fuzzing)")
    if path.name == "scaler.pt" and path.parent == root and (root / "trainer_state.json").is_file():
        raise UserError(f"checkpoint file '{_shown(path)}' is a GradScaler state (fp16 training), which this "
                        "project's runs never write; the HF Trainer would fail on it without a scaler (found by the "
                        "checkpoint fuzzing)")


def _check_tag(tag_file: Path) -> None:
    """DeepSpeed reads `<dir>/<stripped content of tag_file>`: it must be a folder beside the tag file
    holding DeepSpeed's model states."""
    try:
        tag = tag_file.read_bytes().decode("utf-8").strip()  # as DeepSpeed reads it: text, stripped
    except UnicodeDecodeError:
        tag = None
    folder = tag_file.parent / tag if tag and tag not in (".", "..") and not set("/\\\0") & set(tag) else None
    if folder is None or not folder.is_dir() or not any(folder.glob("*model_states.pt")):
        shown = repr(tag[:60]) if tag is not None else "bytes that are not text"
        raise UserError(f"checkpoint tag file '{_shown(tag_file)}' names {shown}; expected the name of a folder beside it "
                        "that holds DeepSpeed's model states (e.g. global_step100)")


def refuse_unsafe_pickles(checkpoint_dir: str | Path) -> None:
    """Raise UserError unless every pickle-format file under `checkpoint_dir` holds only tensors and plain
    data. `custom_checkpoint_*.pkl` (accelerate's pickled custom objects) is refused outright."""
    import torch

    for f in sorted(_entries(Path(checkpoint_dir))):
        if not f.is_file() or f.suffix not in PICKLE_SUFFIXES or f.name in NEVER_LOADED:
            continue
        if f.name.startswith("custom_checkpoint_"):
            raise UserError(f"checkpoint file '{_shown(f)}' is a pickled Python object; loading it could run code, so "
                            "it is refused (checkpoints written by this version keep that state in JSON)")
        try:
            with _trusted_plain_globals():
                torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  (whatever torch cannot read is refused; an UnpicklingError names the global)
            if "GLOBAL" not in str(e):  # a corrupt file, or a pickle using what the tensor-only unpickler lacks
                raise UserError(f"checkpoint file '{_shown(f)}' cannot be read by torch's tensor-only unpickler "
                                f"({_reason(e)}); loading it otherwise could run code, so it is refused") from None
            raise UserError(f"checkpoint file '{_shown(f)}' holds Python objects other than tensors and plain data "
                            f"({_reason(e)}); loading it could run code, so it is refused") from None


def _reason(e: Exception) -> str:
    """The gist of torch's long message: the global it refused, else its first line."""
    message = str(e)
    found = re.search(r"GLOBAL \S+ was not an allowed global", message) or re.search(
        r"WeightsUnpickler error:\s*(\S.*)", message)
    lines = message.strip().splitlines()
    return _shown(found.group(found.lastindex or 0) if found else lines[0].strip() if lines else type(e).__name__)[:200]


def _shown(text: object) -> str:
    """A path or name for a one-line message: control characters (a newline in a file name) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


@contextmanager
def tensor_only_loads(checkpoint_dir: str | Path | None):
    """Around the code that resumes from `checkpoint_dir` (None: nothing to guard): every torch.load in
    between uses the restricted unpickler with the allow-list, whatever weights_only its caller passed
    (DeepSpeed passes False). A refused pickle ends in UserError."""
    if checkpoint_dir is None:
        yield
        return
    saved = {k: os.environ.pop(k, None) for k in (_FORCE, _NO_FORCE)}  # both set is an error in torch
    os.environ[_FORCE] = "1"
    try:
        with _trusted_plain_globals():
            yield
    except pickle.UnpicklingError as e:
        raise UserError(f"checkpoint '{_shown(checkpoint_dir)}': a file read on resume is refused by torch's "
                        f"tensor-only unpickler ({_reason(e)}); a checkpoint may hold tensors and plain data only, "
                        "anything else could run code") from None
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


def _trusted_plain_globals():
    """The few non-tensor types our own checkpoints contain, allowed by name to torch's restricted
    unpickler. Each is plain data rebuilt without running user code: numpy arrays and dtypes (the HF
    Trainer's rng_state.pth holds numpy's RNG state) and DeepSpeed's enum-like config values. Found by
    saving SFT and PPO checkpoints under ZeRO-2 and ZeRO-3 and listing their globals
    (torch.serialization.get_unsafe_globals_in_checkpoint): the model states hold none, the optimizer
    states these three."""
    import torch

    allowed = []
    try:
        import numpy as np

        try:
            from numpy._core.multiarray import (
                _reconstruct,  # numpy 2 (numpy.core warns there)
            )
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
