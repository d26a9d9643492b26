"""``ltsft pipeline CONFIG``: base → language SFTs → multi-source task SFT → zero-shot evaluation, resumable."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from ltsft_dist import preflight
from ltsft_dist.errors import LtsftError


def register(subparsers) -> None:
    from ltsft_dist.launch_env import timeouts_help

    p = subparsers.add_parser(
        "pipeline", help="run the whole recipe from one config: language SFTs, task SFT, zero-shot evaluation",
        description="Run every stage of a pipeline config (see ltsft_dist/configs/paper_*.yaml and "
                    "`ltsft demo`) in order. "
                    "Each stage's directory under output_dir is named by a hash of its inputs: finished stages "
                    "are skipped, an interrupted stage resumes from its checkpoints. Started alone, each stage "
                    "runs on `ranks` local processes (torchrun); started by a launcher (srun, "
                    "mpirun, deepspeed) with --stage, that stage runs on the launcher's ranks.",
        epilog=timeouts_help())
    p.add_argument("config", nargs="?", metavar="CONFIG", help="pipeline config (YAML); see --help-config")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and help")
    p.add_argument("--dry-run", action="store_true", help="print the stages, their directories and state; run nothing")
    p.add_argument("--check", action="store_true",
                   help="run the preflight for every stage at its ranks (batch split, precision/ZeRO/optimizer, GPUs, "
                        "dependency versions) and exit 0 (none found) or 1 (the list); downloads and runs nothing. "
                        "The same checks run before any stage starts, and at the start of every training stage with "
                        "the run directory's shared-file-system check")
    p.add_argument("--stage", metavar="NAME",
                   help="run only this stage (base, lang:<xx>, task or eval), on the ranks of the current launcher "
                        "if there is one (what the slurm/ chain does)")
    p.add_argument("--ranks", type=int, help="local ranks per stage (default: the config's `ranks`)")
    p.add_argument("--master-port", type=int, help="rendezvous port of the local ranks (default: a free one, so "
                                                    "two pipelines on one machine do not collide)")
    p.set_defaults(func=pipeline_command)


def pipeline_command(args: argparse.Namespace) -> int:
    from ltsft_dist import pipeline as pl

    if args.help_config:
        from ltsft_dist.config import config_help

        print(config_help(pl.PipelineConfig))
        return 0
    if not args.config:
        raise SystemExit("ltsft pipeline: give a CONFIG file (or --help-config)")
    config = pl.load_pipeline(args.config)
    if args.ranks:
        config.ranks = args.ranks
    stages = pl.plan(config)
    by_name = {s.name: s for s in stages}
    if args.stage and args.stage not in by_name:
        raise LtsftError(f"--stage {args.stage!r}: not a stage of this pipeline ({', '.join(by_name)})")
    print(f"pipeline {args.config} -> {config.output_dir}\n{pl.describe(stages)}", flush=True)
    problems = check(stages, config, args)
    if args.check:
        if problems:
            print(f"preflight: {len(problems)} problem{'s' if len(problems) > 1 else ''}:\n"
                  f"{preflight.describe(problems)}", file=sys.stderr)
            return 1
        trained = sum(1 for s in stages if s.config is not None and s.name != "eval" and args.stage in (None, s.name))
        print(f"preflight: no problems at {_world(config, args)[0]} ranks ({trained} training stage"
              f"{'s' if trained != 1 else ''}: batch split, precision/ZeRO/optimizer; this machine's GPUs and "
              "dependency versions)", flush=True)
        return 0
    if args.dry_run:
        return 0
    preflight.require(problems)
    if args.stage:
        stage = by_name[args.stage]
        if stage.done:
            print(f"stage {stage.name} is done ({stage.directory}): skipped")
            return 0
        return run_stage(stage, config, by_name, in_process=under_launcher())
    for stage in stages:
        if stage.done:
            continue
        status = run_stage(stage, config, by_name, in_process=False, master_port=args.master_port)
        if status != 0:
            print(f"stage {stage.name} failed (exit {status}); fix it and run the same command again: finished "
                  "stages are skipped and this one resumes", file=sys.stderr)
            return status
    return report(config, by_name["eval"])


def _world(config, args) -> tuple[int, int]:
    """(ranks, ranks on this node) a stage runs on: the enclosing launcher's for `--stage` under one, else the
    config's `ranks` (or --ranks) on this machine."""
    if args.stage and under_launcher():
        env = _launch()
        return env.world_size, env.local_size
    return config.ranks, config.ranks


def check(stages, config, args) -> list:
    """The preflight's problems for the stages to run (all, or --stage's) at the ranks they run on (`_world`)."""
    ranks, local = _world(config, args)
    chosen = [s for s in stages if s.name == args.stage] if args.stage else stages
    return preflight.check_pipeline(chosen, ranks, args.config, local_ranks=local)


def _launch():
    """Where this process sits in the job, from the launcher's, SLURM's or MPI's variables (a world of one
    alone), read before any process group exists."""
    from ltsft_dist.launch_env import discover

    return discover(use_mpi4py=False)


def under_launcher() -> bool:
    return _launch().source != "single"


def run_stage(stage, config, by_name: dict, *, in_process: bool, master_port: int | None = None) -> int:
    from ltsft_dist import pipeline as pl

    missing = [n for n in stage.needs if not by_name[n].done]
    if missing:
        raise LtsftError(f"stage {stage.name} needs {', '.join(missing)} first (run those stages, or the whole "
                         "pipeline without --stage)")
    stage.directory.mkdir(parents=True, exist_ok=True)
    print(f"== stage {stage.name}: {stage.directory}", flush=True)
    if in_process:
        rank = _launch().rank
        status = pl.run_stage_here(config, stage, rank)
        if status == 0 and rank == 0:
            pl.mark_done(stage)
        return status
    if stage.name == "base":  # (rank 0's work only: no ranks to launch)
        status = pl.run_stage_here(config, stage, 0)
    else:
        status = subprocess.call(local_launcher(config.ranks, master_port) + pl.stage_argv(stage))
    if status == 0:
        pl.mark_done(stage)
    return status


def local_launcher(ranks: int, master_port: int | None) -> list[str]:
    """torchrun with `ranks` local processes running `ltsft_dist.cli`. It starts the ranks itself, where the deepspeed
    launcher's runner starts a per-node launcher that starts them: two interpreters importing DeepSpeed per stage
    instead of one importing torch (measured: 18.9 s against 8.1 s to start 2 ranks on 2 shared cores)."""
    from ltsft_dist.launch_env import free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr",
            "127.0.0.1", "--master-port", str(master_port or free_port()), "--module", "ltsft_dist.cli"]


def report(config, stage) -> int:
    root = Path(config.output_dir)
    for name in ("results.md", "results.json"):
        source = stage.directory / name
        if not source.is_file():
            raise LtsftError(f"evaluation wrote no {source}")
        shutil.copyfile(source, root / name)
    print((root / "results.md").read_text())
    print(f"results: {root / 'results.md'} and {root / 'results.json'}")
    print(f"SFTs: {root}/lang-*/sft (language), {root}/task-*/sft (task)")
    print(f"TensorBoard: tensorboard --logdir {root}   (each stage's logs are in its tensorboard/ folder)")
    return 0
