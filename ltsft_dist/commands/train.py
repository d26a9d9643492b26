"""``ltsft train CONFIG``: one LT-SFT run (language, task or BitFit) under any launcher."""

from __future__ import annotations

import argparse
import json
import signal
from pathlib import Path

from ltsft_dist.errors import LtsftError

EXIT_REQUEUE = 42  # "checkpointed on request, run me again": slurm/ scripts requeue the job on this status


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="run one LT-SFT (phase 1 -> select -> rewind -> phase 2) from a config file",
        description="Run one LT-SFT from a YAML/JSON config. Start it under a launcher for several ranks, e.g. "
                    "`deepspeed --num_gpus 2 --module ltsft_dist.cli train CONFIG`; alone it is a 1-rank run.")
    p.add_argument("config", metavar="CONFIG", help="training config (YAML or JSON); see ltsft_dist/configs/")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set phase1.lr=1e-4 (repeatable)")
    p.set_defaults(func=train_command)


def train_command(args: argparse.Namespace) -> int:
    from ltsft_dist.config import load_config

    config = load_config(args.config, args.overrides)  # validate before any process group or model exists
    base_dir = Path(args.config).resolve().parent

    def beside_config(path: str | None) -> str | None:
        """A relative path is taken from the config's folder, where it exists there."""
        return str(base_dir / path) if path and not Path(path).is_absolute() and (base_dir / path).exists() else path

    config.data.train_file = beside_config(config.data.train_file) or ""
    for source in config.data.sources:
        source.train_file = beside_config(source.train_file)
    config.language_sfts = {language: beside_config(path) for language, path in config.language_sfts.items()}
    return run_training(config, base_dir)


def run_training(config, base_dir: Path | None = None) -> int:
    from transformers import AutoTokenizer

    from ltsft_dist import comm
    from ltsft_dist.engine import init_distributed, load_ds_config
    from ltsft_dist.heldout import HeldOut
    from ltsft_dist.models import build_model
    from ltsft_dist.recipe import LTSFTRecipe, Preempted
    from ltsft_dist.training_data import build_tokenizer, encode_sources, read_sources

    init_distributed()
    rank, world = comm.rank(), comm.world_size()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources = read_sources(config)
    if not config.languages:
        config.languages = [s.language for s in sources if s.language]
    sfts = load_language_sfts(config)
    resuming = config.resume and (out / "checkpoints" / "latest").is_file()
    if rank == 0 and not resuming:  # one tokenizer for all ranks, saved beside the SFT so it stays usable;
        # a resumed run keeps the saved one (a retrained WordPiece may number its tokens differently)
        build_tokenizer(config, sources).save_pretrained(str(out / "tokenizer"))
    comm.barrier()
    tokenizer = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    data = encode_sources(config, tokenizer, sources)
    config.data.labels = data.labels  # recorded in the SFT: evaluation maps the head's outputs back to names
    if rank == 0:
        for language, report in data.report.items():
            print(f"data [{language}]: " + ", ".join(f"{k}={v}" for k, v in report.items()), flush=True)
    model = build_model(config.model, config.task, num_labels=len(data.labels) if data.labels else None,
                        vocab_size=len(tokenizer), seed=config.seed)
    per_step = config.micro_batch_size * world
    if config.batch_size % per_step:
        raise LtsftError(f"batch_size={config.batch_size} must be a multiple of micro_batch_size × ranks = "
                         f"{config.micro_batch_size} × {world}")
    order, hooks, swap = None, [], None
    if len(data.train) > 1 or sfts:  # one source language (and its SFT) per optimizer step
        from ltsft_dist.multisource import build_multisource

        order, swap = build_multisource(model, data.train, sfts or None, config, sampling=config.sampling,
                                        rank=rank, world_size=world)
        hooks = [swap] if swap is not None else []
    held_out = (HeldOut(data.held_out, config.micro_batch_size, rank, world, swap=swap) if data.held_out else None)
    ds_config = load_ds_config(config.deepspeed_path(base_dir), micro_batch_size=config.micro_batch_size,
                               accumulation=config.batch_size // per_step, world_size=world,
                               max_grad_norm=config.max_grad_norm)
    recipe = LTSFTRecipe(model, next(iter(data.train.values())), config, ds_config,
                         base_model=config.model.name_or_path or "tiny", log_dir=out / "tensorboard", order=order,
                         step_hooks=hooks, held_out=held_out)
    for sig in (signal.SIGUSR1, signal.SIGTERM):  # SLURM's warning before preemption or the time limit
        signal.signal(sig, lambda *_: recipe.request_stop())
    try:
        sft = recipe.run()
    except Preempted as stop:
        if rank == 0:
            print(f"stopped on request: {stop}", flush=True)
        return EXIT_REQUEUE
    if rank == 0:
        sft.save_pretrained(out / "sft")
        recipe.save_results(out / "results.json")
        stats = recipe.stats
        print(json.dumps({"k": stats.k, "n_eligible": stats.n_eligible, "threshold": stats.threshold,
                          "zero_valued_selected": stats.zero_valued_selected, "frozen_drift": stats.frozen_drift,
                          "best_eval": stats.best_eval,
                          "seconds": {k: round(v, 2) for k, v in stats.seconds.items()}}))
        print(f"SFT written to {out / 'sft'}")
        print(f"TensorBoard logs in {out / 'tensorboard'}  (view: tensorboard --logdir {out / 'tensorboard'})")
    comm.barrier()
    return 0


def load_language_sfts(config) -> dict:
    """The configured language SFTs, loaded on every rank (each applies its own part of them)."""
    from ltsft_dist.sft import SparseFineTuning

    sfts = {}
    for language, path in config.language_sfts.items():
        try:
            sfts[language] = SparseFineTuning.from_pretrained(path)
        except LtsftError as err:
            raise LtsftError(f"language_sfts.{language}: {err}") from None
    return sfts
