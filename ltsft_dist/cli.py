"""The single ``ltsft`` entry point; each subcommand lives in ``ltsft_dist.commands``."""

from __future__ import annotations

import argparse
import sys

from ltsft_dist import __version__
from ltsft_dist.errors import LtsftError


def build_parser() -> argparse.ArgumentParser:
    from ltsft_dist.commands import artifact, demo, evaluate, pipeline, train

    parser = argparse.ArgumentParser(
        prog="ltsft",
        description="Distributed Lottery-Ticket Sparse Fine-Tuning (LT-SFT) on DeepSpeed.",
    )
    parser.add_argument("--version", action="version", version=f"ltsft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (train, evaluate, pipeline, demo, artifact):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    # The deepspeed launcher prepends --local_rank=N; the rank comes from the environment anyway.
    args = parser.parse_args([a for a in argv if not a.startswith("--local_rank")])
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        status = int(args.func(args) or 0)
    except LtsftError as err:
        print(f"ltsft {args.command}: error: {err}", file=sys.stderr)
        return 2
    if status == 0:
        from ltsft_dist.engine import leave_cleanly

        leave_cleanly()  # a distributed run ends here, before any C++ teardown can abort it
    return status


if __name__ == "__main__":
    sys.exit(main())
