"""The single ``ltsft`` entry point; each subcommand lives in ``ltsft_dist.commands``."""

from __future__ import annotations

import argparse
import sys
import traceback

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
        print(f"ltsft {args.command}: {_rank_label()}error: {err}", file=sys.stderr)
        status = 2
    except Exception:
        if not _rank_label():
            raise
        print(f"ltsft {args.command}: {_rank_label()}error:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        print(_gone_peers(args.command), end="", file=sys.stderr)
        status = 1
    if "ltsft_dist.engine" in sys.modules:
        from ltsft_dist.engine import leave_cleanly

        # A distributed run ends here, whatever the outcome: a failing rank must not wait in exit-time
        # collectives or C++ teardown (the other ranks would hang until the timeout); the launcher (deepspeed,
        # srun --kill-on-bad-exit, mpiexec) ends the other ranks as soon as it sees the non-zero status.
        leave_cleanly(status)
    return status


def _gone_peers(command: str) -> str:
    """After a failed collective: which ranks on this host are no longer running (a killed rank says nothing)."""
    from ltsft_dist.engine import gone_peers

    gone = gone_peers()
    if not gone:
        return ""
    return (f"ltsft {command}: {', '.join(gone)} ended while this rank was "
            "waiting for it (killed or crashed: see its output and the launcher's log). Running the same command "
            "again resumes from the last complete checkpoint\n")


def _rank_label() -> str:
    """'rank 1/4: ' in a process group (for messages that must say which rank failed), else ''."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return ""
    return f"rank {dist.get_rank()}/{dist.get_world_size()}: "


if __name__ == "__main__":
    sys.exit(main())
