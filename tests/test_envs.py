"""Multi-turn environments: spec loading, token-in-token-out episodes, limits, resume, the built-in
environments and their data, SFT on tool-using demonstrations, and real episodes of the tiny model."""

import json
import random
import re

import pytest
import torch
from conftest import sft_config

from policies import tiny
from rlhf.data.agent_tasks import calc_instances, guess_instances
from rlhf.data.sources import BUILTIN_DIR, read_jsonl
from rlhf.envs.calculator import Calculator, render
from rlhf.envs.config import EnvConfig
from rlhf.envs.episodes import EnvPool, run_episodes
from rlhf.envs.guess_number import GuessNumber
from rlhf.envs.interface import StepResult, load_environment_class, make_environment
from rlhf.envs.turns import ChatTurns
from rlhf.errors import UserError

CALC = EnvConfig(spec="rlhf.envs.calculator:Calculator", max_turns=3, max_total_tokens=96)
GUESS = EnvConfig(spec="rlhf.envs.guess_number:GuessNumber", max_turns=6, max_total_tokens=128)


@pytest.fixture(scope="module")
def tok():
    return tiny.load_tokenizer()


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def scripted(tok, scripts: list[list[str]]):
    """A sample_fn replaying fixed agent texts: `scripts[i]` holds episode i's turns, exactly as many as it
    takes (so the live episodes are those with text left), each canonically encoded with EOS, with
    logprob -(k + 1) / 100 at its k-th token so that their alignment shows."""
    queues = [list(s) for s in scripts]
    calls = []

    def sample(prompts):
        calls.append(len(prompts))
        ids, lps = [], []
        for q in [q for q in queues if q][:len(prompts)]:
            s = encode(tok, q.pop(0)) + [tok.eos_token_id]
            ids.append(s)
            lps.append([-(k + 1) / 100 for k in range(len(s))])
        return ids, lps

    sample.calls = calls
    return sample


def question_row(question: str) -> dict:
    a, b = re.fullmatch(r"What is (\d+) \* (\d+)\?", question).groups()
    return {"a": int(a), "b": int(b)}


def test_pieces_equal_the_template_of_the_whole_conversation(tok):
    """Every demonstration (tool turns, user hints): the first messages' prompt, the assistant texts'
    canonical ids with EOS and the encoded replies concatenate to exactly the template's ids."""
    turns = ChatTurns(tok)
    assert turns.reply_text([{"role": "tool", "content": "10063"}]) == "\n<|tool|>\n10063<|end|>\n<|assistant|>\n"
    count = 0
    for name in ("calc_sft", "guess_sft"):
        for row in read_jsonl(BUILTIN_DIR / f"{name}.jsonl"):
            msgs = row["messages"]
            ids, i = turns.prompt_ids(msgs[:1]), 1
            while i < len(msgs):
                ids += encode(tok, msgs[i]["content"]) + [tok.eos_token_id]
                j = i + 1
                while j < len(msgs) and msgs[j]["role"] != "assistant":
                    j += 1
                if j > i + 1:
                    ids += turns.reply_ids(msgs[i + 1:j])
                i = j
            whole = tok.apply_chat_template(msgs, tokenize=True)["input_ids"]
            assert ids == whole[:-1]  # the template's "\n" after the last EOS is never sampled
            count += 1
    assert count == 1393 + 200  # calculator (every (a, b) not held out) and guessing demonstrations


def test_retokenising_the_decoded_conversation_would_differ_and_ours_keeps_the_sampled_ids(tok):
    """The agent samples `calc` as c+a+l+c and `dog` as do+g: decoding and re-applying the template gives the
    tokenizer's own ids (c+al+c, dog), so the trained tokens would not be the sampled ones. Ours are."""
    call = [encode(tok, ch)[0] for ch in "calc"] + encode(tok, " 347 * 29")
    answer = encode(tok, "do") + encode(tok, "g")
    assert encode(tok, "dog") != answer and encode(tok, "calc 347 * 29") != call  # non-canonical on purpose
    sampled = [call + [tok.eos_token_id], answer + [tok.eos_token_id]]

    def sample(prompts):
        s = sampled.pop(0)
        return [s], [[-0.5] * len(s)]

    ep = run_episodes([Calculator()], [{"a": 347, "b": 29}], tok, sample, CALC, seed=0)
    ids, actions = ep.ids[0], ep.action_mask[0]
    assert ids[actions].tolist() == call + [tok.eos_token_id] + answer + [tok.eos_token_id]
    assert ep.transcripts[0][2] == {"role": "tool", "content": "1 0 0 6 3"}  # the environment read the call
    assert ep.tool_calls.tolist() == [1] and ep.success.tolist() == [False]
    retemplated = tok.apply_chat_template(ep.transcripts[0], tokenize=True)["input_ids"][:-1]
    assert retemplated != ids[:ep.tokens[0]].tolist()  # what a decode-and-re-template loop would train on
    assert tok.decode(retemplated) == tok.decode(ids[:ep.tokens[0]])  # the same text: only the tokens differ


def test_episode_layout_masks_rewards_and_logprobs(tok):
    """Two calculator episodes, one that calls the tool (2 turns) and one that guesses (1 turn)."""
    sample = scripted(tok, [["calc 347 * 29", "1 0 0 6 3"], ["5"]])
    ep = run_episodes([Calculator(), Calculator()], [{"a": 347, "b": 29}, {"a": 100, "b": 10}], tok, sample, CALC, 0)
    assert sample.calls == [2, 1]  # only the live episode is sampled on the second turn
    turns = ChatTurns(tok)
    prompt = turns.prompt_ids([{"role": "user", "content": "What is 347 * 29?"}])
    call, ans = encode(tok, "calc 347 * 29") + [2], encode(tok, "1 0 0 6 3") + [2]
    reply = turns.reply_ids([{"role": "tool", "content": "1 0 0 6 3"}])
    expected = prompt + call + reply + ans
    n = len(expected)
    assert ep.ids[0, :n].tolist() == expected and ep.tokens[0] == n
    assert (ep.ids[0, n:] == tok.pad_token_id).all() and ep.attention_mask[0].sum() == n
    assert ep.prompt_lengths.tolist()[0] == len(prompt)
    mask = [0] * len(prompt) + [1] * len(call) + [0] * len(reply) + [1] * len(ans)
    assert ep.action_mask[0, :n].int().tolist() == mask and not ep.action_mask[0, n:].any()
    lps = [0.0] * len(prompt) + [-(k + 1) / 100 for k in range(len(call))] + [0.0] * len(reply) + \
          [-(k + 1) / 100 for k in range(len(ans))]
    assert torch.allclose(ep.logprobs[0, :n], torch.tensor(lps))
    ends = [len(prompt) + len(call) - 1, n - 1]
    assert ep.turn_ends[0].nonzero().flatten().tolist() == ends
    assert ep.turn_rewards[0, ends].tolist() == [0.0, 1.0] and ep.turn_rewards[0].sum() == 1.0
    assert ep.returns.tolist() == [1.0, 0.0] and ep.success.tolist() == [True, False]
    assert ep.turns.tolist() == [2, 1] and ep.tool_calls.tolist() == [1, 0] and ep.truncated.tolist() == [False, False]
    assert ep.transcripts[1] == [{"role": "user", "content": "What is 100 * 10?"}, {"role": "assistant", "content": "5"}]


class CountingGuess(GuessNumber):
    steps = 0

    def step(self, agent_message):
        CountingGuess.steps += 1
        return super().step(agent_message)


def test_limits_cut_episodes(tok):
    row = {"high": 16, "target": 11}
    # max_turns: two wrong guesses and the game is not over
    ep = run_episodes([GuessNumber()], [row], tok, scripted(tok, [["8", "12", "10"]]),
                      EnvConfig(spec="g", max_turns=2, max_total_tokens=128), 0)
    assert ep.truncated.tolist() == [True] and ep.turns.tolist() == [2] and ep.turn_ends.sum() == 2
    assert ep.ids[0, ep.tokens[0] - 1] == tok.eos_token_id  # the last hint is not appended: nothing answers it
    # the environment's own end is not a cut: 5 wrong guesses
    ep = run_episodes([GuessNumber()], [row], tok, scripted(tok, [["1", "2", "3", "4", "5"]]), GUESS, 0)
    assert ep.truncated.tolist() == [False] and ep.turns.tolist() == [5] and ep.success.tolist() == [False]
    # max_total_tokens: the sampled ids past it are dropped, the reply unseen by the environment
    CountingGuess.steps = 0
    prompt = len(ChatTurns(tok).prompt_ids(GuessNumber().reset(row, 0)))
    ep = run_episodes([CountingGuess()], [row], tok, scripted(tok, [["8 9 10 11 12 13"]]),
                      EnvConfig(spec="g", max_total_tokens=prompt + 3), 0)
    assert ep.tokens.tolist() == [prompt + 3] and ep.action_mask.sum() == 3 and ep.truncated.tolist() == [True]
    assert CountingGuess.steps == 0 and ep.turn_ends[0, prompt + 2]
    # a reply without EOS (the engine's per-turn limit) ends the episode; ids after an EOS are dropped
    eos = tok.eos_token_id
    ep = run_episodes([CountingGuess(), CountingGuess()], [row, row], tok,
                      lambda p: ([encode(tok, "8 9"), encode(tok, "11") + [eos, 5, 6]], [[0.0] * 2, [0.0] * 4]),
                      GUESS, 0)
    assert ep.truncated.tolist() == [True, False] and ep.success.tolist() == [False, True]
    assert ep.action_mask.sum(1).tolist() == [2, 2] and CountingGuess.steps == 1
    with pytest.raises(UserError, match="row 0: the first messages take .* env.max_total_tokens=5"):
        run_episodes([GuessNumber()], [row], tok, scripted(tok, [["1"]]), EnvConfig(spec="g", max_total_tokens=5), 0)


def test_builtin_environments():
    env = Calculator()
    assert env.reset({"a": 12, "b": 34}, 0) == [{"role": "user", "content": "What is 12 * 34?"}]
    r = env.step("calc 12 * 34")
    assert r.reply == [{"role": "tool", "content": "4 0 8"}] and not r.done and r.info == {"tool_calls": 1}
    assert env.step("calc 7 + 5").reply[0]["content"] == "1 2"
    assert env.step(" 4 0 8 ") == StepResult(reward=1.0, done=True, info={"success": True})
    assert env.step("4 0 9").reward == 0.0 and env.step("408").reward == 0.0  # written as the tool writes it
    plain = Calculator(spaced_digits=False)
    plain.reset({"a": 12, "b": 34}, 0)
    assert plain.step("calc 12 * 34").reply[0]["content"] == "408" and plain.step("408").reward == 1.0
    assert Calculator(reward_per_call=0.1).step("calc 1 * 2").reward == 0.1
    with pytest.raises(UserError, match="integers 'a' and 'b'"):
        env.reset({"question": "x"}, 0)

    game = GuessNumber(max_guesses=3)
    game.reset({"high": 16, "target": 11}, 0)
    assert [game.step(g).reply[0]["content"] for g in ("8", "12")] == ["higher", "lower"]
    last = game.step("10")  # the third guess: out of guesses
    assert last.done and last.reward == 0.0 and not last.info["success"]
    game.reset({"high": 16, "target": 11}, 0)
    assert game.step("ten").reply[0]["content"] == "say a number from 1 to 16"
    assert game.step("11") == StepResult(reply=[{"role": "user", "content": "correct"}], reward=1.0, done=True,
                                         info={"success": True})
    with pytest.raises(UserError, match="target 17 is not in 1..16"):
        game.reset({"high": 16, "target": 17}, 0)


def test_environment_spec_loading(tmp_path, monkeypatch):
    assert load_environment_class("rlhf.envs.guess_number:GuessNumber") is GuessNumber
    (tmp_path / "my_env.py").write_text(
        "from rlhf.envs.interface import StepResult\n"
        "class Echo:\n"
        "    def __init__(self, word='hi'):\n        self.word = word\n"
        "    def reset(self, row, seed):\n        return [{'role': 'user', 'content': self.word}]\n"
        "    def step(self, message):\n        return StepResult(done=True, reward=float(message == self.word))\n"
        "class NoStep:\n    def reset(self, row, seed):\n        return []\n"
        "def helper():\n    pass\n")
    spec = f"{tmp_path / 'my_env.py'}:Echo"
    env = make_environment(load_environment_class(spec), EnvConfig(spec=spec, options={"word": "yo"}))
    assert env.reset({}, 0) == [{"role": "user", "content": "yo"}]
    monkeypatch.chdir(tmp_path)  # module:Class resolves next to the user's files, as reward functions do
    assert load_environment_class("my_env:Echo").__name__ == "Echo"
    for bad, expect in [
        (f"{tmp_path / 'my_env.py'}:Nope", r"'Nope' does not exist \(classes there: Echo, NoStep, StepResult\)"),
        (f"{tmp_path / 'my_env.py'}:helper", "'helper' is not a class"),
        (f"{tmp_path / 'my_env.py'}:NoStep", "class NoStep has no step method"),
        (f"{tmp_path / 'missing.py'}:Echo", "file .*missing.py' does not exist"),
        ("no_such_module:Env", "environment 'no_such_module:Env': no module named 'no_such_module'"),
        ("just_a_name", "expected module:name or path/to/file.py:name"),
    ]:
        with pytest.raises(UserError, match=expect) as e:
            load_environment_class(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"env.options \{'colour': 1\} do not fit environment"):
        make_environment(GuessNumber, EnvConfig(spec="g", options={"colour": 1}))
    with pytest.raises(UserError, match="env.spec is empty"):
        EnvPool(EnvConfig(), run_seed=0)


class BadReply:
    def reset(self, row, seed):
        return [{"role": "user", "content": "go"}]

    def step(self, message):
        return StepResult(reply=[{"role": "assistant", "content": "I speak for the agent"}])


def test_malformed_step_output_is_a_one_line_error(tok):
    with pytest.raises(UserError, match="step\\(\\) reply: expected a list of \\{role: one of tool, user, system"):
        run_episodes([BadReply()], [{}], tok, scripted(tok, [["x"]]), EnvConfig(spec="bad"), 0)


class SeededGuess(GuessNumber):
    """The hidden number comes from the episode's seed: a resumed run must draw the same ones."""

    def reset(self, row, seed):
        return super().reset({"high": 16, "target": random.Random(seed).randint(1, 16)}, seed)


def test_env_pool_resumes_the_episode_seed_stream_exactly(tok, tmp_path):
    cfg = EnvConfig(spec=f"{__file__}:SeededGuess", max_turns=1, max_total_tokens=64)
    sample = lambda p: ([encode(tok, "8") + [2]] * len(p), [[0.0, 0.0]] * len(p))

    def targets(pool):
        pool.run([{}] * 4, tok, sample)
        return [e.target for e in pool.instances]

    straight = EnvPool(cfg, run_seed=3)
    first, second = targets(straight), targets(straight)
    assert first != second  # each batch draws new seeds
    resumed = EnvPool(cfg, run_seed=3)
    targets(resumed)
    state = json.loads(json.dumps(resumed.state_dict()))  # it survives a JSON checkpoint
    fresh = EnvPool(cfg, run_seed=99)
    fresh.load_state_dict(state)
    assert targets(fresh) == second
    assert targets(EnvPool(EnvConfig(**{**cfg.__dict__, "seed": 3}), run_seed=99)) == first  # env.seed wins


def test_held_out_episodes_are_the_same_on_any_number_of_processes(tok, tmp_path):
    """Each held-out row's episodes get the seeds a single process gives them, whichever rank plays them."""
    from types import SimpleNamespace

    from rlhf.evaluation.heldout import EvalConfig, HeldOutEval
    from rlhf.generation.sampling import Sampling

    cfg = EvalConfig(prompts="builtin:calc_eval", max_prompts=5, samples_per_prompt=2)

    def played(rank, world):
        acc = SimpleNamespace(process_index=rank, num_processes=world)
        ev = HeldOutEval(cfg, None, Sampling(1.0, 1.0, 8, 2), 64, tok, acc, tmp_path, env=CALC)
        return [(row["a"], row["b"], s) for row, s in zip(ev.prompts, ev.episode_seeds(7))]

    one = played(0, 1)
    assert len(one) == 10 and len({s for *_, s in one}) == 10
    assert sorted(played(0, 2) + played(1, 2)) == sorted(one)


def test_each_rank_has_a_seed_stream_of_its_own(tok):
    """Two processes of a run draw different episode seeds (one stream would give both ranks the same
    games); rank 0's stream is the one-process run's; and each stream is a function of seed and rank."""
    cfg = EnvConfig(spec=f"{__file__}:SeededGuess", max_turns=1, max_total_tokens=64)
    sample = lambda p: ([encode(tok, "8") + [2]] * len(p), [[0.0, 0.0]] * len(p))
    seeds = lambda pool: [pool.run([{}] * 4, tok, sample).seeds for _ in range(2)]  # noqa: E731
    one, rank0, rank1 = seeds(EnvPool(cfg, 3)), seeds(EnvPool(cfg, 3, rank=0)), seeds(EnvPool(cfg, 3, rank=1))
    assert rank0 == one and rank1 == seeds(EnvPool(cfg, 3, rank=1))
    assert not set(sum(rank0, [])) & set(sum(rank1, []))
    assert seeds(EnvPool(cfg, 4, rank=1)) != rank1


def test_data_files_are_held_out_small_and_in_the_tokenizer(tok):
    demos, train, heldout = calc_instances(seed=1)
    assert read_jsonl(BUILTIN_DIR / "calc_train.jsonl") == train and read_jsonl(BUILTIN_DIR / "calc_eval.jsonl") == heldout
    key = lambda r: (r["a"], r["b"])
    assert not {key(r) for r in heldout} & ({key(r) for r in train} | {key(r) for r in demos})
    gtrain, gheld = guess_instances(seed=2)
    assert read_jsonl(BUILTIN_DIR / "guess_eval.jsonl") == gheld
    assert not {(r["high"], r["target"]) for r in gheld} & {(r["high"], r["target"]) for r in gtrain}
    guess_demos = read_jsonl(BUILTIN_DIR / "guess_sft.jsonl")
    assert {m["messages"][0]["content"] for m in guess_demos} <= {f"Guess my number from 1 to {h}." for h in range(8, 25)}
    calc_demos = read_jsonl(BUILTIN_DIR / "calc_sft.jsonl")
    calls = sum(m["messages"][1]["content"].startswith("calc ") for m in calc_demos)
    assert 0.4 < calls / len(calc_demos) < 0.6  # the tool used only about half of the time: room above SFT
    products = [question_row(m["messages"][0]["content"]) for m in calc_demos]
    solved = sum(m["messages"][-1]["content"] == render(p["a"] * p["b"]) for m, p in zip(calc_demos, products))
    assert solved == calls  # only the tool's answers are right
    size = sum((BUILTIN_DIR / f"{t}_{s}.jsonl").stat().st_size for t in ("calc", "guess") for s in ("sft", "train", "eval"))
    assert size < 400_000
    for m in (x for d in calc_demos + guess_demos for x in d["messages"]):
        assert tok.decode(encode(tok, m["content"])) == m["content"]


def test_sft_loss_mask_is_exactly_the_assistant_turns_of_a_tool_demo(tmp_path, tok):
    """TRL's assistant-only loss on a tool-using demonstration: the labelled tokens are those the agent
    would sample in the environment (the action mask of the same episode replayed), nothing of the tool turn."""
    from rlhf.stages import sft

    demo = next(r for r in read_jsonl(BUILTIN_DIR / "calc_sft.jsonl") if len(r["messages"]) == 4)
    (tmp_path / "d.jsonl").write_text(json.dumps(demo) + "\n")
    trainer, _ = sft.build(sft_config(tmp_path, "--data.train", str(tmp_path / "d.jsonl"),
                                      "--data.validation_split", "0", "--data.max_samples", "1"))
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    msgs = demo["messages"]
    replay = scripted(tok, [[msgs[1]["content"], msgs[3]["content"]]])
    ep = run_episodes([Calculator()], [question_row(msgs[0]["content"])], tok, replay, CALC, 0)
    n = int(ep.tokens[0])
    assert ids[:n].tolist() == ep.ids[0, :n].tolist() and ids[n:].tolist() == encode(tok, "\n")
    assert (labels != -100)[:n].tolist() == ep.action_mask[0, :n].tolist() and (labels[n:] == -100).all()
    assert tok.decode(ids[labels != -100]) == f"{msgs[1]['content']}<|end|>{msgs[3]['content']}<|end|>"


def hf_sample_fn(model, tokenizer, max_new_tokens: int):
    """A sample_fn from HF generate: pure sampling (temperature 1, no top-k/top-p), each prompt's ids up to
    its first EOS and their logprobs from the raw logits."""
    def sample(prompts):
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=max_new_tokens, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = out.sequences[:, width:]  # (B, A)
        logprobs = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1)  # (B, A, V)
        logprobs = logprobs.gather(-1, new.unsqueeze(-1)).squeeze(-1)  # (B, A)
        sampled, lps = [], []
        for row, lp in zip(new.tolist(), logprobs.tolist()):
            end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
            sampled.append(row[:end])
            lps.append(lp[:end])
        return sampled, lps
    return sample


@pytest.fixture(scope="module")
def sft_calc_model(tmp_path_factory):
    """The tiny model after a short SFT on the calculator demonstrations (its metrics with it)."""
    from rlhf.stages import sft

    out = tmp_path_factory.mktemp("sft_calc")
    cfg = sft_config(out, "--data.train", "builtin:calc_sft", "--data.max_samples", "400", "--peft.method", "full",
                     "--train.max_steps", "40", "--train.eval_steps", "40", "--train.per_device_train_batch_size", "16",
                     "--train.learning_rate", "3e-3", "--data.validation_split", "0.1")
    metrics = sft.main(cfg)
    return cfg.output_dir, metrics


def test_short_sft_on_calculator_demonstrations_lowers_the_loss(sft_calc_model):
    _, metrics = sft_calc_model
    assert metrics["eval_loss_after"] < 0.7 * metrics["eval_loss_before"]


@pytest.mark.parametrize("env_cls,cfg,data", [(Calculator, CALC, "calc_eval"), (GuessNumber, GUESS, "guess_eval")])
def test_real_episodes_of_the_tiny_model(sft_calc_model, tok, env_cls, cfg, data):
    """HF-generated episodes: the trained-on ids are the sampled ones (the model's own logprobs of the
    episode ids, recomputed in one forward pass, equal the sampler's on every agent token), the masks
    and rewards agree with the transcripts. (After 40 SFT steps the model seldom calls the calculator;
    the guessing game, which answers any wrong reply, gives the multi-turn episodes.)"""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sft_calc_model[0]).eval()
    torch.manual_seed(0)
    rows = read_jsonl(BUILTIN_DIR / f"{data}.jsonl")[:8]
    with torch.no_grad():
        ep = run_episodes([env_cls() for _ in rows], rows, tok, hf_sample_fn(model, tok, 12), cfg, seed=0)
        logits = model(input_ids=ep.ids, attention_mask=ep.attention_mask).logits  # (B, T, V)
    recomputed = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ep.ids[:, 1:, None])[..., 0]  # (B, T-1)
    actions = ep.action_mask[:, 1:]
    assert not ep.action_mask[torch.arange(len(rows)), ep.prompt_lengths - 1].any()
    assert torch.allclose(recomputed[actions], ep.logprobs[:, 1:][actions], atol=1e-4)
    assert (ep.logprobs[~ep.action_mask] == 0).all()
    turns = ChatTurns(tok)
    for b, transcript in enumerate(ep.transcripts):
        agent = [m["content"] for m in transcript if m["role"] == "assistant"]
        assert len(agent) == ep.turns[b] == ep.turn_ends[b].sum()
        # each agent turn's tokens decode to its transcript text (+ EOS unless cut)
        runs = torch.tensor_split(ep.ids[b][ep.action_mask[b]], (ep.turn_ends[b][ep.action_mask[b]].nonzero()[:-1, 0] + 1).tolist())
        for text, run in zip(agent, runs):
            stopped = run[-1] == tok.eos_token_id
            assert tok.decode(run[:-1] if stopped else run) == text
        # environment tokens: the encoded replies, exactly
        env_ids = ep.ids[b, ep.prompt_lengths[b]:ep.tokens[b]][~ep.action_mask[b, ep.prompt_lengths[b]:ep.tokens[b]]]
        replies, k = [], 1
        while k < len(transcript):
            j = k + 1
            while j < len(transcript) and transcript[j]["role"] != "assistant":
                j += 1
            if j < len(transcript):
                replies += turns.reply_ids(transcript[k + 1:j])
            k = j
        assert env_ids.tolist() == replies
        assert ep.returns[b] == float(ep.success[b]) == ep.turn_rewards[b].sum()
    if env_cls is GuessNumber:
        assert ep.turns.max() >= 2  # multi-turn episodes happened


def test_templates_that_cannot_grow_by_concatenation_are_refused(tok):
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(tiny.TOKENIZER_DIR)
    other.chat_template = tok.chat_template.replace("message['content'] + '<|end|>'", "message['content'] + '\\n'")
    with pytest.raises(UserError, match="does not end an assistant turn with EOS '<\\|end\\|>'"):
        ChatTurns(other)
    other.chat_template = "{{- messages | length }}" + tok.chat_template  # earlier text depends on later turns
    with pytest.raises(UserError, match="not append-only"):
        ChatTurns(other).reply_ids([{"role": "user", "content": "higher"}])


def test_env_config_from_yaml_and_its_domains(tmp_path):
    from rlhf import config
    from rlhf.validate import validate

    (tmp_path / "env.yaml").write_text("spec: rlhf.envs.guess_number:GuessNumber\noptions: {max_guesses: 3}\n"
                                       "max_turns: 5\n")
    data, lines = config.read_yaml(str(tmp_path / "env.yaml"))
    cfg = config.from_dict(EnvConfig, data, "env.yaml", lines)
    assert cfg.options == {"max_guesses": 3} and cfg.max_turns == 5 and cfg.max_total_tokens == 256
    pool = EnvPool(cfg, run_seed=0)
    assert pool.environments(2)[1].max_guesses == 3
    validate(cfg)
    for field, value in (("max_turns", 0), ("max_total_tokens", -1)):
        with pytest.raises(UserError, match=f"{field} must be a positive integer"):
            validate(EnvConfig(**{field: value}))
