"""Preference pairs: one canonical row format, and adapters that build it from public
human-preference datasets.

A canonical pair is a plain dict (`PreferencePair`), so a list of them goes straight into a
`datasets.Dataset`:

    {"prompt":   [{"role": "system" | "user" | "assistant", "content": str}, ...],
     "chosen":   str,           # the preferred assistant reply
     "rejected": str,           # the other assistant reply
     "margin":   float | None}  # how much better `chosen` is, on the source's own scale; None if unknown

`prompt` keeps the whole conversation before the replies (multi-turn included) and always ends with
a user turn. Every message's content is stripped of surrounding whitespace.

Formats (`load_pairs(format=...)`; detected from the columns when not given, see `detect_format`):

| format                  | columns it needs                                  | pairs                     | margin           |
|-------------------------|---------------------------------------------------|---------------------------|------------------|
| hh_rlhf                 | chosen, rejected: "Human:/Assistant:" dialogues   | 1 per row                 | None             |
| ultrafeedback_binarized | chosen, rejected: message lists (+prompt, scores) | 1 per row                 | score difference |
| ultrafeedback_raw       | instruction, completions (response + score)       | best vs each worse        | score difference |
| shp                     | history or post, human_ref_A/B, labels            | 1 per row, min ratio      | ln(score_ratio)  |
| pku_saferlhf            | prompt, response_0/1, better/safer_response_id    | 1 per row                 | None             |
| oasst                   | message_tree_id, prompt: a message tree           | every better/worse rank   | None             |
| helpsteer2              | prompt, response, attribute scores                | per prompt, best vs worse | weighted diff.   |
| pairs                   | prompt, chosen, rejected (+margin), column_map    | 1 per row                 | margin column    |

Each adapter's docstring gives its pairing rule. Rows that cannot be used are skipped and counted
by reason (`SKIP_REASONS`) in a `SkipReport`.
"""

from __future__ import annotations

import inspect
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Callable, Literal, TypedDict

from rlhf.data.sources import load_rows
from rlhf.errors import UserError


class Message(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


class PreferencePair(TypedDict):
    prompt: list[Message]  # the conversation so far; ends with a user turn
    chosen: str  # preferred assistant reply
    rejected: str  # dispreferred assistant reply
    margin: float | None  # preference strength on the source's scale, None when it has none


ROLES = ("system", "user", "assistant")

# An adapter returns, for one row (or one group of rows), a list whose items are either a pair or a
# skip reason: one of these keys.
SKIP_REASONS = {
    "empty_reply": "chosen or rejected reply is empty",
    "identical_replies": "chosen and rejected are the same text",
    "too_long": "prompt plus the longer reply exceeds max_length_chars",
    "malformed_dialogue": "turns could not be read, or the prompt is empty or does not end with a user turn",
    "last_turn_not_assistant": "a reply's final turn is not the assistant's",
    "prompt_mismatch": "chosen and rejected continue different conversations",
    "no_preference_label": "the label saying which reply is better is missing or invalid",
    "score_ratio_below_min": "SHP score_ratio below min_score_ratio",
    "missing_score": "a score needed to rank the replies is missing",
    "tied_scores": "two replies have the same score or rank, so neither is preferred",
    "too_few_replies": "fewer than two usable replies to compare",
    "no_ranks": "oasst: a prompt's sibling assistant replies carry fewer than two ranks",
    "deleted_message": "oasst: message deleted or failed review (dropped with its replies)",
}

PAIRINGS = ("best_vs_rest", "all_pairs")
SCORE_EPS = 1e-9  # weighted scores are sums of floats; closer than this is a tie

# Published single-reward weights for the HelpSteer2 attributes: those of Nemotron-4-340B-Reward
# (HelpSteer2 paper, Appendix H, https://arxiv.org/abs/2406.08673). Llama3-70B-SteerLM-RM used
# 0.65/0.8/0.45/0.55/-0.4; pass weights={"helpfulness": 1.0} for helpfulness only.
HELPSTEER2_WEIGHTS = {"helpfulness": 0.3, "correctness": 0.74, "coherence": 0.46,
                      "complexity": 0.47, "verbosity": -0.33}
HELPSTEER2_ATTRIBUTES = tuple(HELPSTEER2_WEIGHTS)


# ---------------------------------------------------------------------------------------------
# Building blocks shared by the adapters
# ---------------------------------------------------------------------------------------------

def _user(text: str) -> list[Message]:
    return [{"role": "user", "content": text.strip()}]


def _messages(value: Any) -> list[Message] | None:
    """A list of {"role", "content"} dicts with known roles, contents stripped; None if it is not one."""
    if not isinstance(value, list):
        return None
    out = []
    for m in value:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            return None
        content = m.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            return None
        out.append({"role": m["role"], "content": content.strip()})
    return out


def _prompt(value: Any) -> list[Message] | None:
    """A prompt column: a string is one user message, a list is a conversation."""
    if isinstance(value, str):
        return _user(value)
    return _messages(value)


def make_pair(prompt: list[Message] | None, chosen: Any, rejected: Any,
              margin: float | None = None) -> PreferencePair | str:
    """Check and build a canonical pair; returns a skip reason when it is unusable."""
    if not prompt or prompt[-1]["role"] != "user":
        return "malformed_dialogue"
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        return "malformed_dialogue"
    chosen, rejected = chosen.strip(), rejected.strip()
    if not chosen or not rejected:
        return "empty_reply"
    if chosen == rejected:
        return "identical_replies"
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
            "margin": None if margin is None else float(margin)}


def _reply(value: Any) -> tuple[list[Message], str] | str:
    """(context, reply text) of a reply column, or a skip reason.

    A string is the reply itself (no context); a message list ends with the assistant's reply and
    the messages before it are the conversation it continues.
    """
    if isinstance(value, str):
        return [], value
    messages = _messages(value)
    if not messages:
        return "malformed_dialogue"
    if messages[-1]["role"] != "assistant":
        return "last_turn_not_assistant"
    return messages[:-1], messages[-1]["content"]


def pair_from_fields(prompt: Any, chosen: Any, rejected: Any,
                     margin: float | None = None) -> PreferencePair | str:
    """Pair from prompt/chosen/rejected fields, each a string or a message list.

    A reply given as a message list carries its context (the messages before the final assistant
    turn); when both replies carry one it must be the same. The prompt is that context, or the
    `prompt` field (a string is one user message) when the replies carry none.
    """
    chosen_part, rejected_part = _reply(chosen), _reply(rejected)
    for part in (chosen_part, rejected_part):
        if isinstance(part, str):
            return part
    (chosen_context, chosen_text), (rejected_context, rejected_text) = chosen_part, rejected_part
    if chosen_context and rejected_context and chosen_context != rejected_context:
        return "prompt_mismatch"
    context = chosen_context or rejected_context or _prompt(prompt)
    return make_pair(context, chosen_text, rejected_text, margin)


def ranked_pairs(prompt: list[Message], replies: list[tuple[str, float]], pairing: str,
                 with_margin: bool = True) -> list[PreferencePair | str]:
    """Pairs from replies scored on one scale (higher is better).

    `best_vs_rest`: the best reply against each other reply; `all_pairs`: every two replies.
    Equal scores make no pair and are counted as `tied_scores`. Sorting is stable, so among equally
    scored best replies the first one in the data is "the best".
    """
    if len(replies) < 2:
        return ["too_few_replies"]
    ranked = sorted(replies, key=lambda r: -r[1])
    candidates = [(ranked[0], r) for r in ranked[1:]] if pairing == "best_vs_rest" else combinations(ranked, 2)
    out: list[PreferencePair | str] = []
    for (better, better_score), (worse, worse_score) in candidates:
        gap = better_score - worse_score
        if gap <= SCORE_EPS:
            out.append("tied_scores")
            continue
        out.append(make_pair(prompt, better, worse, round(gap, 6) if with_margin else None))
    return out


# ---------------------------------------------------------------------------------------------
# Adapters: row (or rows) -> list of pairs and skip reasons
# ---------------------------------------------------------------------------------------------

HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")


def parse_hh_dialogue(text: str) -> list[Message] | None:
    """Split an HH-RLHF string ("\\n\\nHuman: ...\\n\\nAssistant: ...") into messages.

    Consecutive turns of one speaker are merged: a few HH dialogues repeat the speaker tag (e.g.
    "Assistant: ...\\n\\nAssistant: ..."), and merging keeps the user/assistant alternation chat
    templates expect. None when there is text before the first tag or no tag at all.
    """
    if not isinstance(text, str):
        return None
    parts = HH_TURN.split(text)  # [before, speaker, text, speaker, text, ...]
    if parts[0].strip() or len(parts) < 3:
        return None
    messages: list[Message] = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = f"{messages[-1]['content']}\n\n{content.strip()}".strip()
        else:
            messages.append({"role": role, "content": content.strip()})
    return messages


def hh_rlhf_pairs(row: dict) -> list[PreferencePair | str]:
    """Anthropic HH-RLHF: `chosen`/`rejected` are whole dialogues that differ in the last turn.

    The final Assistant turn of each is the reply; the turns before it (identical in both) are the
    prompt. No margin: HH labels are binary.
    """
    chosen, rejected = parse_hh_dialogue(row["chosen"]), parse_hh_dialogue(row["rejected"])
    if chosen is None or rejected is None:
        return ["malformed_dialogue"]
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        return ["last_turn_not_assistant"]
    if chosen[:-1] != rejected[:-1]:
        return ["prompt_mismatch"]
    return [make_pair(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"])]


def ultrafeedback_binarized_pairs(row: dict) -> list[PreferencePair | str]:
    """HuggingFaceH4/ultrafeedback_binarized: `chosen`/`rejected` message lists.

    Prompt = all but the last message (or the `prompt` column when the lists hold only the
    reply); margin = score_chosen - score_rejected when both scores are present.
    """
    score_c, score_r = row.get("score_chosen"), row.get("score_rejected")
    margin = score_c - score_r if score_c is not None and score_r is not None else None
    return [pair_from_fields(row.get("prompt"), row["chosen"], row["rejected"], margin)]


def ultrafeedback_raw_pairs(row: dict, score_field: str = "fine-grained_score",
                            pairing: str = "best_vs_rest") -> list[PreferencePair | str]:
    """openbmb/UltraFeedback: one `instruction` with several scored `completions`.

    Default pairing is the best completion against each worse one (all its rejects, not one random
    one as in the binarized sets). Default score is `fine-grained_score`, the mean of the four
    aspect ratings: Argilla found `overall_score` (the critique's) disagrees with the ratings on
    many rows (argilla/ultrafeedback-binarized-preferences). Margin = score difference.
    """
    prompt = _user(row["instruction"]) if isinstance(row["instruction"], str) else None
    out: list[PreferencePair | str] = []
    scored = []
    for completion in row["completions"] or []:
        score = completion.get(score_field)
        if score is None:
            out.append("missing_score")
        else:
            scored.append((completion.get("response"), float(score)))
    return out + ranked_pairs(prompt, scored, pairing)


def shp_pairs(row: dict, min_score_ratio: float | None = 2.0) -> list[PreferencePair | str]:
    """stanfordnlp/SHP: a Reddit post (`history`, or `post`) and two top-level comments.

    `labels` 1 means comment A is preferred. Pairs whose `score_ratio` (preferred score over
    dispreferred score, >= 1) is below `min_score_ratio` are dropped; the SHP card recommends 2.
    Margin = ln(score_ratio): the log-odds a Bradley-Terry model would give that upvote ratio.
    """
    post = row.get("history") if row.get("history") is not None else row.get("post")
    if row["labels"] not in (0, 1):
        return ["no_preference_label"]
    ratio = row.get("score_ratio")
    if min_score_ratio is not None:
        if ratio is None:
            return ["missing_score"]
        if ratio < min_score_ratio:
            return ["score_ratio_below_min"]
    a, b = row["human_ref_A"], row["human_ref_B"]
    chosen, rejected = (a, b) if row["labels"] == 1 else (b, a)
    margin = math.log(ratio) if ratio is not None and ratio > 0 else None
    return [make_pair(_prompt(post), chosen, rejected, margin)]


def pku_saferlhf_pairs(row: dict, preference: str = "helpful") -> list[PreferencePair | str]:
    """PKU-Alignment/PKU-SafeRLHF: two responses to one prompt with two labels.

    preference="helpful" uses `better_response_id`, "safe" uses `safer_response_id` (the labels
    Safe RLHF trains its reward and cost models on). No margin.
    """
    chosen_id = row["better_response_id"] if preference == "helpful" else row["safer_response_id"]
    if chosen_id not in (0, 1):
        return ["no_preference_label"]
    chosen, rejected = row[f"response_{chosen_id}"], row[f"response_{1 - chosen_id}"]
    return [make_pair(_prompt(row["prompt"]), chosen, rejected)]


def _oasst_usable(message: dict) -> bool:
    return not message.get("deleted") and message.get("review_result") is not False


def _oasst_message(message: dict) -> Message:
    role = "user" if message["role"] == "prompter" else "assistant"
    return {"role": role, "content": (message.get("text") or "").strip()}


def _oasst_root(tree: dict) -> dict:
    # A trees-export row holds the root under "prompt"; a bare root message is accepted too.
    return tree["prompt"] if isinstance(tree.get("prompt"), dict) else tree


def oasst_pairs(tree: dict, pairing: str = "all_pairs") -> list[PreferencePair | str]:
    """OpenAssistant message tree (trees export: one tree per row, root message under `prompt`).

    For every prompter message, its assistant replies that carry a `rank` (0 = best) are paired
    better-rank vs worse-rank (default: all such pairs), with the thread from the root to that
    prompter message as the prompt. Deleted messages and those that failed review are dropped with
    their replies. No margin: ranks are ordinal.
    """
    out: list[PreferencePair | str] = []

    def walk(message: dict, thread: list[Message]) -> None:
        thread = thread + [_oasst_message(message)]
        replies = []
        for reply in message.get("replies") or []:
            if _oasst_usable(reply):
                replies.append(reply)
            else:
                out.append("deleted_message")
        if message["role"] == "prompter" and len(replies) >= 2:
            ranked = [(r.get("text") or "", -float(r["rank"])) for r in replies
                      if r["role"] == "assistant" and r.get("rank") is not None]
            if len(ranked) < 2:
                out.append("no_ranks")
            else:
                out.extend(ranked_pairs(thread, ranked, pairing, with_margin=False))
        for reply in replies:
            walk(reply, thread)

    root = _oasst_root(tree)
    if _oasst_usable(root):
        walk(root, [])
    else:
        out.append("deleted_message")
    return out


def oasst_threads(tree: dict, paths: Literal["best", "all"] = "best") -> list[list[Message]]:
    """Linearise an OpenAssistant message tree into conversations for SFT.

    paths="best": one conversation per tree, following at each message its best reply (lowest
    `rank`; unranked replies after ranked ones, then in file order) down to a leaf.
    paths="all": every root-to-leaf path. Either way a conversation ends with an assistant message
    (a trailing prompter message is cut), deleted or review-failed messages are dropped with their
    replies, and duplicates are removed.
    """
    if paths not in ("best", "all"):
        raise UserError(f"oasst_threads: paths must be 'best' or 'all', got {paths!r}")
    root = _oasst_root(tree)
    if not _oasst_usable(root):
        return []
    leaves: list[list[dict]] = []

    def walk(message: dict, path: list[dict]) -> None:
        path = path + [message]
        replies = [r for r in message.get("replies") or [] if _oasst_usable(r)]
        if paths == "best" and replies:
            # sorted is stable: unranked (inf) after ranked, ties in file order
            replies = sorted(replies, key=lambda r: math.inf if r.get("rank") is None else r["rank"])[:1]
        if not replies:
            leaves.append(path)
        for reply in replies:
            walk(reply, path)

    walk(root, [])
    threads, seen = [], set()
    for path in leaves:
        while path and path[-1]["role"] != "assistant":
            path = path[:-1]
        key = tuple(m.get("message_id") or id(m) for m in path)
        if path and key not in seen:
            seen.add(key)
            threads.append([_oasst_message(m) for m in path])
    return threads


HELPSTEER2_TURN = re.compile(r"\n?<extra_id_1>(User|Assistant)\n?")


def parse_helpsteer2_prompt(text: str) -> list[Message] | None:
    """HelpSteer2 multi-turn prompts join turns as "{user}\\n<extra_id_1>Assistant\\n{assistant}
    \\n<extra_id_1>User\\n{user}" (dataset card); a single-turn prompt is the user text."""
    if not isinstance(text, str):
        return None
    parts = HELPSTEER2_TURN.split(text)
    messages = _user(parts[0])
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if speaker == "User" else "assistant", "content": content.strip()})
    return messages


def helpsteer2_pairs(rows: list[dict], weights: dict[str, float] | None = None,
                     pairing: str = "best_vs_rest") -> list[PreferencePair | str]:
    """nvidia/HelpSteer2: rows sharing one `prompt`, each a `response` rated 0-4 on five attributes.

    Each response is scored by sum(weight * attribute) (default `HELPSTEER2_WEIGHTS`); the best
    response is paired against each worse one (or all pairs), margin = score difference. Equal
    scores are ties and skipped.
    """
    weights = HELPSTEER2_WEIGHTS if weights is None else weights
    out: list[PreferencePair | str] = []
    scored = []
    for row in rows:
        values = [row.get(name) for name in weights]
        if any(v is None for v in values):
            out.append("missing_score")
        else:
            scored.append((row["response"], sum(w * v for w, v in zip(weights.values(), values))))
    prompt = parse_helpsteer2_prompt(rows[0]["prompt"])
    return out + ranked_pairs(prompt, scored, pairing)


def generic_pairs(row: dict) -> list[PreferencePair | str]:
    """`pairs`: columns prompt, chosen, rejected and optional margin (after `column_map` renaming).

    prompt: a string (one user message) or a message list; chosen/rejected: strings or message
    lists ending with the assistant reply (see `pair_from_fields`).
    """
    margin = row.get("margin")
    try:
        margin = None if margin is None or margin == "" else float(margin)
    except (TypeError, ValueError):
        return ["malformed_dialogue"]
    if margin is not None and math.isnan(margin):  # an empty CSV cell
        margin = None
    return [pair_from_fields(row.get("prompt"), row["chosen"], row["rejected"], margin)]


# ---------------------------------------------------------------------------------------------
# Formats and detection
# ---------------------------------------------------------------------------------------------

SCORE_COLUMNS = {"score_chosen", "score_rejected"}


def _looks_like_hh(columns: set[str], row: dict | None) -> bool:
    # HH rows are two dialogue strings and nothing else that names a prompt
    return "prompt" not in columns and (row is None or isinstance(row["chosen"], str))


def _looks_like_ultrafeedback_binarized(columns: set[str], row: dict | None) -> bool:
    # H4's schema has score_chosen/score_rejected; a copy cut to chosen/rejected (like the real
    # sample in shared/data) is known by its message-list replies, which needs a row to see
    has_scores = SCORE_COLUMNS <= columns
    if row is None:
        return has_scores
    return isinstance(row["chosen"], list) and (has_scores or "prompt" not in columns)


def _looks_like_pairs(columns: set[str], row: dict | None) -> bool:
    return not columns & SCORE_COLUMNS


@dataclass(frozen=True)
class FormatSpec:
    adapter: Callable[..., list]  # row (or list of rows when group_by is set) -> pairs and skip reasons
    required: tuple[str, ...]  # columns that must all be present
    describe: str  # what the format needs, for error messages
    one_of: tuple[str, ...] = ()  # at least one of these must be present too
    group_by: str | None = None  # adapter gets all rows sharing this column's value
    # extra detection test (columns, example row or None), for formats that share columns
    looks_like: Callable[[set[str], dict | None], bool] | None = None

    @property
    def options(self) -> dict[str, Any]:
        """The format's options and defaults: the adapter's parameters after the row."""
        params = list(inspect.signature(self.adapter).parameters.values())[1:]
        return {p.name: p.default for p in params}


FORMATS: dict[str, FormatSpec] = {
    "hh_rlhf": FormatSpec(
        hh_rlhf_pairs, ("chosen", "rejected"), "chosen, rejected as 'Human:/Assistant:' dialogue strings",
        looks_like=_looks_like_hh),
    "ultrafeedback_binarized": FormatSpec(
        ultrafeedback_binarized_pairs, ("chosen", "rejected"),
        "chosen, rejected as message lists; score_chosen, score_rejected",
        looks_like=_looks_like_ultrafeedback_binarized),
    "ultrafeedback_raw": FormatSpec(
        ultrafeedback_raw_pairs, ("instruction", "completions"), "instruction, completions with scores"),
    "shp": FormatSpec(
        shp_pairs, ("human_ref_A", "human_ref_B", "labels"), "history or post, human_ref_A, human_ref_B, labels",
        one_of=("history", "post")),
    "pku_saferlhf": FormatSpec(
        pku_saferlhf_pairs, ("prompt", "response_0", "response_1", "better_response_id", "safer_response_id"),
        "prompt, response_0, response_1, better_response_id, safer_response_id"),
    "oasst": FormatSpec(
        oasst_pairs, ("message_tree_id", "prompt"), "message_tree_id, prompt (a message tree with replies)"),
    "helpsteer2": FormatSpec(
        helpsteer2_pairs, ("prompt", "response", "helpfulness"),
        "prompt, response, helpfulness (+ correctness, coherence, complexity, verbosity)",
        group_by="prompt"),
    "pairs": FormatSpec(
        generic_pairs, ("prompt", "chosen", "rejected"), "prompt, chosen, rejected (+ margin), or any column_map",
        looks_like=_looks_like_pairs),
}


def _matches(spec: FormatSpec, columns: set[str], example_row: dict | None) -> bool:
    if not set(spec.required) <= columns:
        return False
    if spec.one_of and not columns & set(spec.one_of):
        return False
    return spec.looks_like is None or spec.looks_like(columns, example_row)


def _needs(name: str) -> str:
    spec = FORMATS[name]
    return f"{name} ({spec.describe})"


def detect_format(column_names, example_row: dict | None = None) -> str:
    """The format whose columns are in `column_names` (see `FORMATS[name].required`).

    `example_row` tells string replies from message lists: HH-RLHF and an UltraFeedback copy cut to
    chosen/rejected share their column names, and without a row such a file reads as hh_rlhf.
    A `prompt` column next to chosen/rejected means `pairs` (or `ultrafeedback_binarized` when the
    score columns are there too). No match, or several, is a UserError listing the columns found
    and what each format needs.
    """
    columns = set(column_names)
    found = [name for name, spec in FORMATS.items() if _matches(spec, columns, example_row)]
    if len(found) == 1:
        return found[0]
    shown = ", ".join(sorted(columns)) or "(none)"
    if found:
        raise UserError(f"columns [{shown}] fit several preference formats: "
                        f"{'; '.join(_needs(n) for n in found)}; pass format=NAME to choose one")
    raise UserError(f"no preference format matches columns [{shown}]; formats and what they need: "
                    f"{'; '.join(_needs(n) for n in FORMATS)}; or pass format='pairs' with a column_map")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

@dataclass
class SkipReport:
    """What happened to the rows of one source.

    `skipped` counts dropped items by reason: a row for the one-pair-per-row formats (there
    rows_in == pairs_out + total skipped), and for ultrafeedback_raw / oasst / helpsteer2 a candidate
    pair (a tie), a completion or message, or a row/prompt that gave no pair.
    """

    format: str
    rows_in: int = 0
    pairs_out: int = 0
    skipped: Counter = field(default_factory=Counter)
    source: str = ""
    detected: bool = False  # format found by detect_format rather than given

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        head = f"{self.format}: {self.rows_in} rows -> {self.pairs_out} pairs"
        if not self.skipped:
            return head + ", nothing skipped"
        counts = ", ".join(f"{reason} {n}" for reason, n in self.skipped.most_common())
        return f"{head}; skipped {self.total_skipped}: {counts}"


def _format_options(name: str, given: dict) -> dict:
    spec = FORMATS[name]
    unknown = set(given) - set(spec.options)
    if unknown:
        accepted = ", ".join(spec.options) or "none"
        raise UserError(f"format '{name}' has no option {', '.join(sorted(unknown))}; its options: {accepted}")
    options = {**spec.options, **given}
    if "pairing" in options and options["pairing"] not in PAIRINGS:
        raise UserError(f"format '{name}': pairing must be one of {', '.join(PAIRINGS)}, got {options['pairing']!r}")
    if name == "pku_saferlhf" and options["preference"] not in ("helpful", "safe"):
        raise UserError(f"format 'pku_saferlhf': preference must be 'helpful' or 'safe', got {options['preference']!r}")
    if name == "shp" and options["min_score_ratio"] is not None and not options["min_score_ratio"] > 0:
        raise UserError(f"format 'shp': min_score_ratio must be > 0 or None, got {options['min_score_ratio']!r}")
    if name == "helpsteer2":
        weights = HELPSTEER2_WEIGHTS if options["weights"] is None else options["weights"]
        bad = [k for k, w in weights.items() if k not in HELPSTEER2_ATTRIBUTES
               or isinstance(w, bool) or not isinstance(w, (int, float))]
        if not weights or bad:
            raise UserError(f"format 'helpsteer2': weights must map {', '.join(HELPSTEER2_ATTRIBUTES)} to numbers"
                            + (f", got {', '.join(bad)}" if bad else ", got none"))
        options["weights"] = dict(weights)
    return options


def _required_columns(name: str, options: dict) -> list[str]:
    required = list(FORMATS[name].required)
    if name == "helpsteer2":  # every attribute that carries a weight
        required = ["prompt", "response"] + [a for a in options["weights"] if a not in required]
    if name == "shp" and options["min_score_ratio"] is not None:
        required.append("score_ratio")
    return required


def _apply_column_map(ds, column_map: dict[str, str], source: str):
    """Rename the file's columns to the format's field names: column_map = {field: column}."""
    missing = [col for col in column_map.values() if col not in ds.column_names]
    if missing:
        raise UserError(f"{source}: column_map names column(s) {', '.join(missing)} that the data does not have "
                        f"(found: {', '.join(ds.column_names)})")
    renames = {col: name for name, col in column_map.items() if col != name}
    # A column already called like a target field is replaced by the mapped one.
    clashing = [name for name in renames.values() if name in ds.column_names and name not in renames]
    if clashing:
        ds = ds.remove_columns(clashing)
    return ds.rename_columns(renames) if renames else ds


def _too_long(pair: PreferencePair, max_chars: int) -> bool:
    prompt_chars = sum(len(m["content"]) for m in pair["prompt"])
    return prompt_chars + max(len(pair["chosen"]), len(pair["rejected"])) > max_chars


def load_pairs(source: str, format: str | None = None, column_map: dict[str, str] | None = None,
               split: str = "train", max_length_chars: int | None = None, **format_options):
    """Read `source` (see `rlhf.data.sources.load_rows`) and turn it into canonical preference pairs.

    format: one of `FORMATS`; detected from the columns (after column_map renaming) when None.
    column_map: {field the format reads: column in the file}, for any format, e.g. for `pairs`
    {"prompt": "question", "chosen": "good", "rejected": "bad", "margin": "m"}.
    max_length_chars: drop pairs whose prompt characters plus the longer reply exceed it.
    format_options: the format's options (see `FORMATS[name].options`).

    Returns (datasets.Dataset of PreferencePair rows, SkipReport). A column the format needs that
    is missing, or no usable pair at all, is a UserError.
    """
    import datasets

    ds = load_rows(source, split=split)
    if column_map:
        ds = _apply_column_map(ds, column_map, source)
    detected = format is None
    if format is None:
        try:
            format = detect_format(ds.column_names, example_row=ds[0])
        except UserError as e:
            raise UserError(f"{source}: {e}") from None
    if format not in FORMATS:
        raise UserError(f"unknown preference format '{format}'; known: {', '.join(FORMATS)}")
    spec = FORMATS[format]
    options = _format_options(format, format_options)

    for column in _required_columns(format, options):
        if column not in ds.column_names:
            raise UserError(f"{source}: format '{format}' needs column '{column}', which is missing "
                            f"(found: {', '.join(ds.column_names)})")
    if spec.one_of and not set(spec.one_of) & set(ds.column_names):
        raise UserError(f"{source}: format '{format}' needs one of the columns {', '.join(spec.one_of)} "
                        f"(found: {', '.join(ds.column_names)})")

    report = SkipReport(format=format, rows_in=len(ds), source=source, detected=detected)
    rows = ds.to_list()
    if spec.group_by:  # dicts keep insertion order, so groups come in order of first appearance
        groups: dict[Any, list[dict]] = {}
        for row in rows:
            key = row[spec.group_by]
            groups.setdefault(key if isinstance(key, str) else repr(key), []).append(row)
        outcomes = (o for group in groups.values() for o in spec.adapter(group, **options))
    else:
        outcomes = (o for row in rows for o in spec.adapter(row, **options))

    pairs: list[PreferencePair] = []
    for outcome in outcomes:
        if isinstance(outcome, str):
            report.skipped[outcome] += 1
        elif max_length_chars is not None and _too_long(outcome, max_length_chars):
            report.skipped["too_long"] += 1
        else:
            pairs.append(outcome)
    report.pairs_out = len(pairs)
    if not pairs:
        raise UserError(f"{source}: no usable preference pairs ({report.summary()})")
    return datasets.Dataset.from_list(pairs, features=pair_features()), report


def pair_features():
    """The `datasets.Features` of canonical pairs (margin is float64, null where unknown)."""
    import datasets

    message = {"role": datasets.Value("string"), "content": datasets.Value("string")}
    return datasets.Features({"prompt": datasets.List(message), "chosen": datasets.Value("string"),
                              "rejected": datasets.Value("string"), "margin": datasets.Value("float64")})


def _clip(text: str, width: int) -> str:
    """One display line: newlines shown as \\n, cut to `width` characters."""
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 1] + "…"


def check_report(source: str, format: str | None = None, column_map: dict[str, str] | None = None,
                 split: str = "train", max_length_chars: int | None = None, n_examples: int = 3,
                 width: int = 160, **format_options) -> str:
    """The text of `rlhf data check SOURCE`: format, counts, skips by reason and a few example pairs."""
    pairs, report = load_pairs(source, format=format, column_map=column_map, split=split,
                               max_length_chars=max_length_chars, **format_options)
    how = "detected from columns" if report.detected else "given"
    lines = [f"source: {source}",
             f"format: {report.format} ({how})",
             f"rows read: {report.rows_in}",
             f"pairs: {report.pairs_out}",
             f"skipped: {report.total_skipped}"]
    for reason, n in report.skipped.most_common():
        lines.append(f"  {reason}: {n} ({SKIP_REASONS.get(reason, '')})")
    multi_turn = sum(1 for p in pairs["prompt"] if len(p) > 1)
    lines.append(f"multi-turn prompts: {multi_turn}")
    for i, pair in enumerate(pairs.select(range(min(n_examples, len(pairs))))):
        turns = len(pair["prompt"])
        lines += [f"example {i + 1} (prompt of {turns} message{'s' if turns != 1 else ''}):",
                  f"  last user turn: {_clip(pair['prompt'][-1]['content'], width)}",
                  f"  chosen:   {_clip(pair['chosen'], width)}",
                  f"  rejected: {_clip(pair['rejected'], width)}",
                  f"  margin:   {pair['margin']}"]
    return "\n".join(lines)
