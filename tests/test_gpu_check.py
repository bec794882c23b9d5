"""benchmarks/gpu_check.sh: its dry run on a CPU (the same steps as on a GPU, at tiny shapes) prints one table
with every trainer's figures, and the wheels it would carry are the ones the GPU machine lacks."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402


def test_the_wheels_carried_are_what_the_gpu_image_lacks_at_our_versions():
    from importlib.metadata import version

    plan = gpu_check.closure()
    for needed in ("trl", "peft", "datasets", "deepspeed", "tyro", "dill", "multiprocess", "pydantic-core", "hjson"):
        assert plan[needed] == version(needed), needed
    assert not {"torch", "numpy", "pyarrow", "tokenizers"} & set(plan)  # in the image, compiled: never carried


def test_unknown_option_is_one_line_and_exit_2():
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--fast"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "gpu_check.sh: unknown option '--fast' (expected --prepare or --dry)"


@pytest.mark.slow
def test_dry_run_prints_one_table_of_every_trainer(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_WORK": str(tmp_path / "work"), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry"], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (out / "gpu_check.md").read_text()
    assert table in proc.stdout
    assert re.search(r"pytest -m gpu: \d+ skipped", table), table  # no GPU here: every GPU test skips
    number = r"[\d,.]+"
    for peft, trainer in (("lora", "rlhf PPO \\(ours\\)"), ("lora", "TRL RLOOTrainer [\\d.]+"),
                          ("full", "rlhf PPO \\(ours\\)")):
        # tokens/s, s/iter, the phases that trainer reports, peak memory, the estimate
        row = rf"\| tiny \| {peft} \| {trainer} \| ({number}) \| ({number}) \|.*\| ({number}) \| ({number}) \| – \|"
        match = re.search(row, table)
        assert match, (peft, trainer, table)
        assert float(match.group(1).replace(",", "")) > 0 and float(match.group(4)) > 0
    ours = re.search(r"\| tiny \| lora \| rlhf PPO \(ours\) \| [\d,.]+ \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| "
                     r"([\d.]+) \| ([\d.]+) \|", table)
    total, phases = float(ours.group(1)), [float(ours.group(i)) for i in range(2, 6)]
    assert sum(phases) <= total * 1.05 + 0.01  # generate + forward + score + train within the iteration
    results = json.loads((out / "results.json").read_text())
    assert {r["trainer"] for r in results["tiny_lora"]["results"]} >= {"rlhf PPO (ours)"}
    assert "===== tiny_lora.log" in (out / "logs.txt").read_text()
