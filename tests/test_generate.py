"""`rlhf generate`: rows per prompt, greedy equals a direct `model.generate`, rewards, bad options."""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import REPO
from rewards import response_chars
from test_ppo import sft_policy  # noqa: F401  (session fixture)

from rlhf import cli
from rlhf.generation.prompts import load_prompts
from rlhf.ppo.config import PromptDataConfig

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

N = 6  # prompts


@pytest.fixture(scope="module")
def lora_adapter(sft_policy, tmp_path_factory):  # noqa: F811
    """A peft LoRA adapter directory on the SFT model, random B so that it changes the answers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(sft_policy),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(sft_policy).save_pretrained(out)
    return str(out)


def greedy(model_dir: str, prompts, max_new_tokens: int) -> list[tuple[str, int]]:
    """(text, tokens) of a plain one-prompt-at-a-time greedy `generate`, the reference for `rlhf generate`."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    is_adapter = (Path(model_dir) / "adapter_config.json").exists()
    model = (AutoPeftModelForCausalLM if is_adapter else AutoModelForCausalLM).from_pretrained(model_dir)
    out = []
    for p in prompts:
        enc = tok.apply_chat_template(p, add_generation_prompt=True, return_dict=True, return_tensors="pt")
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # (1, P + A)
        ids = gen[0, enc["input_ids"].shape[1]:]  # (A,), ends at EOS or at the limit
        out.append((tok.decode(ids, skip_special_tokens=True), len(ids)))
    return out


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("which", ["full", "adapter"])
def test_greedy_rows_match_direct_generate(which, tmp_path, sft_policy, lora_adapter, capsys):  # noqa: F811
    model = sft_policy if which == "full" else lora_adapter
    out = tmp_path / "g.jsonl"
    code = cli.main(["generate", "--model", model, "--prompts.max_samples", str(N), "--samples_per_prompt", "2",
                     "--temperature", "0", "--max_new_tokens", "12", "--batch_size", "5",  # batches straddle prompts
                     "--reward.spec", str(REPO / "tests" / "rewards.py") + ":response_chars", "--output", str(out)])
    assert code == 0
    rows = read(out)
    prompts = load_prompts(PromptDataConfig(max_samples=N))
    assert len(rows) == N * 2
    assert [r["prompt"] for r in rows] == [p for p in prompts for _ in range(2)]  # each prompt's samples consecutive
    assert [r["sample"] for r in rows] == [0, 1] * N
    assert all(a["response"] == b["response"] for a, b in zip(rows[::2], rows[1::2]))  # greedy: same answer twice
    direct = greedy(model, prompts, 12)
    assert [(r["response"], r["length"]) for r in rows[::2]] == direct
    assert [r["eos"] for r in rows] == [n < 12 for _, n in direct for _ in range(2)]
    assert [r["reward"] for r in rows] == response_chars([r["prompt"] for r in rows], [r["response"] for r in rows])
    if which == "full":
        assert len({r["reward"] for r in rows}) > 1  # the reward tells the answers apart
    else:
        assert direct != greedy(sft_policy, prompts, 12)  # the adapter was applied: it changes the answers
    assert f"{2 * N} responses ({N} prompts x 2)" in capsys.readouterr().out
    assert not (tmp_path / "g.jsonl.tmp").exists()


def test_sampling_is_seeded_and_varies(tmp_path, sft_policy):  # noqa: F811
    args = ["generate", "--model", sft_policy, "--prompts.max_samples", str(N), "--samples_per_prompt", "3",
            "--temperature", "1.0", "--max_new_tokens", "8"]
    assert cli.main(args + ["--output", str(tmp_path / "a.jsonl")]) == 0
    assert cli.main(args + ["--output", str(tmp_path / "b.jsonl")]) == 0
    assert cli.main(args + ["--seed", "1", "--output", str(tmp_path / "c.jsonl")]) == 0
    a, b, c = (read(tmp_path / f"{x}.jsonl") for x in "abc")
    assert len(a) == 3 * N and [r["sample"] for r in a] == [0, 1, 2] * N
    assert "reward" not in a[0]  # no --reward.spec: no reward field
    assert a == b  # same seed, same rows
    assert [r["response"] for r in a] != [r["response"] for r in c]
    assert any(len({r["response"] for r in a[i:i + 3]}) > 1 for i in range(0, 3 * N, 3))  # samples differ


@pytest.mark.parametrize("option, value", [("--samples_per_prompt", "0"), ("--temperature", "-0.5"),
                                           ("--model", "MISSING"), ("--prompts.train", "BAD")])
def test_bad_option_exits_2_and_writes_nothing(option, value, tmp_path, sft_policy, capsys):  # noqa: F811
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    value = {"MISSING": str(tmp_path / "no_model"), "BAD": str(bad)}.get(value, value)
    out = tmp_path / "out" / "g.jsonl"
    args = {"--model": sft_policy, "--output": str(out), option: value}
    code = cli.main(["generate"] + [x for kv in args.items() for x in kv])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and option.lstrip("-") in err, err
    assert not out.parent.exists()


def test_stop_token_option(tmp_path, sft_policy):  # noqa: F811
    """Regression: `rlhf generate` stopped at EOS whatever the stop token; with none, every answer runs to
    max_new_tokens, and the greedy answer that stopped at EOS is where it starts."""
    args = ["generate", "--model", sft_policy, "--prompts.max_samples", str(N), "--temperature", "0",
            "--max_new_tokens", "12"]
    assert cli.main(args + ["--output", str(tmp_path / "eos.jsonl")]) == 0
    assert cli.main(args + ["--stop_token", "None", "--output", str(tmp_path / "none.jsonl")]) == 0
    eos, none = read(tmp_path / "eos.jsonl"), read(tmp_path / "none.jsonl")
    assert any(r["length"] < 12 for r in eos)  # some answers stop at EOS by default
    assert all(r["length"] == 12 for r in none)
    assert all(b["response"].startswith(a["response"]) for a, b in zip(eos, none))
    assert any(len(b["response"]) > len(a["response"]) for a, b in zip(eos, none))


def test_rewards_that_are_null_are_left_out_of_the_mean(tmp_path, sft_policy, capsys):  # noqa: F811
    """Regression: the summary summed the `null` rewards `rlhf generate` had written itself."""
    fn = tmp_path / "half.py"
    fn.write_text("def half(prompts, responses):\n    return [float('nan') if i % 2 else 1.0 "
                  "for i in range(len(responses))]\n")
    out = tmp_path / "g.jsonl"
    with pytest.warns(UserWarning, match="gave 2 non-finite score"):
        code = cli.main(["generate", "--model", sft_policy, "--prompts.max_samples", "4", "--max_new_tokens", "4",
                         "--reward.spec", f"{fn}:half", "--output", str(out)])
    assert code == 0
    assert [r["reward"] for r in read(out)] == [1.0, None, 1.0, None]
    assert "mean reward 1.0000 over the 2 scored" in capsys.readouterr().out


# --- with an environment: episodes, whole transcripts ---------------------------------------------------------

COUNTDOWN = "tests/agent_envs.py:Countdown"
ENV_LIMITS = ["--env.max_turns", "4", "--env.max_total_tokens", "64", "--max_new_tokens", "8"]


def countdown_rows(path: Path) -> str:
    """Episodes of 1, 2, 3 and 6 agent turns (6: cut by env.max_turns 4 or env.max_total_tokens 64)."""
    path.write_text("".join(json.dumps({"turns": n}) + "\n" for n in (1, 2, 3, 6)))
    return str(path)


def replay_episode(rec: dict, tok, env, max_turns: int, max_total_tokens: int) -> list[int]:
    """Replay a written episode: a fresh environment reset with its row and seed and stepped with its agent
    turns must give its every message, reward and outcome; the agent turns must be the decoded sampled ids;
    and the episode's ids must be the first messages', the sampled ids and the replies' encoded once, in
    order. Returns the positions of the sampled ids in the episode's ids."""
    from rlhf.envs.turns import ChatTurns

    turns, t, eos = ChatTurns(tok), rec["transcript"], tok.eos_token_id
    first = env.reset(rec["row"], rec["seed"])
    assert t[:len(first)] == first
    ids, actions, i = turns.prompt_ids(first), [], len(first)
    total, tool_calls, success, agent_turns, truncated = 0.0, 0, False, 0, False
    while i < len(t):
        m = t[i]
        assert m["role"] == "assistant"
        agent_turns, i = agent_turns + 1, i + 1
        sampled = m["ids"]
        stopped = sampled[-1:] == [eos]
        assert m["content"] == tok.decode(sampled[:-1] if stopped else sampled)
        actions += range(len(ids), len(ids) + len(sampled))
        ids = ids + sampled
        if not stopped:  # a turn cut by --max_new_tokens or the token limit ends the episode unseen
            assert m["reward"] == 0 and i == len(t)
            truncated = True
            break
        result = env.step(m["content"])
        assert m["reward"] == (result.reward or 0.0)
        total += m["reward"]
        tool_calls += result.info.get("tool_calls", 0)
        success = result.info.get("success", success)
        assert t[i:i + len(result.reply)] == result.reply
        i += len(result.reply)
        if result.done:
            break
        reply = turns.reply_ids(result.reply)
        if agent_turns == max_turns or len(ids) + len(reply) >= max_total_tokens:
            truncated = True
            break
        ids += reply
    assert i == len(t)  # nothing else in the transcript
    assert rec["ids"] == ids and rec["tokens"] == len(ids) <= max_total_tokens
    assert (rec["return"], rec["turns"], rec["tool_calls"], rec["success"], rec["truncated"]) == \
        (pytest.approx(total), agent_turns, tool_calls, success, truncated)
    return actions


def assert_greedy(model, rec: dict, actions: list[int]) -> None:
    """Each sampled id (temperature 0) is the model's most likely token after the episode's ids before it:
    the episode holds the ids the model sampled, on the ids it was given."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([rec["ids"]])).logits[0]  # (T, V)
    positions = torch.tensor(actions)
    assert logits[positions - 1].argmax(-1).tolist() == [rec["ids"][p] for p in actions]


def test_episodes_are_written_whole_as_the_environment_and_sampled_ids_made_them(tmp_path, sft_policy):  # noqa: F811
    """`rlhf generate --env.spec`, in a subprocess, greedy: every written episode replays exactly (messages,
    per-turn rewards, outcome, ids), its agent turns are the model's own greedy tokens on the episode's ids,
    and the printed summary is the mean of the written outcomes."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agent_envs import Countdown

    out = tmp_path / "episodes.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-m", "rlhf", "generate", "--model", sft_policy, "--env.spec", COUNTDOWN,
                        "--prompts.train", countdown_rows(tmp_path / "rows.jsonl"), "--samples_per_prompt", "2",
                        "--temperature", "0", *ENV_LIMITS, "--output", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    records = read(out)
    assert [(r["row"]["turns"], r["sample"]) for r in records] == [(n, k) for n in (1, 2, 3, 6) for k in (0, 1)]
    assert len({r["seed"] for r in records}) == 8  # each episode its own seed
    tok, model = AutoTokenizer.from_pretrained(sft_policy), AutoModelForCausalLM.from_pretrained(sft_policy)
    for rec in records:
        assert_greedy(model, rec, replay_episode(rec, tok, Countdown(), 4, 64))
    # the episodes cover what the replay checks: several turns, tool and user replies, both outcomes, cut ones
    assert max(r["turns"] for r in records) >= 3 and any(r["tool_calls"] for r in records)
    assert {r["success"] for r in records} == {True, False} and any(r["truncated"] for r in records)
    n = len(records)
    mean = lambda key: sum(float(r[key]) for r in records) / n  # noqa: E731
    assert (f"8 episodes (4 rows x 2) in {COUNTDOWN}: success rate {mean('success'):.3f}, mean return "
            f"{mean('return'):.4f}, per episode {mean('turns'):.2f} turns, {mean('tool_calls'):.2f} tool calls, "
            f"{mean('tokens'):.1f} tokens; truncated {mean('truncated'):.2f}") in p.stdout


@pytest.mark.parametrize("case", ["spec", "class", "reward too", "row"])
def test_bad_env_inputs_exit_2_in_one_line(case, tmp_path, sft_policy, capsys, monkeypatch):  # noqa: F811
    """Refused before a model loads (in this process), or, for a row the environment rejects, after it (in a
    subprocess, as the user sees it: no bar or warning around the line)."""
    import subprocess
    import sys

    monkeypatch.chdir(REPO)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"turns": 2}) + "\n" + json.dumps({"x": 1}) + "\n")
    args = {"spec": ["--env.spec", "tests/no_such_file.py:Countdown"],
            "class": ["--env.spec", "tests/agent_envs.py:Nope"],
            "reward too": ["--env.spec", COUNTDOWN, "--reward.spec", "tests/rewards.py:digit_fraction"],
            "row": ["--env.spec", COUNTDOWN]}[case]
    expected = {"spec": "no_such_file.py", "class": "'Nope' does not exist",
                "reward too": "--reward.spec: with --env.spec",
                "row": "row 1: environment 'tests/agent_envs.py:Countdown' cannot start an episode from"}[case]
    out = tmp_path / "out" / "g.jsonl"
    argv = ["generate", "--model", sft_policy, "--prompts.train", str(rows), *args, "--output", str(out)]
    if case == "row":
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
        p = subprocess.run([sys.executable, "-m", "rlhf", *argv], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600)
        code, err = p.returncode, p.stderr.strip().splitlines()
    else:
        code, err = cli.main(argv), capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expected in err[0], err
    assert not out.parent.exists()
