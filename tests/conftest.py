import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data" / "real"
sys.path.insert(0, str(Path(__file__).parent))  # test helpers (wandb_log)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and several processes (2-rank runs, subprocesses)
# each spinning 2 OpenMP threads on 2 cores run up to 100x slower (measured on PPO steps).
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


class RunsACommand:
    """Unpickling this runs `touch MARKER`, as a crafted checkpoint or weights file would run anything."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def real_file(name: str) -> Path:
    """A real data sample from ../shared/data/real/, or skip (users' clones do not have it)."""
    path = REAL_DATA / name
    if not path.exists():
        pytest.skip(f"real data sample {name} not found under {REAL_DATA} (only in the development checkout)")
    return path


def sft_config(tmp_path, *args: str):
    """A fast tiny SFT config (built the way the CLI builds it) with extra `--section.field value` args."""
    from rlhf import config

    base = ["--config", str(REPO / "configs" / "sft_tiny.yaml"), "--output_dir", str(tmp_path / "out"),
            "--train.max_steps", "6", "--train.eval_steps", "3", "--train.logging_steps", "1",
            "--data.max_samples", "96", "--train.per_device_train_batch_size", "8",
            "--peft.method", "lora", "--train.warmup_steps", "0"]
    return config.parse(config.SFTConfig, base + list(args), "rlhf sft")


# The suite runs on both cores (`-n 2` in pyproject's addopts, pytest-xdist). Tests that start several
# processes (accelerate launches, the vLLM engine) go to one worker, one at a time: they each want both
# cores, and accelerate's launches share its default port (29500).
MULTIPROCESS = {  # module -> test-name prefixes (None: the whole module)
    "test_ppo_distributed.py": None,
    "test_vllm.py": None,
    "test_distributed_stages.py": ("test_two_",),
    "test_launch.py": ("test_ppo_through_the_flag",),
    "test_dpo.py": ("test_two_processes",),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        prefixes = MULTIPROCESS.get(item.path.name, ())
        if prefixes is None or any(item.name.startswith(p) for p in prefixes):
            item.add_marker(pytest.mark.xdist_group("multiprocess"))
