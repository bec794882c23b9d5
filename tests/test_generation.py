"""The generation layer (rlhf/generation): finishing responses, the result type, the HF engine's seeding
and batching, the stop token's resolution, the device a command samples on, and no import cycles in rlhf/."""

import ast
from pathlib import Path

import pytest
import torch
from conftest import REPO

from rlhf.errors import UserError
from rlhf.generation import hf_engine
from rlhf.generation.engine import decode, finish
from rlhf.generation.hf_engine import HFEngine
from rlhf.generation.prompts import encode_prompts, left_pad
from rlhf.generation.sampling import Sampling, stop_token_id

PAD, STOP = 0, 2


def test_finish_cuts_after_the_stop_token_and_trims_to_the_longest_response():
    ids, mask = left_pad([[5, 6], [7]], PAD)  # (2, 2)
    raw = torch.tensor([[9, STOP, 9, 9, 9], [9, 9, 9, STOP, 8]])  # (B, A'): tokens after the stop are junk
    lp = torch.arange(10, dtype=torch.float32).reshape(2, 5)
    gen = finish(ids, mask, raw, lp, STOP, PAD)
    assert gen.response_ids.tolist() == [[9, STOP, PAD, PAD], [9, 9, 9, STOP]]  # A = 4, the longest real one
    assert gen.response_mask.tolist() == [[True, True, False, False], [True] * 4]
    assert gen.logprobs.tolist() == [[0, 1, 0, 0], [5, 6, 7, 8]]  # 0 off the mask
    assert gen.stopped.tolist() == [True, True]
    # no stop token: every generated token is the response, and "stopped" is true throughout
    gen = finish(ids, mask, torch.tensor([[9, STOP, PAD], [9, 9, 9]]), None, None, PAD)
    assert gen.response_mask.tolist() == [[True, True, False], [True] * 3] and gen.stopped.all()
    assert gen.logprobs is None
    gen = finish(ids, mask, torch.tensor([[9, 9], [9, 9]]), None, STOP, PAD)  # ran into max_new_tokens
    assert gen.stopped.tolist() == [False, False]


def test_chunks_are_the_batches_a_per_batch_sampler_makes():
    prompts = [[5], [5, 6, 7], [8, 9], [4]]
    ids, mask = left_pad(prompts, PAD)  # (4, 3)
    gen = finish(ids, mask, torch.tensor([[9, STOP, PAD], [9, STOP, PAD], [9, 9, STOP], [STOP, PAD, PAD]]),
                 None, STOP, PAD)
    first, second = gen.chunks(2)
    expect_ids, expect_mask = left_pad(prompts[:2], PAD)
    assert torch.equal(first.prompt_ids, expect_ids) and torch.equal(first.prompt_mask, expect_mask)
    assert first.response_ids.tolist() == [[9, STOP], [9, STOP]]  # trimmed to this batch's longest
    assert torch.equal(second.prompt_ids, left_pad(prompts[2:], PAD)[0])
    assert second.response_ids.tolist() == [[9, 9, STOP], [STOP, PAD, PAD]]


@pytest.fixture(scope="module")
def tiny():
    from policies.config import TinyModelConfig
    from policies.tiny import build_model, load_tokenizer

    tok = load_tokenizer()
    return build_model(TinyModelConfig(), tok, seed=0).eval(), tok


def test_hf_engine_seeding_batching_and_recorded_logprobs(tiny):
    model, tok = tiny
    prompts = encode_prompts(tok, [[{"role": "user", "content": f"Reverse the word {w}."}]
                                   for w in ("cat", "moon", "tree", "sun", "rain")], 64)
    sampling = Sampling(1.0, 1.0, 6, tok.eos_token_id)
    whole = HFEngine.for_model(model, tok.pad_token_id)
    a, b = whole.generate(prompts, sampling, seed=3), whole.generate(prompts, sampling, seed=3)
    assert torch.equal(a.response_ids, b.response_ids)  # the same seed, the same responses
    assert not torch.equal(a.response_ids, whole.generate(prompts, sampling, seed=4).response_ids)
    state = torch.random.get_rng_state()
    whole.generate(prompts, sampling, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # a seeded call leaves the caller's stream alone
    # batched: each batch padded alone, as when sampled alone; the result is one (B, A) whole
    batched = HFEngine.for_model(model, tok.pad_token_id, batch_size=2).generate(prompts, sampling, seed=3)
    torch.manual_seed(3)
    per_batch = [HFEngine.for_model(model, tok.pad_token_id).generate(prompts[i:i + 2], sampling)
                 for i in range(0, 5, 2)]
    assert [c.response_ids.tolist() for c in batched.chunks(2)] == [g.response_ids.tolist() for g in per_batch]
    assert decode(tok, batched) == [t for g in per_batch for t in decode(tok, g)]
    # recorded logprobs are the model's at the sampling temperature
    recording = HFEngine(whole.open_model, tok.pad_token_id, torch.device("cpu"), record_logprobs=True)
    gen = recording.generate(prompts, Sampling(0.7, 1.0, 6, tok.eos_token_id), seed=5)
    full = torch.cat([gen.prompt_ids, gen.response_ids], 1)
    attn = torch.cat([gen.prompt_mask, gen.response_mask.long()], 1)
    from rlhf.generation.prompts import position_ids

    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=attn, position_ids=position_ids(attn)).logits
    P = gen.prompt_ids.shape[1]
    ref = torch.log_softmax(logits[:, P - 1:-1].float() / 0.7, -1).gather(-1, gen.response_ids[..., None])[..., 0]
    assert (gen.logprobs - ref)[gen.response_mask].abs().max() < 1e-4


def test_stop_token_resolution(tiny):
    _, tok = tiny
    assert stop_token_id(tok, "eos", "--stop_token") == tok.eos_token_id
    assert stop_token_id(tok, None, "--stop_token") is None
    word = next(t for t in tok.get_vocab() if t.isalpha() and len(t) > 2)
    assert stop_token_id(tok, word, "--stop_token") == tok.convert_tokens_to_ids(word)
    with pytest.raises(UserError, match="--stop_token 'no-such-token' is not a token of the tokenizer's vocab"):
        stop_token_id(tok, "no-such-token", "--stop_token")
    with pytest.raises(UserError, match="ppo.stop_token must differ from the PAD token"):
        stop_token_id(tok, tok.pad_token, "ppo.stop_token")


def test_commands_sample_on_the_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert hf_engine.default_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hf_engine.default_device() == torch.device("cpu")


def module_imports(path: Path) -> set[str]:
    """The rlhf modules `path` imports when it is imported (top level, not under TYPE_CHECKING, not in a
    function)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ([node] if not isinstance(node, (ast.If, ast.Try)) else ast.walk(node)):
            if isinstance(sub, ast.ImportFrom) and sub.module and sub.module.startswith("rlhf"):
                found |= {sub.module} | {f"{sub.module}.{a.name}" for a in sub.names}
            elif isinstance(sub, ast.Import):
                found |= {a.name for a in sub.names if a.name.startswith("rlhf")}
    return found


def test_no_import_cycle_in_rlhf():
    """Module-level imports between rlhf's modules form no cycle (a package imports its __init__ first)."""
    files = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (REPO / "rlhf").rglob("*.py")}
    graph = {m: {i for i in module_imports(p) if i in files and i != m} for m, p in files.items()}
    for m in files:  # importing a.b.c runs a/__init__ and a/b/__init__ first
        parts = m.split(".")
        graph[m] |= {".".join(parts[:k]) for k in range(1, len(parts)) if ".".join(parts[:k]) in files}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in graph[m]:
            assert state.get(n) != 1, "import cycle: " + " -> ".join(path + [n])
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(files):
        if m not in state:
            visit(m, [m])
    assert "rlhf.ppo.trainer" not in str(ast.dump(ast.parse((REPO / "rlhf/evaluation/heldout.py").read_text())))
