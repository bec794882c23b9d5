"""Where a command writes: checked before anything is written, and left as it was when the user's
input turns out wrong half-way (a data row, a reward function, a token that is not in the vocabulary).

- `check_output_dir` / `check_output_file`: the output is not an existing file (a directory's case) or
  directory (a file's case), its nearest existing parent is writable, and it is not inside an input.
- `user_run(output_dir)`: a context for a stage's whole run. When the directory did not exist before the
  run and a user error stops it, the directory is removed again, so a refused run leaves nothing behind.
  A directory that existed (a resumed or extended run) is never removed. A full disk ends the run in one
  line naming what was being written and the last complete checkpoint to `--resume latest` from.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from rlhf.errors import UserError


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(path: str | os.PathLike, option: str = "output_dir", inputs: tuple = ()) -> None:
    """Refuse (creating nothing) an output directory that cannot be one."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{option} '{path}' is an existing file; expected a directory (new or existing)")
    parent = _nearest_existing(p)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{option} '{path}' cannot be written: '{parent}' is not a writable directory")
    for src in inputs:
        if src and Path(src).exists() and Path(src).is_dir():
            s, o = Path(src).resolve(), p.absolute().resolve()
            if o == s or s in o.parents:
                raise UserError(f"{option} '{path}' is inside the input '{src}'; choose a directory outside it")


def check_output_file(path: str | os.PathLike, option: str = "output") -> None:
    """Refuse (creating nothing) an output file path that is a directory or cannot be written."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{option} '{path}' is a directory; expected a file path")
    parent = _nearest_existing(p.parent)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{option} '{path}' cannot be written: '{parent}' is not a writable directory")


@contextmanager
def user_run(output_dir: str | os.PathLike, option: str = "output_dir", inputs: tuple = (),
             marker: str = "trainer_state.json"):
    """Check `output_dir`, run the block; on a user error, remove the directory if this run created it.
    A full disk is one line too (`_disk_full`), and never removes a complete checkpoint (one whose
    `marker` file was written)."""
    from policies.models import ModelLoadError
    from reward.errors import RewardError

    check_output_dir(output_dir, option, inputs)
    existed = Path(output_dir).exists()
    try:
        yield
    except (UserError, ModelLoadError, RewardError):
        if not existed and _is_main_process():
            shutil.rmtree(output_dir, ignore_errors=True)
        raise
    except Exception as e:
        if not _out_of_space(e, output_dir):
            raise
        raise _disk_full(e, Path(output_dir), existed, marker) from None


# A full disk (or quota) while a run writes: the writers say so in their own ways. An OSError has the errno;
# safetensors' SafetensorError carries "No space left on device (os error 28)"; torch.save (optimizer states)
# says only "basic_ios::clear: iostream error" / "unexpected pos ... vs ...", so the free space decides.
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")
_WRITE_ERRORS = ("OSError", "RuntimeError", "SafetensorError")  # what the writers raise on a failed write
_FREE_BYTES_FULL = 1 << 20  # less than this left: the disk counts as full


def _out_of_space(e: BaseException, output_dir: str | os.PathLike) -> bool:
    """Whether `e` (or an exception it came from) is a write that failed for want of space."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    if any(isinstance(x, OSError) and x.errno in _NO_SPACE_ERRNOS for x in chain):
        return True
    if any(text in str(x) for x in chain for text in _NO_SPACE_TEXT):
        return True
    if not any(type(x).__name__ in _WRITE_ERRORS for x in chain):
        return False
    try:
        return shutil.disk_usage(_nearest_existing(Path(output_dir))).free < _FREE_BYTES_FULL
    except OSError:
        return False


def _disk_full(e: BaseException, out: Path, existed: bool, marker: str) -> UserError:
    """The one-line error for a full disk; our own half-written temporary folders are removed (they only
    hold space), complete checkpoints are kept, and a new output directory without one is removed."""
    from rlhf.runtime.checkpoints import complete_checkpoints

    done = complete_checkpoints(out, marker)
    path = _newest_partial(out, marker) or getattr(e, "filename", None) or out  # a checkpoint by its final name
    cause = " ".join((str(e).strip().splitlines() or [type(e).__name__])[0].split())[:200]
    if _is_main_process():
        for tmp in out.glob(".*.tmp"):  # .checkpoint-N.tmp, .final.tmp, .export.tmp: never complete
            shutil.rmtree(tmp, ignore_errors=True)
        if not done and not existed:
            shutil.rmtree(out, ignore_errors=True)
    then = (f"the last complete checkpoint, {done[-1]}, is intact: free some space and continue with "
            "`--resume latest`" if done else "no checkpoint was complete yet: free some space and run again")
    return UserError(f"writing {path} failed: the disk is full ({type(e).__name__}: {cause}); {then}")


def _newest_partial(out: Path, marker: str) -> Path | None:
    """The checkpoint being written when the disk filled: the newest folder without its marker
    (`checkpoint-N` of the HF Trainer, or our `.checkpoint-N.tmp`), named as it would have been."""
    steps = []
    for p in out.glob("*checkpoint-*"):
        name = p.name.removeprefix(".").removesuffix(".tmp")
        if p.is_dir() and name.removeprefix("checkpoint-").isdigit() and not (p / marker).exists():
            steps.append((int(name.removeprefix("checkpoint-")), out / name))
    return max(steps)[1] if steps else None


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
