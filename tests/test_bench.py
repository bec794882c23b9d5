"""`rlhf bench align` and `rlhf bench speed` on miniature settings: their numbers come out and agree
with each other (no timing is asserted)."""

import json
import math

import pytest
import torch

from rlhf import cli, config
from rlhf.bench import align as bench_align
from rlhf.bench import align_math as bench_math
from rlhf.bench import speed as bench_speed

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


MINIATURE = ["--seeds", "0", "--sft_rows", "400", "--sft_steps", "60", "--pair_prompts", "400", "--rm_steps", "20",
             "--ppo_steps", "4", "--rollout_batch", "16", "--eval_every", "2", "--eval_prompts", "24",
             "--best_of_n", "4", "--max_new_tokens", "8", "--dpo_steps", "4"]


@pytest.mark.slow  # multi-process / end to end: `-m "not slow"` leaves it out
def test_bench_align_miniature(tmp_path):
    cfg = config.parse(bench_align.BenchAlignConfig, [
        "--output_dir", str(tmp_path / "align"), *MINIATURE, "--methods", "ppo", "best_of_n"], "t")
    report = bench_align.main(cfg)
    r = report["seeds"][0]
    # Bayes accuracy: between chance and certainty; the RM is measured on the same held-out pairs
    rm = r["reward_model"]
    assert 0.5 < rm["bayes_accuracy"] < 1.0 and 0.0 <= rm["accuracy"] <= 1.0
    assert rm["pairs"] == r["pairs"]["test"] > 0
    # best-of-n: analytic KL; n = 1 is plain sampling
    curve = r["methods"]["best_of_n"]["curve"]
    assert [p["n"] for p in curve] == [1, 2, 4]
    assert [p["kl"] for p in curve] == pytest.approx([bench_math.best_of_n_kl(n) for n in (1, 2, 4)])
    assert curve[0]["kl"] == 0.0
    # the proxy picks its favourite, so the proxy score of best-of-n cannot fall with n
    proxies = [p["proxy"] for p in curve]
    assert proxies == sorted(proxies)
    # the SFT policy evaluated against itself: KL exactly 0
    assert r["sft"]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert 0.0 <= r["sft"]["gold"] <= 1.0
    # PPO evaluated at steps 2 and 4, and its KL measured on its own samples is >= 0 in expectation
    ppo_evals = r["methods"]["ppo"]["evals"]
    assert [e["step"] for e in ppo_evals] == [2, 4]
    assert report["summary"]["methods"]["ppo"]["final_gold"]["mean"] == ppo_evals[-1]["gold"]
    for m in ("ppo", "best_of_n"):
        assert r["methods"][m]["time_s"] > 0 and r["methods"][m]["peak_memory_gb"] > 0.1
    out = tmp_path / "align"
    md = (out / "report.md").read_text()
    assert "Bayes-optimal accuracy" in md and f"{rm['bayes_accuracy']:.3f}" in md
    assert "PPO (ours, GAE critic)" in md and "best-of-4" in md
    assert (out / "plots" / "gold_vs_kl.png").stat().st_size > 1000
    assert json.loads((out / "report.json").read_text())["summary"]["seeds"] == [0]
    metrics = [json.loads(line) for line in (out / "seed_0" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[1]["eval/gold"] == ppo_evals[0]["gold"]  # the evaluations also land in PPO's metrics


@pytest.mark.slow
def test_bench_align_every_method(tmp_path):
    methods = ["ppo", "grpo", "rloo", "reinforce_pp", "dpo", "best_of_n", "trl_rloo"]
    cfg = config.parse(bench_align.BenchAlignConfig, [
        "--output_dir", str(tmp_path / "align"), *MINIATURE, "--methods", *methods, "--group_size", "4"], "t")
    report = bench_align.main(cfg)
    r = report["seeds"][0]["methods"]
    assert list(r) == methods
    for m in methods:
        points = r[m]["curve"] if m == "best_of_n" else r[m]["evals"]
        assert points and all(0.0 <= p["gold"] <= 1.0 and math.isfinite(p["kl"]) for p in points), m
        assert r[m]["time_s"] > 0 and r[m]["peak_memory_gb"] > 0.1, m
    for m in ("ppo", "grpo", "rloo", "reinforce_pp", "trl_rloo"):
        assert [e["step"] for e in r[m]["evals"]] == [2, 4], m
    assert [e["step"] for e in r["dpo"]["evals"]] == [2, 4]  # DPO's checkpoints, as many points as the others
    out = tmp_path / "align"
    # the critic-free methods built no critic; PPO did
    assert (out / "seed_0" / "ppo" / "critic").is_dir()
    assert not [m for m in ("grpo", "rloo", "reinforce_pp") if (out / "seed_0" / m / "critic").exists()]
    md = (out / "report.md").read_text()
    assert all(bench_align.LABELS[m] in md for m in methods if m != "best_of_n")
    assert set(report["summary"]["methods"]) == set(methods)
    assert (out / "plots" / "gold_vs_kl.png").stat().st_size > 1000


def test_peak_memory_sees_an_allocation():
    with bench_align.PeakMemory(interval=0.005) as quiet:
        pass
    with bench_align.PeakMemory(interval=0.005) as busy:
        x = torch.ones(64 * 2**20)  # 256 MB, touched
        x += 1
        del x
    assert busy.peak_gb > quiet.peak_gb + 0.2
    assert busy.peak_gb > bench_align.PeakMemory.rss_gb() + 0.2  # a peak, not the RSS after the tensor is freed


def test_over_optimisation_detection():
    evals = [{"step": s, "gold": g, "gold_se": 0.01, "proxy": p, "kl": s / 10}
             for s, g, p in [(10, 0.5, 0.1), (20, 0.6, 0.3), (30, 0.4, 0.6)]]
    o = bench_align.over_optimisation(evals)
    assert o["detected"] and o["peak_step"] == 20 and o["gold_fall"] == pytest.approx(0.2)
    evals[-1]["gold"] = 0.59  # a fall within noise is not over-optimisation
    assert not bench_align.over_optimisation(evals)["detected"]


def test_word_tokenizer_round_trip():
    tok = bench_speed.word_tokenizer(1000)
    assert len(tok) == 1000 and tok.pad_token_id == 0 and tok.eos_token_id == 2
    ids = torch.randint(3, 1000, (50,)).tolist()
    text = tok.decode(ids)
    assert tok(text, add_special_tokens=False)["input_ids"] == ids
    prompt = bench_speed.as_messages([ids])[0]
    assert tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False) == ids


def test_flop_count_by_hand():
    # 2 params/token forward; critic and reward model lack the LM head; LoRA backward = 1x forward
    f = bench_speed.iteration_flops(n_matmul=100, n_head=40, batch=2, prompt_len=3, response_len=2, epochs=2,
                                    peft="lora")
    T, A = 5, 2
    lm = 2 * (T * 60 + (A + 1) * 40)  # trunk over every token, the head over the A + 1 kept positions
    assert f["generate"] == 2 * 2 * (T * 60 + A * 40)  # the head once per new token
    assert f["forward"] == 2 * (lm + 2 * T * 60 + lm)  # policy, critic, reference
    assert f["score"] == 2 * 2 * T * 60
    assert f["train"] == 2 * 4 * (lm + 2 * T * 60)
    assert bench_speed.iteration_flops(100, 40, 2, 3, 2, 2, "full")["train"] == 2 * 6 * (lm + 2 * T * 60)
    # policy logprobs recorded during generation: no policy pass in the rollout forward
    assert bench_speed.iteration_flops(100, 40, 2, 3, 2, 2, "lora", policy_forward=False)["forward"] == \
        2 * (2 * T * 60 + lm)


def test_matmul_params_of_a_real_model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    for tied in (False, True):
        c = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=64, vocab_size=300, tie_word_embeddings=tied)
        model = AutoModelForCausalLM.from_config(c)
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        n_matmul, head = bench_speed.matmul_params(c, sum(p.numel() for p in model.parameters()))
        norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
        assert n_matmul - norms == linear and head == 300 * 32


def test_bench_speed_miniature(tmp_path):
    cfg = config.parse(bench_speed.BenchSpeedConfig, [
        "--output_dir", str(tmp_path / "speed"), "--tiny.hidden_size", "32", "--batch_size", "4",
        "--prompt_length", "6", "--response_length", "5", "--steps", "2", "--trainers", "ours", "trl_rloo"], "t")
    report = bench_speed.main(cfg)
    r = report["results"][0]
    assert r["tokens_per_iteration"] == 4 * (6 + 5)  # no stop token: every response is full length
    parts = sum(r["time"][k] for k in ("generate", "forward", "score", "train"))
    assert parts == pytest.approx(r["time"]["total"], rel=1e-6)
    assert r["tokens_per_second"] == pytest.approx(r["tokens_per_iteration"] / r["time"]["total"])
    assert r["steps_timed"] == 2 and r["peak_memory_gb"] > 0
    assert r["achieved_flops_per_second"] == pytest.approx(r["model_flops_per_iteration"] / r["time"]["total"])
    rloo = report["results"][1]
    assert rloo["tokens_per_iteration"] == 4 * (6 + 5)  # the same work for TRL's RLOO
    assert rloo["steps_timed"] == 2
    assert sum(rloo["time"][k] for k in ("generate", "score", "train")) == pytest.approx(rloo["time"]["total"])
    md = (tmp_path / "speed" / "result.md").read_text()
    assert "| rlhf PPO (ours) |" in md and "| TRL RLOOTrainer" in md
    # the floor line: the phases' model FLOPs at this CPU's measured matmul rate
    rate = report["matmul_flops_per_second"]
    assert rate > 1e8
    floor_train = r["model_flops_by_phase"]["train"] / rate
    assert f"train {floor_train:.3f} s (measured {r['time']['train']:.3f})" in md


def test_bench_speed_writes_each_result_when_done(tmp_path, monkeypatch):
    """A trainer that fails mid-benchmark is reported as failed; the results before it are already on disk
    (result.json is rewritten after every trainer), and the ones after it still run."""
    written = []
    real_write = bench_speed._write

    def spy(out, cfg, report):
        real_write(out, cfg, report)
        written.append([r["trainer"] for r in json.loads((out / "result.json").read_text())["results"]])

    def broken(cfg, m, out):
        raise RuntimeError("peer crashed\nsecond line")

    monkeypatch.setattr(bench_speed, "_write", spy)
    monkeypatch.setattr(bench_speed, "run_trl_rloo", broken)
    cfg = config.parse(bench_speed.BenchSpeedConfig, [
        "--output_dir", str(tmp_path / "speed"), "--tiny.hidden_size", "32", "--batch_size", "4",
        "--prompt_length", "6", "--response_length", "5", "--steps", "1", "--trainers", "ours", "trl_rloo",
        "ours"], "t")
    report = bench_speed.main(cfg)
    assert written == [["rlhf PPO (ours)"], ["rlhf PPO (ours)", "trl_rloo"],
                       ["rlhf PPO (ours)", "trl_rloo", "rlhf PPO (ours)"]]
    assert report["results"][1] == {"trainer": "trl_rloo", "skipped": "failed: RuntimeError: peer crashed"}
    assert "| trl_rloo | skipped: failed: RuntimeError: peer crashed |" in (tmp_path / "speed" / "result.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["bench"], "expected which benchmark"),
    (["bench", "align", "--best_of_n", "6"], "best_of_n must be a power of two, got 6"),
    (["bench", "align", "--rollout_batch", "30", "--group_size", "4"], "group_size must be at least 2 and divide rollout_batch (30)"),
    (["bench", "align", "--methods", "ppo", "sac"], "methods must be some of ppo, grpo, rloo, reinforce_pp, dpo, best_of_n, "
                                                    "trl_rloo, each once, got ['ppo', 'sac']"),
    (["bench", "speed", "--trainers", "ours", "foo"], "trainers must be some of ours, ours_vllm, trl_rloo, trl_ppo, got "
                                                      "['ours', 'foo']"),
    (["bench", "speed", "--model", "nonexistent-shape"],
     "model must be `tiny`, a named shape (smollm2-135m, qwen2.5-0.5b, llama3.2-1b, qwen2.5-1.5b, llama3.2-3b, "
     "llama2-7b, llama3-8b, llama2-13b, qwen2.5-14b, qwen2.5-32b, llama3.1-70b, llama3.1-405b), a directory with "
     "config.json, or a hub id, got 'nonexistent-shape'"),
])
def test_bench_cli_errors(capsys, argv, message):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
