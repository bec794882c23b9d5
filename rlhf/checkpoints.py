"""Find and write checkpoints safely."""

from __future__ import annotations

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
    """`latest` -> newest complete checkpoint in output_dir; a path -> that checkpoint; None -> None."""
    if resume is None:
        return None
    if resume == "latest":
        ckpts = complete_checkpoints(output_dir, marker)
        if not ckpts:
            raise UserError(f"--resume latest: no complete checkpoint in '{output_dir}'")
        return str(ckpts[-1])
    if not (Path(resume) / marker).exists():
        raise UserError(f"--resume '{resume}' is not a complete checkpoint directory (no {marker})")
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
