"""`rlhf bench agents` on miniature settings: every method and seed in the table, the trained methods sampled
the same episodes (counted from their rollouts), best-of-n's cost and selection, the SFT policy reused, and
bad options as one line (no timing is asserted)."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from rlhf import cli, config
from rlhf.bench import agents as bench_agents
from rlhf.bench import align_math as bench_math

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STEPS, ROLLOUT, ROWS, N, SEEDS = 2, 8, 6, 3, [0, 1]


def miniature_task(path, shipped="agent_quickstart.yaml"):
    """A shipped task's YAML at miniature size: a smaller model, SFT steps, rollout, held-out rows."""
    task = yaml.safe_load((REPO / "configs" / shipped).read_text())
    task["sft"]["model"]["tiny"] = {"hidden_size": 32, "intermediate_size": 64}
    task["sft"]["data"].update(validation_split=0.0, max_samples=64)
    task["sft"]["train"].update(max_steps=6, per_device_train_batch_size=8, logging_steps=3)
    del task["sft"]["train"]["eval_steps"]
    task["ppo"]["eval"]["max_prompts"] = ROWS
    task["ppo"]["ppo"].update(steps=5, per_device_rollout_batch_size=ROLLOUT, ppo_epochs=1, max_new_tokens=6)
    task["ppo"]["peft"]["r"] = 4
    path.write_text(yaml.safe_dump(task))
    return str(path)


def miniature(tmp_path, *args):
    return config.parse(bench_agents.BenchAgentsConfig, [
        "--task", miniature_task(tmp_path / "task.yaml"), "--output_dir", str(tmp_path / "bench"),
        "--seeds", *map(str, SEEDS), "--ppo_steps", str(STEPS), "--group_size", "4", "--best_of_n", str(N), *args],
        "t")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("agents")
    cfg = miniature(tmp)
    return cfg, bench_agents.main(cfg), tmp / "bench"


@pytest.mark.xdist_group("bench_agents")
def test_the_table_has_every_method_and_seed(bench):
    cfg, report, out = bench
    assert [s["seed"] for s in report["seeds"]] == SEEDS
    md = (out / "result.md").read_text()
    assert json.loads((out / "result.json").read_text())["seeds"] == json.loads(json.dumps(report["seeds"]))
    for s in report["seeds"]:
        assert list(s["methods"]) == list(bench_agents.METHODS)
        for m, r in s["methods"].items():
            label = bench_agents._label(m, N)
            assert f"| {label} | {s['seed']} | {r['before']['success']:.3f} → {r['after']['success']:.3f} |" in md
            assert 0 <= r["after"]["success"] <= 1 and r["after"]["turns"] >= 1 and r["time_s"] > 0
        # the same SFT policy and held-out draw before every trained method: the same "before"
        befores = [s["methods"][m]["before"] for m in bench_agents.TRAINED]
        assert all(b == befores[0] for b in befores) and befores[0]["kl"] == 0
    for m in bench_agents.METHODS:  # one mean row per method over both seeds
        assert f"| {bench_agents._label(m, N)} | {len(SEEDS)} | " in md
    # PPO trained a critic; the critic-free estimators did not
    runs = out / "seed_0"
    assert "val/explained_variance" in json.loads((runs / "ppo" / "metrics.jsonl").read_text().splitlines()[1])
    for m in ("grpo", "rloo", "reinforce_pp"):
        assert "val/explained_variance" not in json.loads((runs / m / "metrics.jsonl").read_text().splitlines()[1])


@pytest.mark.xdist_group("bench_agents")
def test_the_sample_budgets_are_equal(bench):
    cfg, report, out = bench
    for s in report["seeds"]:
        trained = [s["methods"][m] for m in bench_agents.TRAINED]
        # counted from what each run's rollouts held, not from the settings
        assert [r["episodes"] for r in trained] == [STEPS * ROLLOUT] * 4
        assert all(r["iterations"] == STEPS for r in trained)
        limit = STEPS * ROLLOUT * 3 * 6  # episodes x env.max_turns x ppo.max_new_tokens
        assert all(0 < r["tokens"] <= limit for r in trained)
        bon = s["methods"]["best_of_n"]
        assert bon["episodes"] == N * ROWS and bon["n"] == N and 0 < bon["tokens"] <= N * ROWS * 3 * 6
        assert bon["after"]["kl_bound"] == pytest.approx(bench_math.best_of_n_kl(N))
        # the best of n episodes by the true return is never worse than their mean
        assert bon["after"]["success"] >= bon["before"]["success"]
    grpo = [json.loads(line) for line in (out / "seed_0" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert {m["rollout/samples"] for m in grpo if "rollout/samples" in m} == {ROLLOUT}


@pytest.mark.xdist_group("bench_agents")
def test_the_sft_policy_is_trained_once_per_seed(bench, tmp_path):
    cfg, report, out = bench
    assert not any(s["sft_reused"] for s in report["seeds"])
    again = tmp_path / "again"
    shutil.copytree(out / "seed_0", again / "seed_0", ignore=shutil.ignore_patterns(*bench_agents.TRAINED))
    weights = again / "seed_0" / "sft" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    task = Path(miniature_task(tmp_path / "task.yaml"))

    def rerun():
        return bench_agents.main(config.parse(bench_agents.BenchAgentsConfig, [
            "--task", str(task), "--output_dir", str(again), "--seeds", "0", "--methods", "best_of_n",
            "--best_of_n", "2"], "t"))["seeds"][0]

    first = rerun()
    assert first["sft_reused"] and weights.stat().st_mtime_ns == stamp
    assert first["methods"]["best_of_n"]["episodes"] == 2 * ROWS
    task.write_text(task.read_text().replace("max_steps: 6", "max_steps: 3"))  # another SFT setting: trained again
    second = rerun()
    assert not second["sft_reused"] and weights.stat().st_mtime_ns != stamp


@pytest.mark.parametrize("argv, message", [
    (["bench", "agents", "--methods", "ppo", "dpo"], "methods must be some of ppo, grpo, rloo, reinforce_pp, "
                                                     "best_of_n, each once, got ['ppo', 'dpo']"),
    (["bench", "agents", "--task", "chess"], "task must be one of calculator, guess_number or a pipeline YAML"),
    (["bench", "agents", "--task", "nowhere.yaml"], "task: 'nowhere.yaml' is not a file"),
    (["bench", "agents", "--group_size", "5"], "grpo (group_size 5): ppo.per_device_rollout_batch_size (32) must be a multiple "
                                               "of ppo.samples_per_prompt (5"),
    (["bench", "agents", "--ppo_steps", "1"], "best_of_n: the training budget (1 x 32 episodes) is smaller than"),
])
def test_bench_agents_cli_errors(capsys, tmp_path, argv, message):
    assert cli.main([*argv, "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing written


def test_guess_number_task_runs(tmp_path):
    """`--task guess_number` is configs/agent_guess.yaml: the game, its data and settings, at miniature size."""
    pl = bench_agents.plan(config.parse(bench_agents.BenchAgentsConfig, ["--task", "guess_number"], "t"))
    assert pl.task.ppo.env.spec == "rlhf.envs.guess_number:GuessNumber" and pl.heldout_rows == 64
    assert pl.n == pl.budget // 64 == 80 * 32 // 64
    report = bench_agents.main(config.parse(bench_agents.BenchAgentsConfig, [
        "--task", miniature_task(tmp_path / "guess.yaml", "agent_guess.yaml"), "--output_dir", str(tmp_path / "b"),
        "--seeds", "0", "--ppo_steps", "1", "--best_of_n", "2"], "t"))
    runs = report["seeds"][0]["methods"]
    assert list(runs) == list(bench_agents.METHODS)
    assert [runs[m]["episodes"] for m in bench_agents.TRAINED] == [ROLLOUT] * 4 and runs["best_of_n"]["episodes"] == 2 * ROWS
    assert report["env"]["eval_prompts"] == "builtin:guess_eval"
