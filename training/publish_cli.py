"""``crossfield publish CHECKPOINT --repo REPO --name NAME [--version V]``."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "publish",
        help="publish a checkpoint into a model repository",
        description="Copy a checkpoint and its meta.json into REPO/NAME/VERSION atomically.",
    )
    parser.add_argument(
        "checkpoint", help="a Crossfield checkpoint (e.g. a training run's model.pt)"
    )
    parser.add_argument("--repo", required=True, help="model repository root folder")
    parser.add_argument("--name", required=True, help="model name (folder under the repository)")
    parser.add_argument(
        "--version", type=int, default=None, help="version number (default: the next integer)"
    )
    parser.add_argument("--meta", default=None, help="extra meta.json fields as a JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from crossfield.training.publish import publish

    extra = json.loads(args.meta) if args.meta else None
    if extra is not None and not isinstance(extra, dict):
        raise SystemExit("--meta: must be a JSON object")
    target = publish(args.checkpoint, args.repo, args.name, args.version, extra)
    print(target)
    return 0
