"""Each quickstart stage alone and beside one busy process, with the old thread defaults and the new policy.

    python benchmarks/threads.py                      # every stage, old and new, 3 repeats (about 25 min on 2 cores)
    python benchmarks/threads.py --stages ppo reward --repeats 5
    python benchmarks/threads.py --policies old new one_thread   # add a variant to compare

The stages run at configs/quickstart.yaml's settings, shortened (SFT, reward and DPO 30 steps, PPO 5
iterations, `rlhf generate` 4 samples of each of the 128 held-out prompts, `rlhf eval reward` on 2,000
pairs). "Busy" is one `python -c "while True: pass"` started beside the stage and stopped after it. Each configuration runs
`--repeats` times, interleaved (repeat 1 of every configuration, then repeat 2, ...), so a slow period of
a shared machine spreads over all of them; the table gives medians and the spread (min-max).

The time is the command's own (`rlhf.cli.main`), measured in the child process after the libraries are
imported: import time does not depend on threads and would dilute the ratios. Policies:
- `old`: what the commands did before the thread policy (torch's default: one thread per core, OpenMP's
  default wait); `rlhf.runtime.threads` is switched off in the child.
- `new`: the policy of `rlhf.runtime.threads` (what every `rlhf` command does now: the cores this process
  may use, fewer while another process holds them).
- `new_passive`, `one_thread`, `one_thread_passive`, `spin1k`, `spin10k` (GOMP_SPINCOUNT): variants
  measured to choose the policy.

Acceptance (issue 22): beside one busy process every stage at most 2x slower than alone (new policy), and
alone no slower than old.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "quickstart.yaml")
STAGES = ("sft", "reward", "dpo", "ppo", "generate", "eval")
# policy -> (environment for the child, whether rlhf's thread policy is switched off there)
POLICIES = {
    "old": ({}, True),
    "new": ({}, False),
    "new_passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, False),  # the policy with OpenMP's passive wait
    "new_drop50": ({"BENCH_WAITING_TO_DROP": "0.5"}, False),  # a thread fewer only past half a CPU of waiting
    "one_thread": ({"OMP_NUM_THREADS": "1"}, True),
    "one_thread_passive": ({"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}, True),
    "spin1k": ({"GOMP_SPINCOUNT": "1000"}, True),
    "spin10k": ({"GOMP_SPINCOUNT": "10000"}, True),
}
IMPORT_ALLOWANCE_S = 30  # the child's imports, not timed, before its command starts
# One busy single-threaded process (`while True: pass`) that also stops if this script is killed.
BUSY = "import os\nparent = os.getppid()\nwhile os.getppid() == parent: pass"
USER_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def stage_argv(stage: str, work: Path, base: Path) -> list[str]:
    """The `rlhf` arguments of one stage run writing under `work` (inputs from the untimed `base` run)."""
    pipeline = ["pipeline", "--config", CONFIG, "--output_dir", str(work)]
    if stage == "sft":
        return pipeline + ["--stages", "sft", "--sft.train.max_steps", "30"]
    _link(base / "sft", work / "sft")
    if stage == "reward":
        return pipeline + ["--stages", "reward", "--reward.train.max_steps", "30"]
    if stage == "dpo":
        return pipeline + ["--stages", "dpo", "--dpo.train.max_steps", "30"]
    if stage == "ppo":
        _link(base / "reward", work / "reward")
        return pipeline + ["--stages", "ppo", "--ppo.ppo.steps", "5"]
    if stage == "generate":
        return ["generate", "--model", str(base / "sft"), "--prompts.train", "builtin:quickstart_eval_prompts",
                "--prompts.max_samples", "128", "--samples_per_prompt", "4", "--max_new_tokens", "16",
                "--batch_size", "32",
                "--output", str(work / "generations.jsonl")]
    if stage == "eval":
        return ["eval", "reward", "--model", str(base / "reward"), "--data", "builtin:quickstart_prefs",
                "--max_samples", "2000", "--batch_size", "64"]
    raise ValueError(stage)


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(target, target_is_directory=True)


def prepare(base: Path) -> None:
    """The SFT and reward models the later stages start from (untimed, 30 steps each)."""
    if (base / "reward" / "config.json").exists():
        return
    cmd = [sys.executable, "-m", "rlhf", "pipeline", "--config", CONFIG, "--output_dir", str(base),
           "--stages", "sft", "reward", "--sft.train.max_steps", "30", "--reward.train.max_steps", "30"]
    print("preparing:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL, env=_env({}))


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in USER_THREAD_VARIABLES}
    env.update({"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", "")})
    env.update(extra)
    return env


def run_once(stage: str, policy: str, busy: bool, work: Path, base: Path, timeout_s: float) -> float:
    """Seconds of one stage command (imports excluded), beside a busy process or not; `timeout_s` (a lower
    bound, counted as that) when it has not finished by then."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    argv = stage_argv(stage, work, base)
    extra, off = POLICIES[policy]
    result = work / "time.json"
    cmd = [sys.executable, __file__, "--child", "old" if off else "new", "--result", str(result), "--", *argv]
    spinner = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
    try:
        if spinner is not None:
            time.sleep(0.5)  # running before the stage starts
        try:
            proc = subprocess.run(cmd, cwd=work, env=_env(extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, timeout=timeout_s + IMPORT_ALLOWANCE_S)
        except subprocess.TimeoutExpired:
            return timeout_s
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{stage} ({policy}, busy={busy}) failed: {proc.stderr.strip()[-2000:]}")
    return min(timeout_s, json.loads(result.read_text())["seconds"])


def child(mode: str, result: Path, argv: list[str]) -> int:
    """Run `rlhf ARGV` in this process and write its time (after imports) to `result`."""
    from rlhf.runtime import threads

    if mode == "old":
        threads.set_threads = _old_set_threads
    if os.environ.get("BENCH_WAITING_TO_DROP"):  # a variant of the policy's threshold
        threads.WAITING_TO_DROP = float(os.environ["BENCH_WAITING_TO_DROP"])
    # Imports first (untimed): what every stage loads.
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    import rlhf.evaluation.eval_reward  # noqa: F401
    import rlhf.evaluation.generate  # noqa: F401
    import rlhf.stages.pipeline  # noqa: F401
    from rlhf import cli

    start = time.perf_counter()
    code = cli.main(argv)
    seconds = time.perf_counter() - start
    result.write_text(json.dumps({"seconds": seconds, "threads": torch.get_num_threads(),
                                  "wait": os.environ.get("OMP_WAIT_POLICY")}))
    return code


def _old_set_threads(n=None, adapt=True) -> int:
    """Before the policy: PPO fixed the affinity's cores divided among local processes, the other stages
    left torch's default (one per core); both are the core count on one process."""
    import torch

    if n is None:
        if "OMP_NUM_THREADS" in os.environ:
            return torch.get_num_threads()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        n = max(1, len(os.sched_getaffinity(0)) // local)
    torch.set_num_threads(n)
    return n


def table(times: dict, policies: list[str], stages: list[str], cap: float = float("inf")) -> str:
    """Medians (min-max); a value at `cap` was stopped there: shown as >=, and a ratio over it as >= too."""
    def at_least(v: float) -> str:
        return ">=" if v >= cap else ""

    def cell(values: list[float]) -> str:
        m = statistics.median(values)
        return f"{at_least(m)}{m:.2f} ({min(values):.2f}-{at_least(max(values))}{max(values):.2f})"

    def med(stage, policy, busy):
        return statistics.median(times[(stage, policy, busy)])

    def ratio(top: float, bottom: float) -> str:
        return f"{'>=' if top >= cap and bottom < cap else ''}{top / bottom:.2f}x"

    head = ["stage"] + [f"alone {p}" for p in policies] + [f"busy {p}" for p in policies] + \
           [f"busy/alone {p}" for p in policies] + [f"alone {p}/{policies[0]}" for p in policies[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in stages:
        row = [s] + [cell(times[(s, p, False)]) for p in policies] + [cell(times[(s, p, True)]) for p in policies]
        row += [ratio(med(s, p, True), med(s, p, False)) for p in policies]
        row += [ratio(med(s, p, False), med(s, policies[0], False)) for p in policies[1:]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


LINE = re.compile(r"^repeat (\d+): (\w+)\s+(\w+)\s+(alone|busy)\s+([\d.]+) s$")


def table_from_log(log: Path, cap: float) -> int:
    times: dict = {}
    for line in log.read_text().splitlines():
        m = LINE.match(line.strip())
        if m:
            times.setdefault((m.group(2), m.group(3), m.group(4) == "busy"), []).append(float(m.group(5)))
    stages = list(dict.fromkeys(k[0] for k in times))
    policies = list(dict.fromkeys(k[1] for k in times))
    complete = [s for s in stages if all((s, p, b) in times for p in policies for b in (False, True))]
    counts = sorted({len(v) for v in times.values()})
    print(f"Seconds per command (imports excluded), median (min-max) of {'/'.join(map(str, counts))} runs; "
          f"busy = one `python -c 'while True: pass'` beside it.\n")
    print(table(times, policies, complete, cap))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--policies", nargs="+", default=["old", "new"], choices=list(POLICIES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout_s", type=float, default=45.0, help="a command still running after this long "
                    "(imports excluded) is stopped and counted as this long: a lower bound, shown as >=")
    ap.add_argument("--work", default=str(REPO / "runs" / "bench_threads"))
    ap.add_argument("--from_log", help="print the table from the `repeat N: ...` lines of an earlier run's output "
                    "(one that was stopped before its table)")
    ap.add_argument("--child", choices=("old", "new"), help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.child:
        return child(args.child, Path(args.result), rest[1:] if rest[:1] == ["--"] else rest)
    if args.from_log:
        return table_from_log(Path(args.from_log), args.timeout_s)
    work = Path(args.work)
    base = work / "base"
    prepare(base)
    configs = [(s, p, b) for s in args.stages for b in (False, True) for p in args.policies]
    times: dict = {c: [] for c in configs}
    for r in range(args.repeats):
        for stage, policy, busy in configs:
            seconds = run_once(stage, policy, busy, work / "run", base, args.timeout_s)
            times[(stage, policy, busy)].append(seconds)
            (work / "result.json").write_text(json.dumps({"|".join(map(str, k)): v for k, v in times.items()}))
            print(f"repeat {r + 1}: {stage:<9} {policy:<19} {'busy' if busy else 'alone':<5} {seconds:7.2f} s",
                  flush=True)
    print(f"\nSeconds per command (imports excluded), median (min-max) of {args.repeats}; "
          f"{len(os.sched_getaffinity(0))} cores; busy = one `python -c 'while True: pass'` beside it; "
          f">= : stopped at {args.timeout_s:.0f} s.\n")
    print(table(times, args.policies, args.stages, args.timeout_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
