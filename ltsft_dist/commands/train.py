"""``ltsft train CONFIG``: one LT-SFT run (language, task or BitFit) under any launcher; the work is
`ltsft_dist.train`."""

from __future__ import annotations

import argparse
import json

from ltsft_dist.errors import LtsftError


def register(subparsers) -> None:
    from ltsft_dist.launch_env import timeouts_help

    p = subparsers.add_parser(
        "train", help="run one LT-SFT (phase 1 -> select -> rewind -> phase 2) from a config file",
        description="Run one LT-SFT from a YAML/JSON config. Start it under a launcher for several ranks, e.g. "
                    "`deepspeed --num_gpus 2 --module ltsft_dist.cli train CONFIG`; alone it is a 1-rank run.",
        epilog=timeouts_help())
    p.add_argument("config", nargs="?", metavar="CONFIG", help="training config (YAML or JSON); see "
                                                               "ltsft_dist/configs/ and --help-config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set phase1.lr=1e-4 (repeatable)")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and help")
    p.set_defaults(func=train_command)


def train_command(args: argparse.Namespace) -> int:
    from ltsft_dist.config import TrainConfig, config_help, load_config

    if args.help_config:
        print(config_help(TrainConfig))
        return 0
    if not args.config:
        raise SystemExit("ltsft train: give a CONFIG file (or --help-config)")
    config = load_config(args.config, args.overrides)  # validated before any process group or model exists
    preflight_config(config, args.config)

    from ltsft_dist.training import EXIT_REQUEUE, train

    result = train(config)
    if result.preempted is not None:
        if result.rank == 0:
            print(f"stopped on request: checkpointed to {result.preempted}; run the same command again to resume",
                  flush=True)
        return EXIT_REQUEUE
    if result.rank == 0:
        stats, out = result.stats, result.output_dir
        print(json.dumps({"k": stats.k, "n_eligible": stats.n_eligible, "threshold": stats.threshold,
                          "zero_valued_selected": stats.zero_valued_selected, "frozen_drift": stats.frozen_drift,
                          "best_eval": stats.best_eval,
                          "seconds": {k: round(v, 2) for k, v in stats.seconds.items()}}))
        print(f"SFT written to {result.sft_dir}")
        print(f"TensorBoard logs in {out / 'tensorboard'}  (view: tensorboard --logdir {out / 'tensorboard'})")
    return 0



def preflight_config(config, path: str) -> None:
    """The config's own problems at the launcher's world size, named by its file, before DeepSpeed is imported
    (the run repeats them with the environment's and the run directory's in `preflight.before_training`)."""
    from ltsft_dist import preflight
    from ltsft_dist.launch_env import discover

    try:
        world = discover(use_mpi4py=False).world_size
    except LtsftError:  # ranks only mpi4py can tell: the run's own preflight has the world size
        return
    problems = preflight.check_training(config, world, path)
    if world == 1:  # alone it may fetch the base's config.json now; launched ranks check it together in the run
        problems += preflight.check_model_kind(config, path)
    preflight.require(problems)
