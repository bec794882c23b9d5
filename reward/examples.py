"""Reward functions to use as `reward.examples:NAME`, and to copy when writing your own.

A reward function takes the batch, `prompts` (lists of {"role", "content"} messages ending with
the user's turn) and `responses` (strings), and returns one float per response.
"""

from __future__ import annotations

import re


def solve(question: str) -> str | None:
    """The exact answer to one of the built-in synthetic tasks (`rlhf.data.synthetic`), None for others."""
    if m := re.fullmatch(r"Reverse the word (\w+)\.", question):
        return m.group(1)[::-1]
    if m := re.fullmatch(r"Write (\w+) in capital letters\.", question):
        return m.group(1).upper()
    if m := re.fullmatch(r"What is (\d+) plus (\d+)\?", question):
        return str(int(m.group(1)) + int(m.group(2)))
    if m := re.fullmatch(r"Repeat (\w+) (\d+) times\.", question):
        return " ".join([m.group(1)] * int(m.group(2)))
    if m := re.fullmatch(r"Sort the letters ([a-z](?: [a-z])*)\.", question):
        return " ".join(sorted(m.group(1).split()))
    if m := re.fullmatch(r"What number comes after (\d+)\?", question):
        return str(int(m.group(1)) + 1)
    return None


def exact_answer(prompts: list[list[dict]], responses: list[str]) -> list[float]:
    """1.0 when the reply is exactly the answer to the last question of a synthetic task (surrounding
    whitespace ignored), 0.0 otherwise (also for questions that are not synthetic tasks)."""
    out = []
    for prompt, response in zip(prompts, responses):
        answer = solve(prompt[-1]["content"].strip())
        out.append(1.0 if answer is not None and response.strip() == answer else 0.0)
    return out


def brevity(prompts: list[list[dict]], responses: list[str]) -> list[float]:
    """-(number of words) / 10: prefers short replies (a shaping term to add to another reward)."""
    return [-len(r.split()) / 10 for r in responses]
