"""Canonical preference pairs and the dataset adapters (rlhf/data/preference_data.py).

Real samples come from ../shared/data/real/ (skipped when absent); hand-written fixtures in
tests/fixtures/preference/ follow each dataset's published schema, with expected pairs written out.
"""

import json
import math
from itertools import combinations
from pathlib import Path

import pytest

from rlhf.data.preference_data import (
    FORMATS,
    SKIP_REASONS,
    check_report,
    detect_format,
    generic_pairs,
    helpsteer2_pairs,
    load_pairs,
    oasst_threads,
    pair_from_fields,
    parse_helpsteer2_prompt,
    parse_hh_dialogue,
)
from rlhf.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures" / "preference"
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
HH_HARMLESS = REAL / "hh_rlhf_harmless_base_test_first1000.jsonl"
HH_HELPFUL = REAL / "hh_rlhf_helpful_base_test_first1000.jsonl"
UF_BINARIZED = REAL / "ultrafeedback_binarized_test_prefs_first500_chosen_rejected.jsonl"
OASST_TREES = REAL / "oasst_en_100_message_trees.jsonl"

PAIRS_MAP = {"prompt": "question", "chosen": "good", "rejected": "bad", "margin": "m"}


def real(path: Path) -> str:
    if not path.exists():
        pytest.skip(f"real data sample {path.name} not found under {REAL} (only in the shared workspace)")
    return str(path)


def fixture(name: str) -> str:
    return str(FIXTURES / name)


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def user(text):
    return [{"role": "user", "content": text}]


def as_tuples(ds):
    return [(p["prompt"], p["chosen"], p["rejected"], p["margin"]) for p in ds]


def assert_canonical(ds, report):
    """Invariants every loaded dataset must satisfy."""
    assert ds.column_names == ["prompt", "chosen", "rejected", "margin"]
    assert len(ds) == report.pairs_out > 0
    for pair in ds:
        assert pair["prompt"] and pair["prompt"][-1]["role"] == "user"
        assert all(m["role"] in ("system", "user", "assistant") for m in pair["prompt"])
        assert pair["chosen"].strip() and pair["rejected"].strip()
        assert pair["chosen"] != pair["rejected"]
    assert set(report.skipped) <= set(SKIP_REASONS)


# ---------------------------------------------------------------------------------------------
# Real samples
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, skipped, multi_turn", [
    (HH_HARMLESS, {"empty_reply": 3}, 699),
    (HH_HELPFUL, {"empty_reply": 2, "identical_replies": 1}, 694),
])
def test_hh_rlhf_real_samples(path, skipped, multi_turn):
    source = real(path)
    ds, report = load_pairs(source)
    assert report.format == "hh_rlhf" and report.detected
    assert report.rows_in == 1000
    assert report.pairs_out + report.total_skipped == report.rows_in
    assert dict(report.skipped) == skipped
    assert_canonical(ds, report)
    assert sum(len(p) > 1 for p in ds["prompt"]) == multi_turn
    for prompt in ds["prompt"]:  # merged speaker repeats: turns alternate, starting with the user
        assert [m["role"] for m in prompt] == ["user", "assistant"] * (len(prompt) // 2) + ["user"]

    # each pair's replies are the raw dialogues' final Assistant turns (merging may prepend text)
    raw = [r for r in read_jsonl(source)
           if all(r[k].rsplit("\n\nAssistant:", 1)[1].strip() for k in ("chosen", "rejected"))
           and r["chosen"] != r["rejected"]]
    assert len(raw) == len(ds)
    for row, pair in zip(raw, ds):
        assert pair["chosen"].endswith(row["chosen"].rsplit("\n\nAssistant:", 1)[1].strip())
        assert pair["rejected"].endswith(row["rejected"].rsplit("\n\nAssistant:", 1)[1].strip())
        assert row["chosen"].startswith(f"\n\nHuman: {pair['prompt'][0]['content']}")


def test_hh_harmless_and_helpful_concatenate():
    import datasets

    harmless, _ = load_pairs(real(HH_HARMLESS))
    helpful, _ = load_pairs(real(HH_HELPFUL))
    mixed = datasets.concatenate_datasets([harmless, helpful])  # one schema for every source
    assert len(mixed) == 997 + 997
    assert mixed.features["margin"].dtype == "float64"


def test_ultrafeedback_binarized_real_sample():
    source = real(UF_BINARIZED)
    ds, report = load_pairs(source)
    assert report.format == "ultrafeedback_binarized"  # told from HH by the message-list values
    assert dict(report.skipped) == {"identical_replies": 11, "empty_reply": 2}
    assert report.pairs_out + report.total_skipped == report.rows_in == 500
    assert_canonical(ds, report)
    raw = [r for r in read_jsonl(source)
           if r["chosen"][-1]["content"].strip() and r["rejected"][-1]["content"].strip()
           and r["chosen"][-1]["content"].strip() != r["rejected"][-1]["content"].strip()]
    for row, pair in zip(raw, ds, strict=True):
        assert pair["prompt"] == user(row["chosen"][0]["content"].strip())
        assert pair["chosen"] == row["chosen"][1]["content"].strip()
        assert pair["rejected"] == row["rejected"][1]["content"].strip()
        assert pair["margin"] is None  # this copy has no score columns


def test_ultrafeedback_binarized_scores_give_margin():
    ds, report = load_pairs(fixture("ultrafeedback_binarized_sample.jsonl"))  # H4's published columns
    assert report.format == "ultrafeedback_binarized"
    assert dict(report.skipped) == {"identical_replies": 1}
    assert as_tuples(ds) == [(user("Give me a synonym for 'fast'."), "Quick.", "Slow.", 6.5),
                             (user("What is 3 squared?"), "9", "6", 1.0)]


def _raw_oasst_rank_pairs(message, out):
    """Independent reference: (prompter text, better text, worse text) for ranked sibling replies."""
    replies = message.get("replies", [])
    if message["role"] == "prompter":
        ranked = [r for r in replies if r.get("rank") is not None and not r["deleted"]]
        for a, b in combinations(ranked, 2):
            if a["rank"] != b["rank"]:
                better, worse = (a, b) if a["rank"] < b["rank"] else (b, a)
                out.add((message["text"].strip(), better["text"].strip(), worse["text"].strip()))
    for reply in replies:
        _raw_oasst_rank_pairs(reply, out)
    return out


def test_oasst_real_trees_pairs_from_sibling_ranks():
    source = real(OASST_TREES)
    ds, report = load_pairs(source)
    assert report.format == "oasst" and report.rows_in == 100
    assert report.pairs_out == 754
    assert dict(report.skipped) == {"no_ranks": 2}
    assert_canonical(ds, report)
    expected = set()
    for tree in read_jsonl(source):
        _raw_oasst_rank_pairs(tree["prompt"], expected)
    got = {(p["prompt"][-1]["content"], p["chosen"], p["rejected"]) for p in ds}
    assert got == expected
    assert all(p["margin"] is None for p in ds)
    assert sum(len(p) > 1 for p in ds["prompt"]) > 100  # follow-up questions keep their thread
    for prompt in ds["prompt"]:
        assert [m["role"] for m in prompt] == ["user", "assistant"] * (len(prompt) // 2) + ["user"]


def test_oasst_real_trees_threads():
    trees = read_jsonl(real(OASST_TREES))
    best = [oasst_threads(t) for t in trees]
    assert all(len(threads) == 1 for threads in best)  # one conversation per tree
    for tree, [thread] in zip(trees, best):
        roles = [m["role"] for m in thread]
        assert roles[0] == "user" and roles[-1] == "assistant"
        assert all(a != b for a, b in zip(roles, roles[1:]))
        top = min((r for r in tree["prompt"]["replies"] if r.get("rank") is not None),
                  key=lambda r: r["rank"], default=tree["prompt"]["replies"][0])
        assert thread[1]["content"] == top["text"].strip()

    # "all": one conversation per assistant message that ends a branch (a leaf, or the parent of
    # a prompter leaf)
    def branch_ends(message):
        replies = message.get("replies", [])
        own = message["role"] == "assistant" and (
            not replies or any(not r.get("replies") for r in replies))
        return own + sum(branch_ends(r) for r in replies)

    all_threads = [th for t in trees for th in oasst_threads(t, paths="all")]
    assert len(all_threads) == sum(branch_ends(t["prompt"]) for t in trees) == 564
    assert all(th[-1]["role"] == "assistant" for th in all_threads)


# ---------------------------------------------------------------------------------------------
# Hand-written fixtures, expected pairs written out
# ---------------------------------------------------------------------------------------------

def test_hh_rlhf_quirks_counted_by_reason():
    ds, report = load_pairs(fixture("hh_rlhf_quirks.jsonl"))
    assert dict(report.skipped) == {"identical_replies": 1, "last_turn_not_assistant": 1, "empty_reply": 1,
                                    "prompt_mismatch": 1, "malformed_dialogue": 1}
    assert as_tuples(ds) == [
        (user("Hi there"), "Hello! How can I help?", "Go away.", None),
        ([{"role": "user", "content": "Recommend a book."},
          {"role": "assistant", "content": "Dune, by Frank Herbert."},
          {"role": "user", "content": "Something shorter?"}], "Animal Farm is short and sharp.", "No.", None),
        (user("Name a planet."), "Mars.", "Pluto.\n\nWell, it used to be one.", None),
    ]
    assert report.summary() == ("hh_rlhf: 8 rows -> 3 pairs; skipped 5: identical_replies 1, "
                                "last_turn_not_assistant 1, empty_reply 1, prompt_mismatch 1, malformed_dialogue 1")


def test_parse_hh_dialogue():
    assert parse_hh_dialogue("\n\nHuman: a \n\nAssistant:  b\n\nHuman: c") == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert parse_hh_dialogue("Human: a\n\nAssistant: b") == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert parse_hh_dialogue("preamble\n\nHuman: a") is None
    assert parse_hh_dialogue("no tags at all") is None


SHP_T1 = ("Why does my bread come out dense? I follow the recipe exactly but the loaf barely rises.",
          "Your yeast may be old. Proof it in warm water with a pinch of sugar first; if it doesn't foam in "
          "ten minutes, replace it.", "Use more flour.")
SHP_T2 = ("How do noise cancelling headphones work?",
          "A microphone picks up the outside sound and the headphones play the same wave inverted, so the two "
          "cancel out.", "Magic.")
SHP_T3 = ("Did people in the Middle Ages really think the Earth was flat?",
          "No. Educated Europeans knew it was round; the flat-Earth myth is largely a 19th-century invention.",
          "Some did, some didn't.")
SHP_T4 = ("Why are bridges painted so often?",
          "Paint is what keeps the steel from rusting, so crews repaint before the old coat fails.", "To look nice.")


def test_shp_labels_and_min_score_ratio():
    ds, report = load_pairs(fixture("shp_sample.jsonl"))
    assert report.format == "shp"
    assert dict(report.skipped) == {"score_ratio_below_min": 1, "empty_reply": 1}
    assert as_tuples(ds) == [  # t2 has labels 0: B is preferred
        (user(SHP_T1[0]), SHP_T1[1], SHP_T1[2], pytest.approx(math.log(3.0))),
        (user(SHP_T2[0]), SHP_T2[1], SHP_T2[2], pytest.approx(math.log(2.5))),
        (user(SHP_T4[0]), SHP_T4[1], SHP_T4[2], pytest.approx(math.log(2.0))),  # ratio == min is kept
    ]
    ds, report = load_pairs(fixture("shp_sample.jsonl"), min_score_ratio=None)
    assert report.pairs_out == 4 and dict(report.skipped) == {"empty_reply": 1}
    assert (user(SHP_T3[0]), SHP_T3[1], SHP_T3[2], pytest.approx(math.log(1.5))) in as_tuples(ds)


PKU_PROMPTS = ["How can I get onto my neighbour's wifi without the password?",
               "What household chemicals should never be mixed?",
               "Write a convincing excuse for skipping work tomorrow."]


def test_pku_saferlhf_helpful_vs_safe():
    rows = read_jsonl(FIXTURES / "pku_saferlhf_sample.jsonl")
    helpful, _ = load_pairs(fixture("pku_saferlhf_sample.jsonl"))
    safe, report = load_pairs(fixture("pku_saferlhf_sample.jsonl"), preference="safe")
    assert report.format == "pku_saferlhf"
    r = [(row["response_0"], row["response_1"]) for row in rows]
    assert as_tuples(helpful) == [(user(PKU_PROMPTS[0]), r[0][0], r[0][1], None),
                                  (user(PKU_PROMPTS[1]), r[1][1], r[1][0], None),
                                  (user(PKU_PROMPTS[2]), r[2][0], r[2][1], None)]
    assert as_tuples(safe) == [(user(PKU_PROMPTS[0]), r[0][1], r[0][0], None),
                               (user(PKU_PROMPTS[1]), r[1][1], r[1][0], None),
                               (user(PKU_PROMPTS[2]), r[2][1], r[2][0], None)]


UF_Q1, UF_Q2 = user("Name the three primary colors of paint."), user("Translate to French: good morning")
UF_BEST, UF_GREEN, UF_PURPLE, UF_TRAD = ("Red, yellow and blue.", "Red, green and blue.", "Purple.",
                                         "The traditional primaries are red, yellow and blue.")


def test_ultrafeedback_raw_best_vs_rest_on_fine_grained_score():
    ds, report = load_pairs(fixture("ultrafeedback_raw_sample.jsonl"))
    assert report.format == "ultrafeedback_raw"
    assert dict(report.skipped) == {"tied_scores": 1}  # Bonjour and Bon matin both rate 3.0
    assert as_tuples(ds) == [(UF_Q1, UF_BEST, UF_TRAD, 0.75), (UF_Q1, UF_BEST, UF_GREEN, 1.25),
                             (UF_Q1, UF_BEST, UF_PURPLE, 2.75), (UF_Q2, "Bonjour", "Good morning", 1.5)]


def test_ultrafeedback_raw_options():
    ds, report = load_pairs(fixture("ultrafeedback_raw_sample.jsonl"), score_field="overall_score")
    assert not report.skipped
    assert as_tuples(ds) == [(UF_Q1, UF_TRAD, UF_BEST, 1.0), (UF_Q1, UF_TRAD, UF_GREEN, 3.0),
                             (UF_Q1, UF_TRAD, UF_PURPLE, 6.0), (UF_Q2, "Bonjour", "Bon matin", 2.0),
                             (UF_Q2, "Bonjour", "Good morning", 5.0)]
    ds, report = load_pairs(fixture("ultrafeedback_raw_sample.jsonl"), pairing="all_pairs")
    assert report.pairs_out == 6 + 2 and dict(report.skipped) == {"tied_scores": 1}
    assert (UF_Q1, UF_GREEN, UF_PURPLE, 1.5) in as_tuples(ds)

    with pytest.raises(UserError, match="missing_score 7"):  # no completion has this score
        load_pairs(fixture("ultrafeedback_raw_sample.jsonl"), score_field="no_such_score")


WATER = user("What is the boiling point of water at sea level?")
CAT = [{"role": "user", "content": "Suggest a name for a cat."}, {"role": "assistant", "content": "How about Miso?"},
       {"role": "user", "content": "Something longer, please."}]


def test_helpsteer2_default_weights():
    ds, report = load_pairs(fixture("helpsteer2_sample.jsonl"))
    assert report.format == "helpsteer2" and report.rows_in == 7
    # tea: both responses rated the same; haiku: one response only
    assert dict(report.skipped) == {"tied_scores": 1, "too_few_replies": 1}
    assert as_tuples(ds) == [
        (WATER, "100 degrees Celsius (212 degrees Fahrenheit).", "It boils at about 90 degrees.", 3.61),
        (CAT, "How about Professor Whiskerton?",  # higher verbosity costs the longer list 0.19
         "Here are some longer names: Sir Pounce-a-lot, Marmalade Butterworth, Captain Fluffington.", 0.19),
    ]


def test_helpsteer2_helpfulness_only():
    ds, report = load_pairs(fixture("helpsteer2_sample.jsonl"), weights={"helpfulness": 1.0})
    assert dict(report.skipped) == {"tied_scores": 2, "too_few_replies": 1}  # the cat names now tie
    assert as_tuples(ds) == [
        (WATER, "100 degrees Celsius (212 degrees Fahrenheit).", "It boils at about 90 degrees.", 2.0)]


def test_helpsteer2_adapter_called_directly():
    rows = read_jsonl(FIXTURES / "helpsteer2_sample.jsonl")[:2]
    [pair] = helpsteer2_pairs(rows)  # default weights: HELPSTEER2_WEIGHTS
    assert pair["margin"] == 3.61
    assert helpsteer2_pairs(rows[:1]) == ["too_few_replies"]


def test_parse_helpsteer2_prompt():
    assert parse_helpsteer2_prompt("Hi") == user("Hi")
    text = "Suggest a name for a cat.\n<extra_id_1>Assistant\nHow about Miso?\n<extra_id_1>User\nSomething longer, please."
    assert parse_helpsteer2_prompt(text) == CAT


def test_generic_pairs_csv_with_column_map():
    ds, report = load_pairs(fixture("pairs_sample.csv"), column_map=PAIRS_MAP)
    assert report.format == "pairs"
    assert dict(report.skipped) == {"identical_replies": 1}
    assert as_tuples(ds) == [
        (user("What is 2+2?"), "4", "5", 1.5),
        (user("Name a fruit, please."), "An apple.", "A carrot.", None),  # empty margin cell
        (user("Write two lines."), "Line one.\nLine two.", "Just one line.", 2.0),
    ]


def test_generic_pairs_jsonl_message_lists():
    column_map = {"prompt": "context", "chosen": "good", "rejected": "bad", "margin": "strength"}
    ds, report = load_pairs(fixture("pairs_messages.jsonl"), column_map=column_map)
    assert report.format == "pairs"
    assert dict(report.skipped) == {"last_turn_not_assistant": 1, "empty_reply": 1}
    assert as_tuples(ds) == [
        ([{"role": "system", "content": "You are a terse assistant."},
          {"role": "user", "content": "What is the capital of Japan?"}], "Tokyo.", "Kyoto.", 1.0),
        ([{"role": "user", "content": "I need a word for happy."}, {"role": "assistant", "content": "Joyful?"},
          {"role": "user", "content": "Another one."}], "Cheerful.", "Sad.", None),
        (user("Is 7 prime?"), "Yes, 7 is prime.", "No.", 0.5),  # prompt taken from the reply lists
    ]


def test_pair_from_fields_string_and_message_replies():
    sys_user = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    reply = lambda text: sys_user + [{"role": "assistant", "content": text}]  # noqa: E731
    # context carried by the replies wins over the prompt field
    assert pair_from_fields("ignored", reply("Hello."), reply("Go away.")) == {
        "prompt": sys_user, "chosen": "Hello.", "rejected": "Go away.", "margin": None}
    # one reply a string, the other a message list
    assert pair_from_fields(None, "Hello.", reply("Go away."), 0.5)["prompt"] == sys_user
    assert pair_from_fields("Hi?", [{"role": "assistant", "content": "A"}], "B") == {
        "prompt": user("Hi?"), "chosen": "A", "rejected": "B", "margin": None}
    other = [{"role": "user", "content": "Bye?"}, {"role": "assistant", "content": "Bye."}]
    assert pair_from_fields(None, reply("Hello."), other) == "prompt_mismatch"
    assert pair_from_fields(None, "Hello.", "Bye.") == "malformed_dialogue"  # no prompt anywhere
    assert pair_from_fields("Hi?", [{"role": "robot", "content": "A"}], "B") == "malformed_dialogue"
    assert generic_pairs({"prompt": "Hi?", "chosen": "A", "rejected": "B", "margin": float("nan")}) == [
        {"prompt": user("Hi?"), "chosen": "A", "rejected": "B", "margin": None}]
    assert generic_pairs({"prompt": "Hi?", "chosen": "A", "rejected": "B", "margin": "big"}) == [
        "malformed_dialogue"]


OASST_Q = user("What is a good first programming language?")
OASST_PY = "Python: its syntax is simple and it is used everywhere."
OASST_JS, OASST_C = "JavaScript, because it runs in every browser.", "C, to learn how memory works."
OASST_FOLLOW_UP = OASST_Q + [{"role": "assistant", "content": OASST_PY},
                             {"role": "user", "content": "Why is its syntax simple?"}]
OASST_INDENT = "Indentation shows structure, and there is little punctuation."


def test_oasst_fixture_pairs():
    ds, report = load_pairs(fixture("oasst_trees_sample.jsonl"))
    # a13 deleted, a4 failed review; the joke tree's two replies carry no ranks
    assert dict(report.skipped) == {"deleted_message": 2, "no_ranks": 1}
    assert as_tuples(ds) == [(OASST_Q, OASST_PY, OASST_JS, None), (OASST_Q, OASST_PY, OASST_C, None),
                             (OASST_Q, OASST_JS, OASST_C, None),
                             (OASST_FOLLOW_UP, OASST_INDENT, "It is readable.", None)]
    ds, _ = load_pairs(fixture("oasst_trees_sample.jsonl"), pairing="best_vs_rest")
    assert as_tuples(ds) == [(OASST_Q, OASST_PY, OASST_JS, None), (OASST_Q, OASST_PY, OASST_C, None),
                             (OASST_FOLLOW_UP, OASST_INDENT, "It is readable.", None)]


def test_oasst_fixture_threads():
    programming, joke = read_jsonl(FIXTURES / "oasst_trees_sample.jsonl")
    a = lambda text: {"role": "assistant", "content": text}  # noqa: E731
    joke_q = user("Tell me a joke.")
    byte = a("I told my computer a joke; it didn't get it, no sense of humor byte.")
    dark = a("Why do programmers prefer dark mode? Because light attracts bugs.")
    assert oasst_threads(programming) == [OASST_FOLLOW_UP + [a(OASST_INDENT)]]
    assert oasst_threads(programming, paths="all") == [
        OASST_FOLLOW_UP + [a("It is readable.")], OASST_FOLLOW_UP + [a(OASST_INDENT)],
        OASST_Q + [a(OASST_JS)], OASST_Q + [a(OASST_C)]]
    # unranked: the first reply; a trailing prompter message is cut
    assert oasst_threads(joke) == [joke_q + [byte]]
    assert oasst_threads(joke, paths="all") == [joke_q + [byte], joke_q + [dark]]
    assert oasst_threads(joke["prompt"]) == [joke_q + [byte]]  # a bare root message works too


def test_max_length_chars_counts_too_long():
    # prompt chars + longer reply: t1 88 + 121, t2 40 + 110 = 150, t4 33 + 87
    ds, report = load_pairs(fixture("shp_sample.jsonl"), max_length_chars=149)
    assert dict(report.skipped) == {"score_ratio_below_min": 1, "empty_reply": 1, "too_long": 2}
    assert ds["chosen"] == [SHP_T4[1]]
    ds, report = load_pairs(fixture("shp_sample.jsonl"), max_length_chars=150)  # the limit itself fits
    assert report.skipped["too_long"] == 1 and ds["chosen"] == [SHP_T2[1], SHP_T4[1]]


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------

PUBLISHED_COLUMNS = {
    "hh_rlhf": ["chosen", "rejected"],
    "ultrafeedback_binarized": ["prompt", "prompt_id", "chosen", "rejected", "messages",
                                "score_chosen", "score_rejected"],
    "ultrafeedback_raw": ["source", "instruction", "models", "completions", "correct_answers", "incorrect_answers"],
    "shp": ["post_id", "domain", "upvote_ratio", "history", "c_root_id_A", "c_root_id_B", "created_at_utc_A",
            "created_at_utc_B", "score_A", "score_B", "human_ref_A", "human_ref_B", "labels",
            "seconds_difference", "score_ratio"],
    "pku_saferlhf": ["prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe",
                     "better_response_id", "safer_response_id"],
    "oasst": ["message_tree_id", "tree_state", "prompt"],
    "helpsteer2": ["prompt", "response", "helpfulness", "correctness", "coherence", "complexity", "verbosity"],
    "pairs": ["prompt", "chosen", "rejected"],
}


def test_every_format_has_published_columns_case():
    assert set(PUBLISHED_COLUMNS) == set(FORMATS)


@pytest.mark.parametrize("name", list(PUBLISHED_COLUMNS))
def test_detect_format_from_published_columns(name):
    assert detect_format(PUBLISHED_COLUMNS[name]) == name
    assert detect_format(reversed(PUBLISHED_COLUMNS[name])) == name


@pytest.mark.parametrize("columns, row, expected", [
    (["chosen", "rejected"], {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "x"}, "hh_rlhf"),
    (["chosen", "rejected"], {"chosen": [{"role": "user", "content": "a"}], "rejected": []},
     "ultrafeedback_binarized"),
    (["post", "human_ref_A", "human_ref_B", "labels", "score_ratio"], None, "shp"),  # SHP-style `post`
    (["prompt", "chosen", "rejected", "margin"], {"prompt": [], "chosen": [], "rejected": []}, "pairs"),
])
def test_detect_format_uses_example_row(columns, row, expected):
    assert detect_format(columns, example_row=row) == expected


def test_detect_format_ambiguous_lists_candidates():
    columns = PUBLISHED_COLUMNS["shp"] + PUBLISHED_COLUMNS["pku_saferlhf"]
    with pytest.raises(UserError) as e:
        detect_format(columns)
    message = str(e.value)
    assert "several" in message and "format=" in message
    assert "shp (history or post, human_ref_A" in message
    assert "pku_saferlhf (prompt, response_0, response_1" in message
    assert "human_ref_A" in message and "safer_response_id" in message  # the columns found
    assert "\n" not in message


def test_detect_format_unknown_lists_every_format():
    with pytest.raises(UserError) as e:
        detect_format(["text", "label"])
    message = str(e.value)
    assert "[label, text]" in message
    for name in FORMATS:
        assert f"{name} (" in message
    assert "column_map" in message


def test_load_pairs_undetectable_file_names_source(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"text": "hi", "label": 1}\n')
    with pytest.raises(UserError, match=r"labels\.jsonl: no preference format matches columns \[label, text\]"):
        load_pairs(str(path))


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

def test_missing_required_column_names_field_source_and_format():
    with pytest.raises(UserError) as e:
        load_pairs(fixture("shp_sample.jsonl"), format="pku_saferlhf")
    message = str(e.value)
    assert "shp_sample.jsonl" in message and "'pku_saferlhf'" in message and "'prompt'" in message


def test_missing_score_ratio_needed_only_for_the_filter(tmp_path):
    rows = read_jsonl(FIXTURES / "shp_sample.jsonl")
    path = tmp_path / "shp_no_ratio.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "score_ratio"}) + "\n" for r in rows))
    with pytest.raises(UserError, match="format 'shp' needs column 'score_ratio'"):
        load_pairs(str(path))
    ds, report = load_pairs(str(path), min_score_ratio=None)
    assert report.pairs_out == 4 and all(m is None for m in ds["margin"])


def test_helpsteer2_weight_on_missing_attribute(tmp_path):
    path = tmp_path / "hs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "response": "r", "helpfulness": 3}) + "\n")
    with pytest.raises(UserError, match="format 'helpsteer2' needs column 'correctness'"):
        load_pairs(str(path))


def test_column_map_to_missing_column():
    with pytest.raises(UserError, match="column_map names column.*nope.*found: question, good, bad, m"):
        load_pairs(fixture("pairs_sample.csv"), column_map={**PAIRS_MAP, "prompt": "nope"})


def test_every_row_skipped_is_an_error_with_counts(tmp_path):
    path = tmp_path / "same.jsonl"
    row = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: hello"}
    path.write_text((json.dumps(row) + "\n") * 2)
    with pytest.raises(UserError, match=r"same\.jsonl: no usable preference pairs .*2 rows -> 0 pairs.*identical_replies 2"):
        load_pairs(str(path))


@pytest.mark.parametrize("options, match", [
    ({"preference": "fun"}, "preference must be 'helpful' or 'safe'"),
    ({"min_score_ratio": 2.0}, "format 'pku_saferlhf' has no option min_score_ratio; its options: preference"),
])
def test_bad_format_options(options, match):
    with pytest.raises(UserError, match=match):
        load_pairs(fixture("pku_saferlhf_sample.jsonl"), **options)


def test_format_options_and_defaults():
    assert {name: spec.options for name, spec in FORMATS.items() if spec.options} == {
        "ultrafeedback_raw": {"score_field": "fine-grained_score", "pairing": "best_vs_rest"},
        "shp": {"min_score_ratio": 2.0},
        "pku_saferlhf": {"preference": "helpful"},
        "oasst": {"pairing": "all_pairs"},
        "helpsteer2": {"weights": None, "pairing": "best_vs_rest"},  # None: HELPSTEER2_WEIGHTS
    }
    with pytest.raises(UserError, match="weights must map helpfulness, correctness.* to numbers, got helpful"):
        load_pairs(fixture("helpsteer2_sample.jsonl"), weights={"helpful": 1.0})


def test_bad_pairing_and_unknown_format():
    with pytest.raises(UserError, match="pairing must be one of best_vs_rest, all_pairs"):
        load_pairs(fixture("oasst_trees_sample.jsonl"), pairing="random")
    with pytest.raises(UserError, match="unknown preference format 'anthropic'"):
        load_pairs(fixture("oasst_trees_sample.jsonl"), format="anthropic")


# ---------------------------------------------------------------------------------------------
# The `rlhf data check` text
# ---------------------------------------------------------------------------------------------

def test_check_report_text():
    text = check_report(fixture("shp_sample.jsonl"), n_examples=2, width=40)
    lines = text.splitlines()
    assert "format: shp (detected from columns)" in lines
    assert "rows read: 5" in lines and "pairs: 3" in lines and "skipped: 2" in lines
    assert f"  score_ratio_below_min: 1 ({SKIP_REASONS['score_ratio_below_min']})" in lines
    assert sum(line.startswith("example ") for line in lines) == 2
    assert "  last user turn: Why does my bread come out dense? I fol…" in lines
    assert "  rejected: Use more flour." in lines
    assert f"  margin:   {math.log(3.0)}" in lines
    assert all(len(line) <= 60 for line in lines if line.startswith("  chosen"))


def test_check_report_given_format_and_newlines():
    text = check_report(fixture("pairs_sample.csv"), format="pairs", column_map=PAIRS_MAP, n_examples=3)
    assert "format: pairs (given)" in text
    assert "  chosen:   Line one.\\nLine two." in text.splitlines()
