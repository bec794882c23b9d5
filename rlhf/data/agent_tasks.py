"""The built-in environments' data: demonstrations (SFT), training instances and held-out instances.

    python -m rlhf.data.agent_tasks      # rewrites rlhf/data/assets/data/{calc,guess}_{sft,train,eval}.jsonl

The demonstrations are played by a scripted demonstrator in the environment itself, so every tool result
and hint in them is the environment's own. They leave room above SFT on purpose:
- calculator: the demonstrator calls the tool half of the time and otherwise guesses a wrong number
  near the product, so SFT calls the tool about half of the time; always calling scores 100%. There is
  one demonstration for every (a, b) not held out (1393), so that SFT learns to copy the tool's result
  rather than memorise a few hundred episodes.
- guess the number: the demonstrator halves the range half of the time and otherwise guesses an end of
  it, so about 30% of the games run out of guesses; halving always wins within 5.
Held-out instances share no (a, b) or (high, target) with the training instances or demonstrations.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

from rlhf.data.synthetic import write_jsonl
from rlhf.envs import calculator, guess_number
from rlhf.envs.interface import Message

Demonstrator = Callable[[list[Message], dict, random.Random], str]
"""(conversation so far, row, rng) -> the demonstrator's next message."""


def demonstrate(env, row: dict, demonstrator: Demonstrator, rng: random.Random, max_turns: int = 8) -> list[Message]:
    """One episode of `env` on `row` played by `demonstrator`, as SFT messages (the environment's closing
    reply, which no agent turn answers, left out)."""
    messages = env.reset(row, seed=0)
    for _ in range(max_turns):
        text = demonstrator(messages, row, rng)
        messages = messages + [{"role": "assistant", "content": text}]
        result = env.step(text)
        if result.done:
            break
        messages = messages + result.reply
    return messages


def calc_demonstrator(tool_share: float, spaced_digits: bool = True) -> Demonstrator:
    """Calls the tool with probability `tool_share` (then copies its result), else guesses a wrong number
    within 5% of the product (written as the tool writes numbers)."""
    def play(messages: list[Message], row: dict, rng: random.Random) -> str:
        if messages[-1]["role"] == "tool":
            return messages[-1]["content"]
        a, b = row["a"], row["b"]
        if rng.random() < tool_share:
            return calculator.call(a, b)
        spread = max(2, a * b // 20)
        return calculator.render(a * b + rng.choice([-1, 1]) * rng.randint(1, spread), spaced_digits)
    return play


def guess_demonstrator(halving_share: float) -> Demonstrator:
    """Each guess: the middle of the range the hints leave with probability `halving_share`, else the
    smallest or the largest number in that range (a slow search)."""
    def play(messages: list[Message], row: dict, rng: random.Random) -> str:
        low, high = 1, row["high"]
        for guess, reply in zip(messages[1::2], messages[2::2]):  # (assistant, user hint) pairs
            g = int(guess["content"])
            low, high = (g + 1, high) if reply["content"] == "higher" else (low, g - 1)
        return str((low + high) // 2 if rng.random() < halving_share else rng.choice([low, high]))
    return play


def calc_instances(seed: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(demonstration rows, training rows, held-out rows) with a and b in 11..49, numbers the tiny
    tokenizer holds as one token each, so a call copies two tokens of the question: 128 held-out (a, b),
    600 other distinct training rows, and a demonstration row for every (a, b) not held out."""
    rng = random.Random(seed)
    every = [(a, b) for a in range(11, 50) for b in range(11, 50)]
    pairs = rng.sample(every, 500 + 600 + 128)  # the first 500 unused: training and held-out rows as shipped before
    held = set(pairs[1100:])
    demos = [p for p in every if p not in held]
    rng.shuffle(demos)
    return tuple([{"a": a, "b": b} for a, b in ps] for ps in (demos, pairs[500:1100], pairs[1100:]))


def guess_instances(seed: int) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows): every (high, target) with high in 8..24, 64 of them held out."""
    pairs = [{"high": h, "target": t} for h in range(8, 25) for t in range(1, h + 1)]
    random.Random(seed).shuffle(pairs)
    return pairs[64:], pairs[:64]


def main(out: Path = Path(__file__).parent / "assets" / "data") -> None:
    rng = random.Random(0)
    demo_rows, train, heldout = calc_instances(seed=1)
    env = calculator.Calculator()
    play = calc_demonstrator(tool_share=0.5)
    write_jsonl([{"messages": demonstrate(env, r, play, rng)} for r in demo_rows], out / "calc_sft.jsonl")
    write_jsonl(train, out / "calc_train.jsonl")
    write_jsonl(heldout, out / "calc_eval.jsonl")

    rng = random.Random(0)  # each task's own stream: the guessing games do not change with the calculator's
    train, heldout = guess_instances(seed=2)
    env = guess_number.GuessNumber(max_guesses=5)
    play = guess_demonstrator(halving_share=0.5)
    write_jsonl([{"messages": demonstrate(env, rng.choice(train), play, rng)} for _ in range(200)],
                out / "guess_sft.jsonl")
    write_jsonl(train, out / "guess_train.jsonl")
    write_jsonl(heldout, out / "guess_eval.jsonl")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
