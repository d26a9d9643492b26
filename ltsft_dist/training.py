"""Training as a library call: `ltsft_dist.train(config)` runs one LT-SFT from a `TrainConfig` on the ranks of
whichever launcher started this process (none: a world of one).

`TrainingRun` has the shape of a torchtune recipe: `setup()` joins the process group and builds, from the config,
everything the algorithm (`ltsft_dist.recipe.LTSFTRecipe`) runs on — tokenizer, data, model, the multi-source
order and language swap, held-out data, the DeepSpeed config — and installs the preemption signal handlers;
`train()` runs the algorithm and writes the SFT; `cleanup()` puts the signal handlers back.
"""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ltsft_dist import comm, preflight
from ltsft_dist.config import TrainConfig
from ltsft_dist.errors import LtsftError
from ltsft_dist.tasks import get_task

if TYPE_CHECKING:
    from ltsft_dist.recipe import RunStats
    from ltsft_dist.sft import SparseFineTuning

EXIT_REQUEUE = 42  # exit status of a run stopped on request: "checkpointed, run me again" (slurm/ requeues on it)
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)  # SLURM's warning before preemption or the time limit


@dataclass
class TrainResult:
    output_dir: Path
    rank: int  # this process's rank (a run prints and saves on rank 0)
    stats: RunStats  # (every rank)
    sft: SparseFineTuning | None = None  # on rank 0 (saved to output_dir/sft); None on the other ranks
    preempted: Path | None = None  # the checkpoint written when stopped on request: the same call resumes it

    @property
    def sft_dir(self) -> Path:
        return self.output_dir / "sft"


class TrainingRun:
    """One LT-SFT run: `setup()`, then `train()`, then always `cleanup()` (or just call `train(config)`)."""

    def __init__(self, config: TrainConfig, *, show_progress: bool = True, handle_signals: bool = True):
        config.validate()
        if not (config.data.train_file or config.data.sources):
            raise LtsftError("data: give exactly one of data.train_file (one source) or data.sources (a list, one "
                             "per language)")
        self.config = config.complete()  # a copy: setup fills in what it learns from the data
        self.show_progress, self.handle_signals = show_progress, handle_signals
        self.output_dir = Path(self.config.output_dir)
        self.recipe = None
        self._previous_handlers: dict = {}

    def setup(self) -> None:
        from transformers import AutoTokenizer

        from ltsft_dist.engine import ds_config_for, init_distributed
        from ltsft_dist.heldout import HeldOut
        from ltsft_dist.models import build_model
        from ltsft_dist.recipe import LTSFTRecipe
        from ltsft_dist.training_data import build_tokenizer, encode_sources, read_sources, token_summary

        config, out = self.config, self.output_dir
        init_distributed()
        self.rank, world = comm.rank(), comm.world_size()
        preflight.before_training(config, world)  # collective; before any data or model is read
        out.mkdir(parents=True, exist_ok=True)
        sources = read_sources(config)
        if not config.languages:
            config.languages = [s.language for s in sources if s.language]
        sfts = load_language_sfts(config)
        resuming = config.resume and (out / "checkpoints" / "latest").is_file()
        if self.rank == 0 and not resuming:  # one tokenizer for all ranks, saved beside the SFT so it stays usable;
            # a resumed run keeps the saved one (a retrained WordPiece may number its tokens differently)
            build_tokenizer(config, sources).save_pretrained(str(out / "tokenizer"))
        comm.barrier()
        tokenizer = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
        data = encode_sources(config, tokenizer, sources)
        config.data.labels = data.labels  # recorded in the SFT: evaluation maps the head's outputs back to names
        for language, report in data.report.items():
            if self.rank == 0 and self.show_progress:
                print(f"data [{language}]: " + ", ".join(f"{k}={v}" for k, v in report.items()), flush=True)
            if self.rank == 0 and token_summary(language, report):
                print(token_summary(language, report), file=sys.stderr, flush=True)
        ds_config = ds_config_for(config, world)
        model = build_model(config.model, config.task, num_labels=len(data.labels) if data.labels else None,
                            vocab_size=len(tokenizer), seed=config.seed, ds_config=ds_config,
                            tie_output_embeddings=config.eligibility.tie_output_embeddings)
        if config.data.mlm_own_tokens:  # validated: one source, of a task that scores masked tokens
            get_task(config.task).score_among_own_tokens(model, next(iter(data.train.values())).mlm.own)
        order, hooks, swap = None, [], None
        if len(data.train) > 1 or sfts:  # one source language (and its SFT) per optimizer step
            from ltsft_dist.multisource import build_multisource

            order, swap = build_multisource(model, data.train, sfts or None, config, sampling=config.sampling,
                                            rank=self.rank, world_size=world)
            hooks = [swap] if swap is not None else []
        held_out = (HeldOut(data.held_out, config.micro_batch_size, self.rank, world, swap=swap)
                    if data.held_out else None)
        self.recipe = LTSFTRecipe(model, next(iter(data.train.values())), config, ds_config,
                                  base_model=config.model.name_or_path or "tiny", log_dir=out / "tensorboard",
                                  show_progress=self.show_progress, order=order, step_hooks=hooks, held_out=held_out)
        self.recipe.stats.data = data.report
        if self.handle_signals:
            for sig in STOP_SIGNALS:
                self._previous_handlers[sig] = signal.signal(sig, lambda *_: self.recipe.request_stop())

    def train(self) -> TrainResult:
        """Run (or resume) the algorithm; rank 0 saves the SFT and results.json. Collective."""

        from ltsft_dist.recipe import Preempted

        result = TrainResult(self.output_dir, self.rank, self.recipe.stats)
        try:
            result.sft = self.recipe.run()
        except Preempted as stop:
            result.preempted = stop.path
            return result
        if self.rank == 0:
            result.sft.save_pretrained(result.sft_dir)
            self.recipe.save_results(self.output_dir / "results.json")
        comm.barrier()
        return result

    def cleanup(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers = {}


def train(config: TrainConfig, *, show_progress: bool = True, handle_signals: bool = True) -> TrainResult:
    """One LT-SFT run from `config` (validated here; `config` itself is not changed). Call it on every rank."""
    run = TrainingRun(config, show_progress=show_progress, handle_signals=handle_signals)
    try:
        run.setup()
        return run.train()
    finally:
        run.cleanup()


def load_language_sfts(config: TrainConfig) -> dict:
    """The configured language SFTs, loaded on every rank (each applies its own part of them)."""
    from ltsft_dist.sft import SparseFineTuning

    sfts = {}
    for language, path in config.language_sfts.items():
        try:
            sfts[language] = SparseFineTuning.from_pretrained(path)
        except LtsftError as err:
            raise LtsftError(f"language_sfts.{language}: {err}") from None
    return sfts
