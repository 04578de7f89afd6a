"""``crossfield data make|check``: build the reference data sets, or check them against their cards.

``make`` generates geometries (molecules, molecule pairs, bulk crystals, slabs with
adsorbates), labels them at their levels of theory (GFN2-xTB, GFN1-xTB, EMT) and writes
``<out>/<data set>/{train,valid,test}.extxyz.gz`` with a data card each. ``--quick`` makes
a handful of structures per family (seconds), for trying the pipeline out.
"""

from __future__ import annotations

import argparse
import logging


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "data",
        help="make the reference data sets at several levels of theory, or check them",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    make = actions.add_parser("make", help="generate and label the data sets")
    make.add_argument("--out", default="data", help="output folder (default: data)")
    make.add_argument("--only", nargs="+", metavar="NAME", help="data sets to make (default: all)")
    make.add_argument("--quick", action="store_true", help="a few structures per family")
    make.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    make.set_defaults(func=run_make)
    check = actions.add_parser("check", help="compare data set folders with their data cards")
    check.add_argument("folders", nargs="*", default=None, help="default: every set under data/")
    check.add_argument("--root", default="data", help="where to look without folders")
    check.set_defaults(func=run_check)


def run_make(args: argparse.Namespace) -> int:
    from dataclasses import replace
    from pathlib import Path

    from crossfield.training.datasets.pipeline import DATA_SETS, QUICK, Recipe, make_all

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    recipe = QUICK if args.quick else Recipe()
    if args.seed is not None:
        recipe = replace(recipe, seed=args.seed)
    names = args.only or [spec.name for spec in DATA_SETS]
    try:
        cards = make_all(Path(args.out), names, recipe, "quick" if args.quick else "full")
    except ValueError as err:
        raise SystemExit(f"crossfield data make: {err}") from None
    for card in cards:
        counts = {s: v["configurations"] for s, v in card["splits"].items()}
        print(f"{args.out}/{card['name']}: {card['level_of_theory']['method']} {counts}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from crossfield.training.datasets.cards import CARD_JSON, check

    folders = [Path(f) for f in args.folders] or sorted(
        p.parent for p in Path(args.root).glob(f"*/{CARD_JSON}")
    )
    if not folders:
        raise SystemExit(f"crossfield data check: no data sets (*/{CARD_JSON}) under {args.root}")
    failed = 0
    for folder in folders:
        problems = check(folder)
        print(f"{folder}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
        for problem in problems:
            print(f"  {problem}")
        failed += bool(problems)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m crossfield.training.data_cli ...``: the same command without the dispatcher."""
    parser = argparse.ArgumentParser(prog="crossfield")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", *(argv if argv is not None else __import__("sys").argv[1:])])
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
