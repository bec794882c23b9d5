"""`rlhf data check SOURCE`: read preference data as training would, and show what came out.

    rlhf data check ../shared/data/real/hh_rlhf_helpful_base_test_first1000.jsonl
    rlhf data check shp.jsonl --format shp --option min_score_ratio=3
    rlhf data check my.csv --format pairs --column_map prompt=question chosen=good rejected=bad

Prints the format (given or detected), rows read, pairs made, rows skipped by reason and a few
example pairs.
"""

from __future__ import annotations

import argparse

import yaml

from rlhf.data.preference_data import FORMATS, check_report
from rlhf.errors import ArgumentParser, UserError


def _pairs(items: list[str], flag: str) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{flag} expects NAME=VALUE, got '{item}'")
        out[key] = value
    return out


def cli(argv: list[str]) -> None:
    parser = ArgumentParser(prog="rlhf data", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", metavar="check", required=True)
    p = sub.add_parser("check", help="counts, skip reasons and examples of a preference source",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a local .jsonl/.json/.csv/.parquet file, builtin:NAME, or a hub dataset owner/name")
    p.add_argument("--format", choices=list(FORMATS), help="source format (default: detected from the columns)")
    p.add_argument("--column_map", "--column-map", nargs="+", default=[], metavar="FIELD=COLUMN",
                   help="read the format's FIELD from the file's COLUMN")
    p.add_argument("--option", nargs="+", default=[], metavar="NAME=VALUE",
                   help="a format option, e.g. min_score_ratio=3, pairing=all_pairs, preference=safe "
                        "(VALUE is read as YAML)")
    p.add_argument("--split", default="train", help="split of a hub dataset (default: train)")
    p.add_argument("--max_length_chars", "--max-length-chars", type=int, default=None,
                   help="drop pairs whose prompt plus longer reply exceed this many characters")
    p.add_argument("--examples", type=int, default=3, help="example pairs to show (default: 3)")
    args = parser.parse_args(argv)
    options = {k: yaml.safe_load(v) for k, v in _pairs(args.option, "--option").items()}
    print(check_report(args.source, format=args.format, column_map=_pairs(args.column_map, "--column_map") or None,
                       split=args.split, max_length_chars=args.max_length_chars, n_examples=args.examples,
                       **options))
