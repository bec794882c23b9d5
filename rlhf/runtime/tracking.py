"""Weights & Biases set-up shared by every stage.

Without a W&B login the run goes offline (a `wandb/offline-run-*` folder under the output directory)
and we say how to upload it. The API key is never printed or logged: only its presence is checked.
"""

from __future__ import annotations

import netrc
import os
import uuid
from pathlib import Path

from rlhf.config import TrackingConfig

RUN_ID_FILE = "wandb_run_id"


def _logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def start(cfg: TrackingConfig, config: dict, output_dir: str, is_main: bool = True):
    """Start (or resume) the W&B run of this output directory; None when tracking is off.

    The run id is kept in `output_dir/wandb_run_id`, so a resumed training continues the same run.
    """
    if cfg.report_to != "wandb" or not is_main:
        return None
    import wandb

    if not _logged_in() and os.environ.get("WANDB_MODE") not in ("offline", "disabled"):
        os.environ["WANDB_MODE"] = "offline"
        print("W&B: no login found (WANDB_API_KEY or `wandb login`), logging offline.")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    id_file = out / RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
    run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.run_name or out.resolve().name,
                     group=cfg.group, tags=cfg.tags or None, config=config, dir=str(out), id=run_id,
                     resume="allow")
    id_file.write_text(run_id)
    return run


def finish(run) -> None:
    if run is None:
        return
    offline = run.settings.mode == "offline" or os.environ.get("WANDB_MODE") == "offline"
    run_dir = Path(run.dir).parent
    run.finish()
    if offline:
        print(f"W&B: offline run saved in {run_dir}; upload it with `wandb sync {run_dir}`")
