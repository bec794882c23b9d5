"""A synthetic instruction corpus with exact answers, small enough for a tiny model on a CPU.

Each task is a short instruction whose correct reply is computed, so a tiny model can learn it in
a few hundred steps and later stages can judge replies exactly. It generates the bundled quickstart
data (`python -m rlhf.data.synthetic` rewrites `rlhf/assets/data/`): SFT conversations and preference
pairs (correct answer chosen over a wrong one of the same kind).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

WORDS = ("cat dog sun moon tree bird fish star rain snow leaf rock boat kite lamp rose frog wolf "
         "bear hill road door ship milk corn gold iron ring bell drum").split()
SYSTEM_PROMPT = "You are a helpful assistant. Answer briefly."


FAMILIES = ("reverse", "capital", "plus", "repeat", "sort", "after")
"""The task families, in the order `_task` draws them."""


def _task(rng: random.Random, families: tuple[str, ...] = FAMILIES) -> tuple[str, str]:
    """One (instruction, answer) pair from a random family among `families`."""
    kind = rng.choice(families)
    w = rng.choice(WORDS)
    if kind == "reverse":
        return f"Reverse the word {w}.", w[::-1]
    if kind == "capital":
        return f"Write {w} in capital letters.", w.upper()
    if kind == "plus":
        a, b = rng.randrange(10), rng.randrange(10)
        return f"What is {a} plus {b}?", str(a + b)
    if kind == "repeat":
        n = rng.randrange(2, 5)
        return f"Repeat {w} {n} times.", " ".join([w] * n)
    if kind == "sort":
        letters = rng.sample("abcdefghij", 4)
        return f"Sort the letters {' '.join(letters)}.", " ".join(sorted(letters))
    if kind == "after":
        n = rng.randrange(50)
        return f"What number comes after {n}?", str(n + 1)
    raise ValueError(f"unknown task family {kind!r}; known: {', '.join(FAMILIES)}")


def remark(question: str, answer: str) -> str | None:
    """The answer with the remark a chatty demonstrator adds ("noom (moon backwards)"), for the
    families that have one (reverse, capital); None for the others. Not what was asked: the exact
    answer is the bare reply."""
    if m := re.fullmatch(r"Reverse the word (\w+)\.", question):
        return f"{answer} ({m.group(1)} backwards)"
    if re.fullmatch(r"Write \w+ in capital letters\.", question):
        return f"{answer} (in capitals)"
    return None


def conversation(rng: random.Random, families: tuple[str, ...] = FAMILIES, multi_turn: float = 0.2,
                 system: float = 0.3, chatty: float = 0.0) -> list[dict]:
    """A conversation of one (or, with probability `multi_turn`, two) user/assistant exchanges on tasks
    of `families`, with a system prompt with probability `system`. With probability `chatty` an answer
    that has a `remark` carries it (demonstrations that are right but not what was asked)."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < system else []
    for _ in range(2 if rng.random() < multi_turn else 1):
        question, answer = _task(rng, families)
        if chatty and rng.random() < chatty:
            answer = remark(question, answer) or answer
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


def sft_rows(n: int, seed: int = 0, **kw) -> list[dict]:
    """`n` conversational SFT rows (`messages` format); `kw` as for `conversation`."""
    rng = random.Random(seed)
    return [{"messages": conversation(rng, **kw)} for _ in range(n)]


def wrong_answer(question: str, answer: str, rng: random.Random, hard_share: float = 0.0) -> str:
    """A wrong reply of the same kind as `answer` to one of `_task`'s questions.

    Hard mistakes, the ones a small model makes most and a reward model finds hardest to see, get
    probability `hard_share`: the right form with the wrong content (another word reversed or
    capitalised or repeated, another number). Otherwise an easier one: the input echoed back, a near
    miss (a letter rotated, one repetition too many or too few, a number one or two off), the wrong form.
    """
    other = rng.choice([x for x in WORDS if x not in question.split()])
    if m := re.fullmatch(r"Reverse the word (\w+)\.", question):
        w = m.group(1)
        hard, easy = [other[::-1]], [w, w[1:] + w[0], other, w.upper()]
    elif m := re.fullmatch(r"Write (\w+) in capital letters\.", question):
        w = m.group(1)
        hard, easy = [other.upper()], [w, w.capitalize(), other, w[::-1].upper()]
    elif re.fullmatch(r"What is \d+ plus \d+\?", question) or question.startswith("What number comes after"):
        n = int(answer)
        hard, easy = [str(rng.randrange(60))], [str(n + d) for d in (-2, -1, 1, 2) if n + d >= 0] + [other]
    elif m := re.fullmatch(r"Repeat (\w+) (\d+) times\.", question):
        w, n = m.group(1), int(m.group(2))
        mixed = [w] * n
        mixed[rng.randrange(n)] = other
        hard, easy = [" ".join([other] * n), " ".join(mixed)], [" ".join([w] * (n - 1)), " ".join([w] * (n + 1)), w]
    elif m := re.fullmatch(r"Sort the letters ([a-j](?: [a-j])*)\.", question):
        given = m.group(1).split()
        hard, easy = [], [" ".join(given), " ".join(sorted(given, reverse=True))]
    else:
        raise ValueError(f"not a synthetic task question: {question!r}")
    hard, easy = [o for o in hard if o != answer], [o for o in easy if o != answer]
    return rng.choice(hard if hard and (rng.random() < hard_share or not easy) else easy)


def answer(question: str) -> str:
    """The correct reply to one of `_task`'s questions (`reward.examples.solve`, which the
    `exact_answer` reward uses too), refusing anything else."""
    from reward.examples import solve

    result = solve(question)
    if result is None:
        raise ValueError(f"not a synthetic task question: {question!r}")
    return result


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions), by the two-row recurrence."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def gold_score(question: str, response: str) -> float:
    """How close a reply is to the correct answer, in [0, 1]: 1 - edit distance / the longer length.
    Graded, so near misses beat nonsense and padding a right answer with extra text costs reward."""
    target, reply = answer(question), response.strip()
    return 1.0 - edit_distance(reply, target) / max(len(reply), len(target), 1)


def gold_reward(prompts, responses) -> list[float]:
    """The gold reward of the alignment benchmark, as a reward function (`rlhf.data.synthetic:gold_reward`):
    the last user turn of each prompt is a synthetic task, scored by `gold_score`."""
    return [gold_score(next(m["content"] for m in reversed(p) if m["role"] == "user"), r)
            for p, r in zip(prompts, responses)]


def preference_rows(n: int, seed: int = 0, hard_share: float = 0.0, remark_share: float = 0.0, **kw) -> list[dict]:
    """`n` preference pairs (canonical `pairs` format): the prompt is a `conversation` (`kw` as for it)
    up to its last question, `chosen` the exact answer, `rejected` the answer with its `remark` with
    probability `remark_share` (where the task has one), else a `wrong_answer` (hard with probability
    `hard_share`)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = conversation(rng, **kw)
        prompt, answer = messages[:-1], messages[-1]["content"]
        question = prompt[-1]["content"]
        rejected = (rng.random() < remark_share and remark(question, answer)) or \
            wrong_answer(question, answer, rng, hard_share)
        rows.append({"prompt": prompt, "chosen": answer, "rejected": rejected, "margin": None})
    return rows


def prompt_rows(n: int, seed: int = 0, **kw) -> list[dict]:
    """`n` PPO prompts: conversations (`kw` as for `conversation`) up to their last question."""
    rng = random.Random(seed)
    return [{"prompt": conversation(rng, **kw)[:-1]} for _ in range(n)]


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


QUICKSTART = dict(families=("reverse", "capital", "repeat", "after"), multi_turn=0.1, system=0.2)
"""The quickstart's tasks: the four families the tiny model learns within a minute on a CPU."""


def heldout_prompt_rows(n: int, seed: int, exclude: list[dict], **kw) -> list[dict]:
    """`n` prompts (as `prompt_rows`) none of which is a prompt of `exclude`: held-out for evaluation."""
    seen = {json.dumps(r["prompt"], sort_keys=True) for r in exclude}
    rng, rows = random.Random(seed), []
    while len(rows) < n:
        prompt = conversation(rng, **kw)[:-1]
        key = json.dumps(prompt, sort_keys=True)
        if key not in seen:
            seen.add(key)
            rows.append({"prompt": prompt})
    return rows


def main() -> None:
    out = Path(__file__).parent / "assets" / "data"
    # Demonstrators are right but, on two tasks, chatty 60% of the time ("noom (moon backwards)");
    # labellers prefer the bare answer to the chatty one, and any right answer to a wrong one.
    write_jsonl(sft_rows(4000, seed=0, chatty=0.6, **QUICKSTART), out / "quickstart_sft.jsonl")
    write_jsonl(preference_rows(3000, seed=1, hard_share=0.7, remark_share=0.4, **QUICKSTART),
                out / "quickstart_prefs.jsonl")
    prompts = prompt_rows(1000, seed=2, **QUICKSTART)
    write_jsonl(prompts, out / "quickstart_prompts.jsonl")
    write_jsonl(heldout_prompt_rows(128, seed=3, exclude=prompts, **QUICKSTART), out / "quickstart_eval_prompts.jsonl")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
