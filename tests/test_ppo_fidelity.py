"""PPO on the paths a real model takes: what is sampled is what is scored (a model's own generation
config cannot leak into sampling), bf16 full fine-tuning moves its float32 master weights, config-level
attention dropout is off, the critic has its own learning rate and clip, advantages are whitened and
losses weighted over every process, rollouts are trimmed, the reward model runs once per batch, and
the N+ defaults (reward normalisation, missing-EOS penalty, critic from the reward model) hold."""

import json
import os
import shutil

import pytest
import torch
from rewards import DigitReward
from safetensors.torch import load_file
from test_ppo import ppo_config, sft_policy  # noqa: F401  (session fixture)

from rlhf import ppo
from rlhf.errors import UserError
from rlhf.generation import hf_engine
from rlhf.generation.prompts import encode_prompts, left_pad, load_prompts, position_ids
from rlhf.generation.sampling import Sampling
from rlhf.ppo import core, models, rollout
from rlhf.runtime.distributed import set_cpu_threads

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def instruct_like_policy(sft_policy, tmp_path_factory):  # noqa: F811
    """The SFT policy shipped like many instruct models: a generation_config.json with a repetition
    penalty and top-k, and attention dropout in config.json."""
    out = tmp_path_factory.mktemp("instruct") / "policy"
    shutil.copytree(sft_policy, out)
    gen_file = out / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.exists() else {}
    gen_file.write_text(json.dumps({**gen, "repetition_penalty": 1.3, "top_k": 5, "do_sample": True}))
    conf = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**conf, "attention_dropout": 0.5}))
    return str(out)


def _prompts(cfg, tok, n=8):
    q, qm = left_pad(encode_prompts(tok, load_prompts(cfg.data)[:n], 64), tok.pad_token_id)
    return q, qm  # (B, P)


def _stacked_logprobs(out, prompt_len):
    """Logprobs of the generated tokens under the processed scores generate sampled from."""
    tokens = out.sequences[:, prompt_len:]  # (B, A)
    scores = torch.stack(out.scores, 1).float()  # (B, A, V)
    return tokens, torch.log_softmax(scores, -1).gather(-1, tokens[..., None])[..., 0]


def test_sampled_tokens_logprobs_equal_the_trainers(tmp_path, instruct_like_policy):
    T = 0.7
    cfg = ppo_config(tmp_path, instruct_like_policy, "--ppo.temperature", str(T))
    tok, ac, _ = models.build_models(cfg, True)
    ac.eval()
    q, qm = _prompts(cfg, tok)
    gen = ac.generation_model()
    assert gen.get_base_model().generation_config.repetition_penalty == 1.3  # the model ships one

    def trainer_logprobs(responses, entropy=False):
        responses, rmask = core.truncate_after_stop_token(responses, tok.eos_token_id, tok.pad_token_id)
        ids, mask = torch.cat([q, responses], 1), torch.cat([qm, rmask.long()], 1)
        lp, _, _, ent = rollout.forward_rollout(ac, ids, mask, position_ids(mask), responses, q.shape[1], T, 8,
                                                entropy=entropy)
        return (lp, rmask, ent) if entropy else (lp, rmask)  # (B, A)

    torch.manual_seed(0)
    ours, sampled, sampled_entropy = hf_engine.sample(
        gen, q, qm, hf_engine.generation_config(Sampling(T, 1.0, 12, tok.eos_token_id), tok.pad_token_id),
        with_logprobs=True)
    lp, rmask, entropy = trainer_logprobs(ours, entropy=True)
    assert (lp - sampled)[rmask].abs().max() < 1e-4  # on-policy: the trainer scores what was sampled
    assert (entropy - sampled_entropy)[rmask].abs().max() < 1e-4  # and the recorded entropy is the policy's

    # What plain `generate` with our three sampling options did before: the model's own penalty and
    # top-k joined in, and the sampling distribution was another one than the trainer's.
    torch.manual_seed(0)
    out = gen.generate(input_ids=q, attention_mask=qm, do_sample=True, temperature=T, top_p=1.0,
                       max_new_tokens=12, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       output_scores=True, return_dict_in_generate=True)
    theirs_tokens, theirs = _stacked_logprobs(out, q.shape[1])
    lp, rmask = trainer_logprobs(theirs_tokens)
    assert (lp - theirs)[rmask].abs().max() > 1e-3


def test_config_attention_dropout_is_off_in_train_mode(tmp_path, instruct_like_policy):
    for method in ("lora", "full"):
        cfg = ppo_config(tmp_path, instruct_like_policy, "--peft.method", method)
        tok, ac, _ = models.build_models(cfg, True)
        ac.train()
        q, qm = _prompts(cfg, tok, 4)
        with torch.no_grad():
            first, v1 = ac(q, qm, position_ids(qm))
            second, v2 = ac(q, qm, position_ids(qm))
        assert torch.equal(first, second) and torch.equal(v1, v2), method  # PPO's ratio starts at exactly 1


@pytest.fixture
def fresh_accelerator_state():
    """The process-wide accelerate state, reset around a run that needs another mixed precision."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_full_bf16_ppo_moves_every_float32_master_weight(tmp_path, sft_policy, fresh_accelerator_state):  # noqa: F811
    """bf16 compute (autocast) over float32 master weights: at lr 1e-5 (far below bf16's spacing near
    1.0) every trained weight still moves, and the exported policy keeps the float32 masters."""
    before = load_file(f"{sft_policy}/model.safetensors")
    h = ppo.main(ppo_config(tmp_path, sft_policy, "--peft.method", "full", "--model.dtype", "bfloat16",
                            "--ppo.learning_rate", "1e-5", "--ppo.steps", "2"), reward=DigitReward())
    assert all(m["objective/kl"] > -0.05 for m in h)  # bf16 sampling and scoring agree
    after = load_file(tmp_path / "ppo" / "policy" / "model.safetensors")
    layers = [k for k in before if ".layers." in k]  # embeddings: only the rows of tokens seen get gradients
    assert layers and all(after[k].dtype == torch.float32 for k in layers)
    changed = sum((after[k] != before[k]).sum().item() for k in layers)
    assert changed / sum(before[k].numel() for k in layers) > 0.95


def test_critic_has_its_own_learning_rate_and_clip(tmp_path, sft_policy):  # noqa: F811
    def adapters(run):
        pol = load_file(tmp_path / run / "ppo" / "policy" / "adapter_model.safetensors")
        crit = load_file(tmp_path / run / "ppo" / "critic" / "adapter_model.safetensors")
        moved = lambda w: max(v.abs().max().item() for k, v in w.items() if "lora_B" in k)  # noqa: E731  B starts at 0
        return moved(pol), moved(crit)

    h = ppo.main(ppo_config(tmp_path / "a", sft_policy, "--ppo.critic_learning_rate", "0"), reward=DigitReward())
    assert h[0]["lr_critic"] == 0 and h[0]["lr"] > 0  # (the linear schedule ends at 0)
    assert h[-1]["policy/grad_norm"] > 0 and h[-1]["val/grad_norm"] > 0  # clipped separately, both logged
    pol, crit = adapters("a")
    assert pol > 0 and crit == 0
    ppo.main(ppo_config(tmp_path / "b", sft_policy, "--ppo.learning_rate", "0", "--ppo.critic_learning_rate", "3e-3"),
             reward=DigitReward())
    pol, crit = adapters("b")
    assert pol == 0 and crit > 0


def test_rollouts_are_trimmed_to_the_longest_response(tmp_path, sft_policy, monkeypatch):  # noqa: F811
    widths = []
    real = rollout.forward_rollout

    def spy(ac, ids, mask, pos, responses, *args, **kw):
        widths.append((responses.shape[1], int((mask[:, -responses.shape[1]:]).sum(-1).max())))
        return real(ac, ids, mask, pos, responses, *args, **kw)

    monkeypatch.setattr(rollout, "forward_rollout", spy)
    ppo.main(ppo_config(tmp_path, sft_policy, "--ppo.max_new_tokens", "48", "--ppo.temperature", "0.7"),
             reward=DigitReward())
    assert widths and all(w == longest < 48 for w, longest in widths)  # the SFT policy answers in a few tokens


class CountingReward(DigitReward):
    normalization = (0.25, 0.5)  # stored statistics, like a trained reward model's

    def __init__(self):
        self.calls = 0

    def score(self, prompts, responses, normalize=False):
        self.calls += 1
        return super().score(prompts, responses, normalize)


def test_reward_runs_once_per_batch_and_defaults_normalise_with_its_statistics(tmp_path, sft_policy):  # noqa: F811
    reward = CountingReward()
    h = ppo.main(ppo_config(tmp_path, sft_policy, "--ppo.missing_eos_penalty", "None"), reward=reward)
    assert reward.calls == 2  # one scoring pass per iteration; the stored statistics applied to it
    for m in h:  # reward_normalization: auto -> model
        assert m["objective/scores_normalized"] == pytest.approx((m["objective/scores"] - 0.25) / 0.5, abs=1e-5)
    with pytest.raises(UserError, match="reward_normalization=model: the reward stores no"):
        ppo.main(ppo_config(tmp_path / "b", sft_policy, "--ppo.reward_normalization", "model"), reward=DigitReward())


def _two_ranks(rank: int, port: int, out: str) -> None:
    """One of two gloo processes: whiten its slice of the advantages over both, and take a DDP gradient
    of its token-mean loss weighted by its share of both processes' tokens."""
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    x, mask, feats = _two_rank_data()

    def all_reduce(t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    whitened = core.masked_whiten(x[rank], mask[rank], all_reduce=all_reduce)
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Linear(3, 1, bias=False))
    per_token = model(feats[rank]).squeeze(-1) ** 2  # (B, A)
    tokens_all = all_reduce(mask[rank].sum())
    weight = core.token_share_weight(mask[rank].sum(), tokens_all, grad_accum=1, world=2)
    (core.masked_mean(per_token, mask[rank]) * weight).backward()
    torch.save({"whitened": whitened, "grad": model.module.weight.grad}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _two_rank_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 6, generator=g)  # (rank, B, A)
    mask = torch.zeros(2, 4, 6, dtype=torch.bool)
    mask[0, :, :2] = True  # rank 0: short responses (8 tokens)
    mask[1, :, :5] = True  # rank 1: long ones (20 tokens)
    return x + 3 * torch.arange(2)[:, None, None], mask, torch.randn(2, 4, 6, 3, generator=g)


def test_whitening_and_loss_weights_span_every_process(tmp_path):
    import socket

    import torch.multiprocessing as mp
    from torch import nn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_ranks, args=(port, str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    x, mask, feats = _two_rank_data()

    # one process holding both slices
    whole = core.masked_whiten(x.flatten(0, 1), mask.flatten(0, 1)).view_as(x)
    for r in range(2):
        torch.testing.assert_close(got[r]["whitened"], whole[r], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(core.masked_whiten(x[0], mask[0]), whole[0], atol=1e-2)  # per-process differs
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False)
    core.masked_mean(model(feats.flatten(0, 1)).squeeze(-1) ** 2, mask.flatten(0, 1)).backward()
    for r in range(2):
        torch.testing.assert_close(got[r]["grad"], model.weight.grad)
    # without the token weights DDP's average would weigh rank 0's 8 tokens like rank 1's 20
    model.weight.grad = None
    sum(core.masked_mean(model(feats[r]).squeeze(-1) ** 2, mask[r]) / 2 for r in range(2)).backward()
    assert not torch.allclose(got[0]["grad"], model.weight.grad, rtol=1e-2)


def test_cpu_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert set_cpu_threads(None) == max(1, len(os.sched_getaffinity(0)) // 2) == torch.get_num_threads()
        assert set_cpu_threads(1) == 1 == torch.get_num_threads()
        with pytest.raises(UserError, match="cpu_threads must be at least 1"):
            set_cpu_threads(0)
    finally:
        torch.set_num_threads(before)


def test_logprobs_from_generation_skip_the_policy_pass(tmp_path, sft_policy, monkeypatch):  # noqa: F811
    passes = []
    real = rollout.forward_rollout
    monkeypatch.setattr(rollout, "forward_rollout", lambda *a, **kw: passes.append(kw["policy"]) or real(*a, **kw))
    h = ppo.main(ppo_config(tmp_path, sft_policy, "--ppo.temperature", "0.7"), reward=DigitReward())  # auto
    assert passes == [False, False]  # float32 and the HF engine: `auto` takes them from generation
    # step 1: the policy is still the reference (LoRA B = 0), so the recorded decoding logprobs must
    # equal the reference's full-forward ones up to float32 rounding, or the KL would show it
    assert abs(h[0]["objective/kl"]) < 1e-4 and h[1]["objective/kl"] != 0
    # checked at every update by the first mini-batch's forward, which runs before any optimizer step
    assert all(0 <= row["rollout/logprob_diff"] <= row["rollout/logprob_diff_max"] < 1e-4 for row in h)
    assert h[0]["policy/entropy"] > 0  # recorded as it sampled

    passes.clear()
    ppo.main(ppo_config(tmp_path / "recomputed", sft_policy, "--ppo.logprobs_from_generation", "false"),
             reward=DigitReward())
    assert passes == [True, True]


def test_recorded_logprobs_that_are_not_the_policy_stop_the_run(tmp_path, sft_policy, monkeypatch):  # noqa: F811
    """Logits changed between the model and the sampler (here: shifted by a stand-in) are caught by the
    first mini-batch's forward, before any optimizer step, and stop the run in one line."""
    from rlhf.generation import hf_engine
    from rlhf.generation.vllm_engine import EngineError

    real = hf_engine.TokenLogprobRecorder.finish
    monkeypatch.setattr(hf_engine.TokenLogprobRecorder, "finish",
                        lambda self, responses: (lambda lp, ent: (lp - 0.2, ent))(*real(self, responses)))
    with pytest.raises(EngineError, match="step 0: the sampled-token logprobs of the HF engine .* differ from the "
                                          "policy's by 0.2"):
        ppo.main(ppo_config(tmp_path, sft_policy), reward=DigitReward())
