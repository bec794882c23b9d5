"""Where a command writes: checked before anything is written, and left as it was when the user's
input turns out wrong half-way (a data row, a reward function, a token that is not in the vocabulary).

- `check_output_dir` / `check_output_file`: the output is not an existing file (a directory's case) or
  directory (a file's case), its nearest existing parent is writable, and it is not inside an input.
- `user_run(output_dir)`: a context for a stage's whole run. When the directory did not exist before the
  run and a user error stops it, the directory is removed again, so a refused run leaves nothing behind.
  A directory that existed (a resumed or extended run) is never removed.
"""

from __future__ import annotations

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
def user_run(output_dir: str | os.PathLike, option: str = "output_dir", inputs: tuple = ()):
    """Check `output_dir`, run the block; on a user error, remove the directory if this run created it."""
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


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
