"""The single ``ltsft`` entry point; each subcommand lives in ``ltsft_dist.commands``."""

from __future__ import annotations

import argparse
import sys

from ltsft_dist import __version__
from ltsft_dist.errors import LtsftError


def build_parser() -> argparse.ArgumentParser:
    from ltsft_dist.commands import artifact, train

    parser = argparse.ArgumentParser(
        prog="ltsft",
        description="Distributed Lottery-Ticket Sparse Fine-Tuning (LT-SFT) on DeepSpeed.",
    )
    parser.add_argument("--version", action="version", version=f"ltsft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (train, artifact):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except LtsftError as err:
        print(f"ltsft {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
