"""The GPU check's driver (run by benchmarks/gpu_check.sh, which says how to call it).

    python benchmarks/gpu_check.py              # on a GPU: pytest -m gpu, bench speed at real shapes, one table
    python benchmarks/gpu_check.py --dry        # on a CPU: the same steps at tiny shapes
    python benchmarks/gpu_check.py --prepare    # here: download the wheels the GPU machine lacks into .whl/

Steps, each under its own time limit, all under one budget (`--budget_s`; gpu_check.sh gives what is left of
8 minutes after installing the wheels), so the table prints whatever finished:
1. `pytest -m gpu` (the whole suite's GPU tests).
2. `rlhf bench speed` at the `qwen2.5-0.5b` shape (LoRA, then full fine-tuning) and the `llama3-8b` shape
   (LoRA), for ours and TRL's RLOOTrainer, and TRL 1.12's PPOTrainer when its wheel is carried.
3. `rlhf estimate-memory` for the same shape, method, micro-batch and sequence length, beside the peak
   memory measured: the estimate is for training one model, PPO holds four (policy, critic, reference,
   reward; with LoRA the first three share one base), so it is a floor, not a prediction.
The table: tokens/s, seconds per iteration and its phase split (generate / forward / score / train), peak
memory, the estimate and our MFU (model FLOP/s over the device's bf16 peak).
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".whl"
MIB = 1 << 20
CARRY_LIMIT_MIB = 60  # the device tool brings 64 MiB with the repository (about 3 MiB of it)

# What the check needs beyond the GPU image (torch 2.11 with CUDA, transformers, accelerate; no trl, peft,
# deepspeed, datasets): our dependencies, at the versions installed here (the ones our tests pass with).
ROOTS = ("trl", "peft", "datasets", "tyro", "transformers", "accelerate", "huggingface_hub", "deepspeed")
# Provided by the GPU image and compiled or large: never carried (their versions there suffice).
IMAGE = {"torch", "numpy", "pandas", "pyarrow", "tokenizers", "safetensors", "psutil", "pyyaml", "regex",
         "xxhash", "fsspec", "filelock", "tqdm", "packaging", "jinja2", "markupsafe", "msgpack", "ninja",
         "py-cpuinfo", "einops", "requests", "urllib3", "certifi", "charset-normalizer", "rich", "pygments",
         "markdown-it-py", "mdurl", "hf-xet", "setuptools", "sympy", "networkx", "triton", "aiohttp",
         "python-dateutil", "pytz", "tzdata", "six", "nvidia-ml-py", "h11", "sniffio", "httpx", "httpcore"}
TRL_PPO_PEER = "trl==1.12.0"  # the last TRL with PPOTrainer: a peer, installed apart (.whl/trl112)
PY = dict(python_version="3.12", python_full_version="3.12.3", sys_platform="linux", platform_system="Linux",
          platform_machine="x86_64", os_name="posix", implementation_name="cpython",
          platform_python_implementation="CPython", extra="")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots=ROOTS, skip=IMAGE) -> dict[str, str]:
    """{package: version installed here} for `roots` and everything they need on the GPU machine's
    Python (3.12, Linux x86-64), leaving out what the image provides (`skip`)."""
    from packaging.requirements import Requirement

    found: dict[str, str] = {}
    todo = [canonical(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in found or name in skip:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # not needed here, so not on this Python either (e.g. a Windows-only need)
        found[name] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate(PY):
                todo.append(canonical(req.name))
    return dict(sorted(found.items()))


def prepare(dest: Path = WHEELS) -> int:
    """Download the wheels (deepspeed: its pure-Python sdist) for Python 3.12 on Linux x86-64 into `dest`,
    with TRL 1.12 apart in dest/trl112; print each with its size; fail past the carry limit."""
    plan = closure()
    dest.mkdir(exist_ok=True)
    (dest / "trl112").mkdir(exist_ok=True)
    binary = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
              "--abi", "abi3", "--abi", "none", *sum((["--platform", p] for p in (
                  "manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any")), [])]
    jobs = [([f"{n}=={v}"], dest, ["--no-binary", ":all:"] if n == "deepspeed" else binary) for n, v in plan.items()]
    jobs.append(([TRL_PPO_PEER], dest / "trl112", binary))
    for spec, folder, how in jobs:
        have = [p for p in folder.iterdir() if p.is_file() and canonical(p.name.split("-")[0]) ==
                canonical(spec[0].split("==")[0]) and spec[0].split("==")[1] in p.name]
        if have:
            continue
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(folder), *how, *spec]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"could not download {spec[0]}: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return 1
    files = sorted(p for p in dest.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    for p in files:
        print(f"{p.stat().st_size / MIB:7.2f} MiB  {p.relative_to(dest)}")
    print(f"{total / MIB:7.2f} MiB  in {dest} ({len(files)} files; limit {CARRY_LIMIT_MIB} MiB with the repository)")
    return 0 if total <= CARRY_LIMIT_MIB * MIB else 1


# ---------------------------------------------------------------------------------------------------
# the check


@dataclass
class BenchRun:
    shape: str
    peft: str
    trainers: list[str]
    batch_size: int
    prompt_length: int
    response_length: int
    steps: int
    warmup_steps: int
    timeout_s: int
    extra: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.shape}_{self.peft}"


def plan(dry: bool, trl_ppo: bool) -> list[BenchRun]:
    peers = ["trl_rloo"] + (["trl_ppo"] if trl_ppo else [])
    if dry:  # the same steps at a tiny shape, on a CPU, in seconds
        return [BenchRun("tiny", "lora", ["ours"] + peers, 4, 8, 8, 1, 0, 120),
                BenchRun("tiny", "full", ["ours"], 4, 8, 8, 1, 0, 120)]
    # In order of what matters most, should the budget run out: LoRA at both shapes, then full.
    return [BenchRun("qwen2.5-0.5b", "lora", ["ours"] + peers, 32, 128, 128, 2, 1, 100),
            BenchRun("llama3-8b", "lora", ["ours", "trl_rloo"], 16, 128, 128, 1, 1, 170),
            BenchRun("qwen2.5-0.5b", "full", ["ours"] + peers, 32, 128, 128, 2, 1, 100)]


def run_step(cmd: list[str], timeout_s: float, log: Path) -> tuple[int | None, float]:
    """Run `cmd` with its output in `log`; (exit code or None when it ran out of time, seconds)."""
    start = time.perf_counter()
    with log.open("w") as out:
        try:
            code = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            code = None
    return code, time.perf_counter() - start


def pytest_summary(log: Path) -> str:
    lines = [line.strip("= ") for line in log.read_text().splitlines()
             if re.search(r"\d+ (passed|failed|skipped|errors?|deselected)", line)]
    return lines[-1] if lines else "no summary (see the log)"


def estimate_gb(run: BenchRun) -> float | None:
    """`rlhf estimate-memory` for this shape and setup (no gradient checkpointing: PPO uses none)."""
    cmd = [sys.executable, "-m", "rlhf", "estimate-memory", "--model", run.shape, "--method", run.peft,
           "--batch_size", str(run.batch_size), "--seq_len", str(run.prompt_length + run.response_length),
           "--gradient_checkpointing", "false", "--json"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout)["per_gpu_bytes"]["total"] / 1e9


def rows(run: BenchRun, result: dict | None, estimate: float | None, note: str) -> list[list[str]]:
    head = [run.shape, run.peft]
    est = f"{estimate:.1f}" if estimate is not None else "–"
    if result is None:
        return [head + [note] + ["–"] * 9 + [est, "–"]]
    out = []
    for r in result["results"]:
        if "skipped" in r:
            out.append(head + [r["trainer"], f"skipped: {r['skipped'][:80]}"] + ["–"] * 8 + [est, "–"])
            continue
        t = r["time"]
        cell = lambda k: f"{t[k]:.2f}" if k in t else "–"  # noqa: E731
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "–"
        out.append(head + [r["trainer"], f"{r['tokens_per_second']:,.0f}", f"{t['total']:.2f}", cell("generate"),
                           cell("forward"), cell("score"), cell("train"),
                           f"{100 * t['generate'] / t['total']:.0f}%" if "generate" in t else "–",
                           f"{r['peak_memory_gb']:.1f}", est, mfu])
    return out


HEADER = ["shape", "peft", "trainer", "tokens/s", "s/iter", "generate", "forward", "score", "train", "gen share",
          "peak GB", "estimate GB", "MFU"]


def check(dry: bool, out: Path, budget_s: float, trl_ppo_python: str | None) -> int:
    import torch

    deadline = time.perf_counter() + budget_s
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    versions = {p: _version(p) for p in ("torch", "transformers", "accelerate", "trl", "peft", "deepspeed", "datasets")}
    print(f"device: {device}; " + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
    if not dry and not torch.cuda.is_available():
        print("no CUDA GPU here: run with --dry for the CPU rehearsal", file=sys.stderr)
        return 2
    lines = [f"# GPU check{' (dry run, tiny shapes on a CPU)' if dry else ''}", "",
             f"Device: {device}; " + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]

    # 1. the GPU tests
    tests = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
             "--continue-on-collection-errors", str(REPO / "tests" / ("test_gpu.py" if dry else ""))]
    code, seconds = run_step(tests, min(120.0, deadline - time.perf_counter()), out / "pytest.log")
    summary = "out of time" if code is None else pytest_summary(out / "pytest.log")
    lines.append(f"pytest -m gpu: {summary} ({seconds:.0f} s; exit {code})")
    print(lines[-1], flush=True)

    # 2-3. speed and memory per shape
    table = [HEADER, ["---"] * len(HEADER)]
    for run in plan(dry, trl_ppo_python is not None):
        left = deadline - time.perf_counter()
        estimate = estimate_gb(run)
        if left < 30:
            table += rows(run, None, estimate, "not run: out of time")
            continue
        bench_out = out / run.label
        cmd = [sys.executable, "-m", "rlhf", "bench", "speed", "--model", run.shape, "--peft", run.peft,
               "--trainers", *run.trainers, "--batch_size", str(run.batch_size),
               "--prompt_length", str(run.prompt_length), "--response_length", str(run.response_length),
               "--steps", str(run.steps), "--warmup_steps", str(run.warmup_steps), "--output_dir", str(bench_out),
               *(["--trl_ppo_python", trl_ppo_python] if trl_ppo_python and "trl_ppo" in run.trainers else []),
               *run.extra]
        code, seconds = run_step(cmd, min(run.timeout_s, left), out / f"{run.label}.log")
        result_file = bench_out / "result.json"
        result = json.loads(result_file.read_text()) if result_file.exists() else None
        note = "out of time" if code is None else f"failed (exit {code}; see {run.label}.log)"
        table += rows(run, result, estimate, note)
        print(f"{run.label}: exit {code} in {seconds:.0f} s", flush=True)
        if not dry:  # the models take disk space (32 GB at the 8B shape)
            shutil.rmtree(bench_out / "models", ignore_errors=True)
    lines += ["", *("| " + " | ".join(r) + " |" for r in table), "",
              "Seconds per iteration and its phases are means over the timed iterations after the warm-up. Peak GB: "
              "the GPU's max allocated (on a CPU the process's max RSS, cumulative over the trainers of one run). "
              "Estimate GB: `rlhf estimate-memory` for training one model of that shape at that micro-batch and "
              "sequence length, no gradient checkpointing; PPO holds four models, so it is a floor. MFU: our model "
              "FLOP/s over the device's dense bf16 peak."]
    text = "\n".join(lines) + "\n"
    (out / "gpu_check.md").write_text(text)
    print("\n" + text)
    if os.environ.get("OUT"):  # the device tool brings back a few files from $OUT
        keep = Path(os.environ["OUT"])
        shutil.copy(out / "gpu_check.md", keep / "gpu_check.md")
        with (keep / "logs.txt").open("w") as f:
            for log in sorted(out.glob("*.log")):
                f.write(f"===== {log.name}\n" + log.read_text()[-200_000:] + "\n")
        results = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/result.json")}
        (keep / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return 0


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "missing"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry", action="store_true", default=os.environ.get("GPU_CHECK_DRY") == "1")
    ap.add_argument("--prepare", action="store_true")
    ap.add_argument("--out", default=os.environ.get("GPU_CHECK_WORK") or str(REPO / "runs" / "gpu_check"),
                    help="work folder (with $OUT set, the table, the results and the logs are copied there too)")
    ap.add_argument("--budget_s", type=float, default=None, help="time for all steps (default 440 s, dry 300 s)")
    ap.add_argument("--trl_ppo_python", default=os.environ.get("GPU_CHECK_TRL_PPO_PYTHON") or None)
    args = ap.parse_args()
    if args.prepare:
        return prepare()
    budget = args.budget_s or (300.0 if args.dry else 440.0)
    return check(args.dry, Path(args.out), budget, args.trl_ppo_python)


if __name__ == "__main__":
    sys.exit(main())
