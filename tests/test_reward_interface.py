"""The reward interface (reward/interface.py): encoding, batching, labels, normalisation, functions, errors."""

import pytest
import torch

from policies import tiny
from policies.config import ModelConfig
from reward import FunctionReward, RewardError, load_reward
from reward import models as rm

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse the word cat."}]


@pytest.fixture(scope="module")
def tok():
    return tiny.load_tokenizer()


def save_scorer(path, labels=None, multi_label=False, **info):
    """A random-init tiny sequence classifier saved like `rlhf reward` / `rlhf classifier` save theirs."""
    from policies import models

    base = models.materialize(ModelConfig(), path / "base", seed=3)
    tokenizer = tiny.load_tokenizer()
    extra = {}
    if labels:
        extra = dict(problem_type="multi_label_classification" if multi_label else "single_label_classification",
                     id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    model = rm.load_sequence_classifier(base, ModelConfig(), len(labels or [0]), tokenizer.pad_token_id, **extra)
    out = path / "scorer"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    kind = "classifier" if labels else "preference"
    rm.write_info(out, {"kind": kind, "labels": labels, "problem_type": extra.get("problem_type"),
                        "max_length": 64, **info})
    return out, model.eval()


def test_encode_uses_the_chat_template_and_cuts_the_prompt_not_the_reply(tok):
    ids = rm.encode(tok, PROMPT, "tac")
    text = tok.decode(ids)
    assert text == tok.apply_chat_template(PROMPT + [{"role": "assistant", "content": "tac"}], tokenize=False)
    assert text.endswith("<|assistant|>\ntac<|end|>\n")
    cut = rm.encode(tok, PROMPT, "tac", max_length=8)
    # the end (the reply) survives, and the leading special token (here the template's <|system|>)
    assert len(cut) == 8 and cut == ids[:1] + ids[-7:]
    long_text = rm.encode_text(tok, "cat dog sun moon tree bird fish", max_length=3)
    assert long_text == tok("cat dog sun moon tree bird fish")["input_ids"][:3]


def test_encode_keeps_a_leading_special_token():
    assert rm._cut([101, 5, 6, 7, 102], 3, {101, 102}) == [101, 7, 102]
    assert rm._cut([5, 6, 7], 2, {101}) == [6, 7]


def test_preference_scores_batched_equal_one_by_one_and_normalize(tmp_path):
    out, model = save_scorer(tmp_path, normalization={"mean": 0.5, "std": 2.0, "n": 10})
    reward = load_reward(str(out), batch_size=3)
    assert reward.kind == "preference" and reward.max_length == 64
    prompts = [PROMPT, "What is 2 plus 3?", PROMPT, [{"role": "user", "content": "Sort the letters b a."}]]
    responses = ["tac", "5", "a much longer reply that needs padding in a batch", "a b"]
    scores = reward.score(prompts, responses)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    one_by_one = torch.cat([load_reward(str(out), batch_size=1).score([p], [r]) for p, r in zip(prompts, responses)])
    torch.testing.assert_close(scores, one_by_one, atol=1e-5, rtol=1e-5)
    # the same as the model on the encoded conversation
    ids = torch.tensor([rm.encode(tiny.load_tokenizer(), PROMPT, "tac", 64)])
    with torch.no_grad():
        assert scores[0].item() == pytest.approx(model(input_ids=ids).logits[0, 0].item(), abs=1e-5)
    torch.testing.assert_close(reward.score(prompts, responses, normalize=True), (scores - 0.5) / 2.0)


def test_classifier_reward_labels_negation_and_output(tmp_path):
    out, model = save_scorer(tmp_path, labels=["toxic", "insult"], multi_label=True, reward_label="not_toxic",
                             normalization={"probability": {"toxic": [0.4, 0.1], "insult": [0.5, 0.2]},
                                            "logit": {"toxic": [-0.3, 1.5], "insult": [0.0, 1.0]}})
    texts = ["you are nice", "cat dog"]
    ids, mask = rm.pad_batch([rm.encode_text(tiny.load_tokenizer(), t, 64) for t in texts], 0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    prompts = [PROMPT, PROMPT]
    default = load_reward(str(out))  # reward_label from reward_info: not_toxic
    torch.testing.assert_close(default.score(prompts, texts), 1 - torch.sigmoid(logits[:, 0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(load_reward(str(out), label="insult").score(prompts, texts),
                               torch.sigmoid(logits[:, 1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(load_reward(str(out), label=1, output="logit").score(prompts, texts),
                               logits[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(load_reward(str(out), label="not_toxic", output="logit").score(prompts, texts),
                               -logits[:, 0], atol=1e-5, rtol=0)
    # normalisation: the stored stats of the label, flipped for not_
    torch.testing.assert_close(default.score(prompts, texts, normalize=True),
                               ((1 - torch.sigmoid(logits[:, 0])) - 0.6) / 0.1, atol=1e-4, rtol=0)
    # the prompt is not part of a classifier's input
    other_prompts = [[{"role": "user", "content": "x"}]] * 2
    torch.testing.assert_close(default.score(other_prompts, texts), default.score(prompts, texts))
    with pytest.raises(RewardError, match="unknown label 'nice'.*toxic, insult"):
        load_reward(str(out), label="nice")
    with pytest.raises(RewardError, match="out of range"):
        load_reward(str(out), label=2)


def test_single_label_classifier_softmax_and_errors(tmp_path):
    out, model = save_scorer(tmp_path, labels=["clean", "toxic"])
    texts = ["hello there"]
    ids = torch.tensor([rm.encode_text(tiny.load_tokenizer(), texts[0], 64)])
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=ids).logits, -1)
    clean = load_reward(str(out), label="clean").score([PROMPT], texts)
    assert clean.item() == pytest.approx(probs[0, 0].item(), abs=1e-5)
    assert load_reward(str(out), label="not_toxic").score([PROMPT], texts).item() == pytest.approx(
        1 - probs[0, 1].item(), abs=1e-5)
    with pytest.raises(RewardError, match="choose the label"):
        load_reward(str(out))
    with pytest.raises(RewardError, match="multi-label"):
        load_reward(str(out), label="not_toxic", output="logit")
    with pytest.raises(RewardError, match="no normalisation statistics"):
        load_reward(str(out), label="clean").score([PROMPT], texts, normalize=True)
    with pytest.raises(RewardError, match="is a classifier reward.*not preference"):
        load_reward(str(out), kind="preference")


def test_function_rewards(tmp_path, monkeypatch):
    f = load_reward("reward.examples:exact_answer")
    assert isinstance(f, FunctionReward) and f.kind == "function" and f.normalization is None
    prompts = [[{"role": "user", "content": "Reverse the word cat."}],
               [{"role": "user", "content": "What is 2 plus 3?"}]]
    assert f.score(prompts, ["tac", "6"]).tolist() == [1.0, 0.0]

    (tmp_path / "my_rewards.py").write_text(
        "import torch\n"
        "def length(prompts, responses):\n    return torch.tensor([float(len(r)) for r in responses])\n"
        "def short(prompts, responses):\n    return [1.0]\n"
        "def nan(prompts, responses):\n    return [float('nan')] * len(responses)\n"
        "def one_arg(prompts):\n    return []\n"
        "VALUE = 3\n")
    by_path = load_reward(f"{tmp_path}/my_rewards.py:length")
    assert by_path.score(prompts, ["ab", "abcd"]).tolist() == [2.0, 4.0]
    monkeypatch.chdir(tmp_path)  # module:function finds modules in the working directory
    assert load_reward("my_rewards:length").score(prompts, ["a", ""]).tolist() == [1.0, 0.0]

    with pytest.raises(RewardError, match="returned 1 values for 2 responses"):
        load_reward("my_rewards:short").score(prompts, ["a", "b"])
    # NaN is a number: returned as it is, for PPO to count as 0 with a warning (evaluations refuse it)
    assert torch.isnan(load_reward("my_rewards:nan").score(prompts, ["a", "b"])).all()
    with pytest.raises(RewardError, match="must accept \\(prompts, responses\\)"):
        load_reward("my_rewards:one_arg")
    with pytest.raises(RewardError, match="'missing' does not exist.*functions there: length, nan, one_arg, short"):
        load_reward("my_rewards:missing")
    with pytest.raises(RewardError, match="'VALUE' is not callable"):
        load_reward("my_rewards:VALUE")
    with pytest.raises(RewardError, match="no module named 'nope'"):
        load_reward("nope.rewards:fn")
    with pytest.raises(RewardError, match="file 'gone.py' does not exist"):
        load_reward("gone.py:fn")
    with pytest.raises(RewardError, match="no normalisation statistics"):
        load_reward("my_rewards:length").score(prompts, ["a", "b"], normalize=True)
    with pytest.raises(RewardError, match="2 prompts but 1 responses"):
        f.score(prompts, ["a"])


def test_bad_specs(tmp_path):
    with pytest.raises(RewardError, match="does not exist"):
        load_reward(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RewardError, match="neither reward_info.json, config.json nor adapter_config.json"):
        load_reward(str(tmp_path / "empty"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "reward_info.json").write_text("{not json")
    with pytest.raises(RewardError, match="reward_info.json: malformed JSON"):
        load_reward(str(tmp_path / "broken"))
    out, _ = save_scorer(tmp_path)
    with pytest.raises(RewardError, match="label='x' applies to classifier rewards"):
        load_reward(str(out), label="x")
    with pytest.raises(RewardError, match="kind expects one of"):
        load_reward(str(out), kind="model")
