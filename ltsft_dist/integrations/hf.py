"""LT-SFT inside a transformers `Trainer` (or an accelerate loop), on the DeepSpeed engine that loop builds.

The method is the one `ltsft train` runs, through the same core (`recipe.py`'s shared steps): `shards.Shards`
over the engine, `snapshot.Snapshot` for θ⁰, the collective top-K (`recipe.select_masks`), `masking.GradientMask`
and `masking.L1Pull` on DeepSpeed's reduced gradients, `recipe.extract_sft`. One `train()` call runs
phase 1 → selection → rewind to θ⁰ → phase 2 and writes the SFT.

Where it hooks in: accelerate's `Accelerator.backward` hands the loss to `accelerator.deepspeed_engine_wrapped`,
which calls `engine.backward` and then `engine.step`. `MaskedEngine` takes its place, so the mask and the L1 pull
reach DeepSpeed's gradient buffers between the two (before its norm and clipping, as in `ltsft train`), and the
phase changes happen right after the optimizer step that ends a phase.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils.deepspeed import DeepSpeedEngineWrapper
from transformers import Trainer

from ltsft_dist import comm
from ltsft_dist import eligibility as elig
from ltsft_dist.checkpoint import check_inputs
from ltsft_dist.config import ModelConfig, PhaseConfig, TrainConfig, field_help
from ltsft_dist.data import Examples, StepOrder
from ltsft_dist.engine import adamw
from ltsft_dist.errors import LtsftError
from ltsft_dist.files import write_atomically
from ltsft_dist.masking import GradientMask, L1Pull
from ltsft_dist.multisource import POLICIES, SamplingConfig, build_multisource
from ltsft_dist.recipe import (RunStats, extract_sft, fragments_by_role, frozen_drift, k_of_round, linear_lr,
                               select_masks, selection_scalars, sft_metadata)
from ltsft_dist.shards import Shards, param_shape
from ltsft_dist.sft import SparseFineTuning, base_fingerprint
from ltsft_dist.snapshot import Snapshot

SUPPORTED_OPTIM = ("adamw_torch", "adamw_torch_fused")  # TrainingArguments.optim values: torch's AdamW
STATE_DIR = "ltsft"  # inside a Trainer checkpoint: this rank's LT-SFT state (step, mask, statistics)


@dataclass
class LTSFTArguments:
    """What LT-SFT adds to `TrainingArguments` (which give the learning rate, warm-up, weight decay, clipping, batch
    sizes, seed and precision). Checked by `TrainConfig.validate`, the rules of `ltsft train`."""

    sft_kind: str = field(default="task", metadata=field_help(
        "language | task | bitfit: the eligibility preset (language: norms and the untied output embedding "
        "frozen; task: the head outside the shared body trained densely; bitfit: biases only)"))
    k: int | None = field(default=None, metadata=field_help("number of parameters to select ..."))
    density: float | None = field(default=None, metadata=field_help(
        "... or a fraction of the eligible parameters"))
    phase1_steps: int = field(default=0, metadata=field_help(
        "optimizer steps of phase 1 (full fine-tuning), per round"))
    phase2_steps: int | None = field(default=None, metadata=field_help(
        "optimizer steps of phase 2 (masked, from θ⁰), per round; default: what max_steps leaves after phase 1"))
    phase2_learning_rate: float | None = field(default=None, metadata=field_help(
        "peak learning rate of phase 2 (default: learning_rate); each phase warms up and decays linearly to 0"))
    phase1_l1: float = field(default=0.0, metadata=field_help("λ of the L1 pull toward θ⁰ in phase 1"))
    phase2_l1: float = field(default=0.0, metadata=field_help("λ of the L1 pull toward θ⁰ in phase 2"))
    selection: str = field(default="magnitude", metadata=field_help(
        "magnitude (LT-SFT) | random (RAND-SFT) | all (BitFit: no phase 1)"))
    rounds: int = field(default=1, metadata=field_help("iterative selection: rounds of phase 1 -> select -> phase 2"))
    eligible: list[str] | None = field(default=None, metadata=field_help(
        "regular expressions of parameter names eligible for the mask (default: by sft_kind)"))
    frozen: list[str] | None = field(default=None, metadata=field_help("... never changed, even if eligible"))
    dense_head: list[str] | None = field(default=None, metadata=field_help("... trained and stored densely"))
    languages: list[str] = field(default_factory=list, metadata=field_help("language code(s), recorded in the SFT"))
    base_model: str = field(default="", metadata=field_help("the base model's hub id or directory, recorded in the SFT"))
    sft_dir: str = field(default="sft", metadata=field_help("where the SFT is written, inside output_dir"))
    language_sfts: list[str] | None = field(default=None, metadata=field_help(
        "task SFTs: LANG=DIR (a directory or hub id) per source language; each step trains on one language with "
        "its SFT applied to θ⁰ for the step, as ltsft train's language_sfts (several languages: train_dataset "
        "maps each language to its ltsft Examples)"))
    sampling: str = field(default="proportional", metadata=field_help(
        "multi-source: which language each step trains on (proportional | uniform | temperature)"))
    sampling_temperature: float = field(default=1.0, metadata=field_help(
        'for sampling "temperature": p ∝ size^(1/T)'))

    def language_sft_paths(self) -> dict[str, str]:
        """`language_sfts` as {language: directory or hub id}."""
        paths = {}
        for entry in self.language_sfts or []:
            language, sep, path = entry.partition("=")
            if not sep or not language or not path or language in paths:
                raise LtsftError(f"LTSFTArguments.language_sfts: {entry!r}: give each source language once, as "
                                 "LANG=DIR (e.g. en=runs/lang-en/sft)")
            paths[language] = path
        return paths

    def train_config(self, args, world_size: int) -> TrainConfig:
        """The equivalent `ltsft train` config at `world_size` ranks (validated: errors name the argument)."""
        from ltsft_dist.eligibility import EligibilityConfig

        where = "LTSFTArguments"
        phase1 = self.phase1_steps if self.selection == "magnitude" else 0
        phase2 = self.phase2_steps
        per_round = args.max_steps // max(1, self.rounds) if args.max_steps > 0 else None
        if phase2 is None:
            if per_round is None:
                raise LtsftError(f"{where}: phase2_steps: give it, or TrainingArguments.max_steps (phase 2 is then "
                                 "what max_steps leaves after phase 1)")
            phase2 = per_round - phase1
        total = max(1, self.rounds) * (phase1 + phase2)
        if args.max_steps > 0 and (phase2 <= 0 or args.max_steps != total):
            raise LtsftError(
                f"TrainingArguments.max_steps={args.max_steps} does not fit {self.rounds} round(s) of phase1_steps="
                f"{phase1} + phase2_steps={self.phase2_steps}: LT-SFT needs phase-2 steps after phase 1; set max_steps "
                f"to rounds × (phase1_steps + phase2_steps), more than {max(1, self.rounds) * phase1}, or lower "
                "LTSFTArguments.phase1_steps")
        lr = args.learning_rate
        config = TrainConfig(
            kind=self.sft_kind, languages=list(self.languages), output_dir=args.output_dir,
            model=ModelConfig(name_or_path=self.base_model or "the model given to the Trainer"),
            k=self.k, density=self.density, selection=self.selection, rounds=self.rounds,
            phase1=PhaseConfig(steps=phase1, lr=lr, warmup_steps=args.get_warmup_steps(phase1), l1=self.phase1_l1),
            phase2=PhaseConfig(steps=phase2, lr=lr if self.phase2_learning_rate is None else self.phase2_learning_rate,
                               warmup_steps=args.get_warmup_steps(phase2), l1=self.phase2_l1),
            batch_size=args.per_device_train_batch_size * world_size * args.gradient_accumulation_steps,
            micro_batch_size=args.per_device_train_batch_size, weight_decay=args.weight_decay,
            max_grad_norm=args.max_grad_norm, seed=args.seed,
            eligibility=EligibilityConfig(include=self.eligible, exclude=self.frozen, head=self.dense_head))
        config.validate(where)
        if phase2 <= 0:
            raise LtsftError(f"{where}: phase2_steps: must be positive, got {phase2}")
        config.language_sfts = self.language_sft_paths()
        if config.language_sfts and self.sft_kind == "language":
            raise LtsftError(f"{where}: language_sfts: language SFTs are applied while training task SFTs only: "
                             "remove them, or set sft_kind=task")
        if self.sampling not in POLICIES:
            raise LtsftError(f"{where}: sampling={self.sampling!r}: use one of {', '.join(POLICIES)}")
        config.sampling = SamplingConfig(policy=self.sampling, temperature=self.sampling_temperature)
        return config.complete()


def join_process_group() -> None:
    """Join the ranks of whichever launcher started us (`ltsft_dist.engine.init_distributed`; none: one rank), and
    set up accelerate's state for them. Call it before `TrainingArguments`.

    On GPUs accelerate counts the ranks itself. On CPUs it gives a process group no backend and counts one process
    (then DeepSpeed refuses the batch size at W > 1): here its state is made to say what the process group says,
    and `TrainingArguments(accelerator_config={"use_configured_state": True})` keeps it (without that,
    TrainingArguments starts accelerate's state afresh; `LTSFTTrainer` then stops naming the fix)."""
    from accelerate.state import PartialState

    from ltsft_dist.devices import accelerator_type
    from ltsft_dist.engine import init_distributed

    init_distributed()
    if not PartialState._shared_state:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what TrainingArguments(deepspeed=...) sets for it
        try:
            PartialState()
        finally:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
    if accelerator_type() != "cuda":
        PartialState._shared_state.update(num_processes=comm.world_size(), process_index=comm.rank(),
                                          local_process_index=int(os.environ.get("LOCAL_RANK", comm.rank())))


class SparseFineTuner:
    """LT-SFT around a DeepSpeed engine that another loop steps: the eligibility is applied to the model at once
    (before any optimizer sees it); `attach(engine)` takes θ⁰ from my shard; `optimizer_step()` (at every
    accumulation boundary, after backward) masks, pulls, steps and moves through the schedule; `finish()` returns
    the SFT (on rank 0)."""

    def __init__(self, model: torch.nn.Module, config: TrainConfig, base_model: str = ""):
        from ltsft_dist.models import untie_output_embeddings

        self.config, self.model, self.base_model = config, model, base_model
        if config.kind == "language":  # language SFTs freeze an output embedding that must not be the input one
            untie_output_embeddings(model)
        self.eligibility = elig.resolve(model, config.kind, config.eligibility)
        elig.apply_roles(model, self.eligibility)
        self.shapes = {n: param_shape(p) for n, p in model.named_parameters()}
        self.fingerprint = base_fingerprint(model)
        self.stats = RunStats()
        self.stats.n_eligible = self.eligibility.count(model, "sparse")
        self.stats.k = config.k_for(self.stats.n_eligible)
        phases = (("phase1", config.phase1),) if config.selection == "magnitude" else ()
        self.schedule = [(r, name, phase) for r in range(1, config.rounds + 1)
                         for name, phase in phases + (("phase2", config.phase2),)]
        self.total_steps = sum(phase.steps for _, _, phase in self.schedule)
        self.step = 0  # optimizer steps done
        self.engine = self.shards = self.snapshot = self.selected = self.mask = self.l1 = None
        self.log = lambda values: None  # where selection scalars go (the Trainer's `log`)
        self.step_hooks = []  # `hooks.StepHook`s around each step (the language swap), called as the recipe does
        self._in_step = False

    def phase_at(self, step: int) -> tuple[int, str, int, PhaseConfig]:
        """(round, phase name, step within the phase, the phase) of the run's optimizer step `step`."""
        for round_, name, phase in self.schedule:
            if step < phase.steps:
                return round_, name, step, phase
            step -= phase.steps
        raise LtsftError(f"step {step} is past the LT-SFT schedule of {self.total_steps} steps")

    def lr(self, step: int) -> float:
        """The learning rate of optimizer step `step`: `ltsft train`'s per-phase linear schedule (0 past the end)."""
        if step >= self.total_steps:
            return 0.0
        _, _, within, phase = self.phase_at(step)
        return linear_lr(within, phase)

    def attach(self, engine, resuming: bool = False) -> None:
        """Snapshot θ⁰ from my shard of `engine` (built from the base model, before any checkpoint is loaded into
        it). A resumed run then calls `load_state_dict`."""
        self.engine = engine
        self.shards = Shards(engine, self.model)
        self.snapshot = Snapshot(self.shards)
        self.stats.theta0_bytes_per_rank = self.snapshot.nbytes
        self.sparse, self.heads = fragments_by_role(self.shards, self.eligibility.roles)
        if not resuming:
            self._enter(self.step, transition=True)

    def _enter(self, step: int, transition: bool) -> None:
        """Be ready for optimizer step `step`: at a phase 2's start (when `transition`) select and rewind; at a
        later round's phase-1 start rewind; mask in phase 2; the phase's L1 pull."""
        round_, name, within, phase = self.phase_at(step)
        if transition and within == 0 and (name == "phase2" or round_ > 1):
            if self.mask is not None:
                self.mask.detach()
                self.mask = None
            if name == "phase2":
                self._select(round_)
            self.snapshot.rewind()
            self.shards.reset_optimizer_state()
        if name == "phase2" and self.mask is None:
            self.mask = GradientMask(self.shards, self.snapshot, self.sparse, self.selected)
            self.mask.attach()
        self.l1 = L1Pull(self.shards, self.snapshot, self.sparse, phase.l1, self.stats.n_eligible, self.mask)

    def _select(self, round_: int) -> None:
        k_round = k_of_round(self.config, self.stats.k, round_)
        result = select_masks(self.config, self.shards, self.snapshot, self.sparse, k_round, self.selected)
        self.selected = result.masks
        self.stats.threshold = result.threshold
        self.stats.ties_at_threshold, self.stats.ties_taken = result.ties_at_threshold, result.ties_taken
        sfts = {lang: sft for hook in self.step_hooks for lang, sft in hook.sfts.items()}
        self.log(selection_scalars(self.shards, self.shapes, self.eligibility.roles, self.sparse, self.selected, sfts,
                                   k_round, result.threshold))

    def begin_step(self) -> None:
        """Before a forward pass: at the step's first, the hooks' `before_step` (the step's language SFT goes
        into the working weights). The hooks see the step within its phase, as the recipe's do."""
        if not self._in_step:
            within = self.phase_at(self.step)[2]
            for hook in self.step_hooks:
                hook.before_step(within)
            self._in_step = True

    def restore(self) -> None:
        """Undo what the hooks left in the weights (a step that failed midway)."""
        for hook in self.step_hooks:
            hook.restore()
        self._in_step = False

    def optimizer_step(self) -> None:
        """At an accumulation boundary, after the last backward: mask (phase 2) and pull the reduced gradients,
        step the engine, then get ready for the next step of the schedule."""
        if self.step >= self.total_steps:
            raise LtsftError(f"optimizer step {self.step + 1} is past the LT-SFT schedule of {self.total_steps} "
                             "steps: the loop must stop at max_steps = rounds × (phase1_steps + phase2_steps)")
        if self._in_step:
            within = self.phase_at(self.step)[2]
            for hook in self.step_hooks:
                hook.before_optimizer_step(within)
            self._in_step = False
        grads = self.shards.grads()
        if self.mask is not None:
            self.mask.mask_gradients(grads)
        with self.l1.pulling(grads):
            self.engine.step()
        self.step += 1
        if self.step < self.total_steps:
            self._enter(self.step, transition=True)

    def state_dict(self) -> dict:
        """This rank's LT-SFT state (a checkpoint of the engine holds the rest): resumable at the same world size
        and ZeRO stage."""
        return {"step": self.step, "world_size": self.shards.world_size, "stage": self.shards.stage,
                "fragments": [(f.name, f.param_offset, f.numel) for f in self.sparse],
                "selected": None if self.selected is None else [m.cpu() for m in self.selected],
                "stats": dict(self.stats.__dict__), "inputs": self.inputs()}

    def inputs(self) -> dict[str, str]:
        """Fingerprints of what the step hooks read (language SFTs): a resume must find them unchanged."""
        return {key: value for hook in self.step_hooks for key, value in hook.fingerprints.items()}

    def load_state_dict(self, state: dict, where: str) -> None:
        here = (self.shards.world_size, self.shards.stage)
        if (state["world_size"], state["stage"]) != here or state["fragments"] != [
                (f.name, f.param_offset, f.numel) for f in self.sparse]:
            raise LtsftError(f"{where}: written at {state['world_size']} rank(s), ZeRO {state['stage']} (or another "
                             f"model); this run has {here[0]} rank(s), ZeRO {here[1]}: resume with the same ones")
        check_inputs(where, state.get("inputs", {}), self.inputs())
        self.step = state["step"]
        self.selected = (None if state["selected"] is None
                         else [m.to(self.shards.device) for m in state["selected"]])
        here_bytes = self.stats.theta0_bytes_per_rank
        self.stats.__dict__.update(state["stats"])
        self.stats.theta0_bytes_per_rank = here_bytes
        if self.step < self.total_steps:
            self._enter(self.step, transition=False)

    def finish(self) -> SparseFineTuning | None:
        """φ = θ² − θ⁰ at the selected positions plus the dense head, on rank 0 (None elsewhere). Collective."""
        if self.step != self.total_steps:
            raise LtsftError(f"training stopped after {self.step} of the {self.total_steps} LT-SFT steps: there is no "
                             "SFT until phase 2 has run to its end (resume from the last checkpoint)")
        self.stats.frozen_drift = frozen_drift(self.shards, self.snapshot, self.mask)
        metadata = sft_metadata(self.config, self.base_model, self.fingerprint, self.stats.k, self.stats.n_eligible)
        sft = extract_sft(self.shards, self.snapshot, self.sparse, self.heads, self.selected, self.shapes, metadata)
        if sft is not None:
            self.stats.zero_valued_selected = sum(int((v == 0).sum()) for _, v in sft.diffs.values())
        return sft


class MaskedEngine(DeepSpeedEngineWrapper):
    """accelerate's DeepSpeed engine wrapper with `SparseFineTuner.optimizer_step` in place of `engine.step()`."""

    def __init__(self, engine, tuner: SparseFineTuner):
        super().__init__(engine)
        self.tuner = tuner

    def backward(self, loss, sync_gradients: bool = True, **kwargs) -> None:
        self.engine.set_gradient_accumulation_boundary(is_boundary=sync_gradients)
        self.engine.backward(loss, **kwargs)
        if sync_gradients:
            self.tuner.optimizer_step()


class PhaseLR(torch.optim.lr_scheduler.LRScheduler):
    """The learning rate of each step from `SparseFineTuner.lr` (so the Trainer logs and checkpoints it)."""

    def __init__(self, optimizer, lr_at):
        self.lr_at = lr_at
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [self.lr_at(self.last_epoch)] * len(self.optimizer.param_groups)

    def state_dict(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key not in ("optimizer", "lr_at")}


class ScheduledBatches(torch.utils.data.Dataset):
    """ltsft's own batches (`data.StepOrder`: seeded order, BERT masks per row) in the schedule's order: item i is
    micro-batch i % accumulation of optimizer step i // accumulation, so the Trainer's own skipping on resume lands
    on the right batch. Each phase restarts the order, as `ltsft train` does."""

    def __init__(self, order: StepOrder, tuner: SparseFineTuner):
        self.order, self.tuner = order, tuner

    def __len__(self) -> int:
        return self.tuner.total_steps * self.order.accumulation

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        step, micro = divmod(i, self.order.accumulation)
        return self.order.batch_at(self.tuner.phase_at(step)[2], micro)


def token_mean_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """`Trainer(compute_loss_func=token_mean_loss)`: an encoder's per-token loss (MLM, tagging) as `ltsft train`
    computes it: cross-entropy summed over the labelled tokens, divided by the labelled tokens of the whole step
    (all micro-batches; all ranks with `average_tokens_across_devices`). BERT's own MLM loss is a per-micro-batch
    mean, which the Trainer then neither averages over accumulation steps nor over ranks' token counts."""
    logits = outputs["logits"]
    total = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten().to(logits.device),
                                              reduction="sum")
    count = labels.ne(-100).sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return total / count


def check_trainer(trainer) -> None:
    """Refuse what the masking does not handle, naming the argument and the fix."""
    from ltsft_dist import preflight

    args = trainer.args
    if args.world_size != comm.world_size():
        raise LtsftError(
            f"the Trainer counts {args.world_size} process(es) but {comm.world_size()} ranks were launched (accelerate "
            "counts one process on CPUs): call ltsft_dist.integrations.hf.join_process_group() before "
            'TrainingArguments, and give it accelerator_config={"use_configured_state": True}')
    if not trainer.is_deepspeed_enabled:
        raise LtsftError("LTSFTTrainer: TrainingArguments.deepspeed is not set: LT-SFT runs on the Trainer's DeepSpeed "
                         "engine (also for one process); pass deepspeed=<a config with \"auto\" values>, e.g. "
                         "ltsft_dist/ds_configs/zero0.json for one process or zero2.json")
    if str(args.optim) not in SUPPORTED_OPTIM and getattr(args.optim, "value", None) not in SUPPORTED_OPTIM:
        raise LtsftError(f"TrainingArguments.optim={args.optim!r}: the masking supports torch's AdamW only (its "
                         f"moments are reset at the rewind and its decay is projected out): set optim to "
                         f"{' or '.join(SUPPORTED_OPTIM)}")
    if trainer.optimizer is not None and type(trainer.optimizer) is not torch.optim.AdamW:
        raise LtsftError(f"Trainer(optimizers=...): {type(trainer.optimizer).__name__} is not supported by the "
                         "masking: leave optimizers unset (LTSFTTrainer builds torch's AdamW from TrainingArguments)")
    if trainer.lr_scheduler is not None:
        raise LtsftError("Trainer(optimizers=...): a learning-rate scheduler was given; LT-SFT schedules each phase "
                         "itself (linear warm-up and decay per phase): leave it unset")
    ds = args.hf_deepspeed_config.config
    zero = ds.get("zero_optimization") or {}
    for section in ("offload_optimizer", "offload_param"):
        device = str((zero.get(section) or {}).get("device", "none")).lower()
        if device == "nvme":
            raise LtsftError(f"DeepSpeed config: zero_optimization.{section}.device=nvme: the masking edits the fp32 "
                             "masters and gradients in memory, which NVMe offload keeps on disk: use \"cpu\" or "
                             "\"none\"")
    problems = preflight.check_ds_config(ds, "DeepSpeed config (TrainingArguments.deepspeed)", where="LTSFTTrainer")
    preflight.require(problems)


@dataclass
class LoopArguments:
    """Your loop's settings that LT-SFT needs, named as in `TrainingArguments` (for `LTSFT`, without a Trainer)."""

    max_steps: int = field(metadata=field_help("optimizer steps: rounds × (phase1_steps + phase2_steps)"))
    learning_rate: float = field(metadata=field_help("peak learning rate of each phase"))
    per_device_train_batch_size: int = field(metadata=field_help("per rank per forward pass"))
    gradient_accumulation_steps: int = field(default=1, metadata=field_help("micro-batches per optimizer step"))
    warmup_steps: int = field(default=0, metadata=field_help("linear warm-up steps of each phase"))
    weight_decay: float = field(default=0.0, metadata=field_help("AdamW's, not on biases and norms"))
    max_grad_norm: float = field(default=1.0, metadata=field_help("must equal the DeepSpeed config's clipping"))
    seed: int = field(default=42, metadata=field_help("random selection's seed (RAND-SFT)"))
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    output_dir: str = field(default=".", metadata=field_help("recorded in the SFT's training config"))

    def get_warmup_steps(self, steps: int) -> int:
        return self.warmup_steps


class LTSFT:
    """LT-SFT in your own loop under `accelerate launch --use_deepspeed` (any ZeRO stage), on the same core:

        ltsft = LTSFT(model, LTSFTArguments(...), LoopArguments(...), accelerator)
        model, optimizer, scheduler = ltsft.prepare(model)        # accelerator.prepare + θ⁰ + the masked step
        for step in range(ltsft.total_steps):
            for batch in micro_batches(step):
                with accelerator.accumulate(model):
                    accelerator.backward(model(**batch).loss)      # at the boundary: mask, L1 pull, engine step
            scheduler.step()
        sft = ltsft.finish()                                       # rank 0: the SparseFineTuning

    `accelerator.backward` runs the optimizer step at each accumulation boundary (as accelerate does under
    DeepSpeed); phase changes (selection, rewind) happen right after the step that ends a phase."""

    def __init__(self, model: torch.nn.Module, ltsft_args: LTSFTArguments, loop_args: LoopArguments, accelerator):
        if ltsft_args.language_sfts:
            raise LtsftError("LTSFTArguments.language_sfts: the per-step language swap needs the step's data, which "
                             "your loop feeds: use LTSFTTrainer, or apply ltsft_dist.swap.LanguageSwap around each "
                             "step of your loop yourself")
        self.args, self.accelerator = loop_args, accelerator
        self.tuner = SparseFineTuner(model, ltsft_args.train_config(loop_args, accelerator.num_processes),
                                     ltsft_args.base_model)
        self.total_steps = self.tuner.total_steps

    def prepare(self, model: torch.nn.Module, *others):
        """`accelerator.prepare(model, AdamW, *others)`, θ⁰ from the engine it built, the masked step in place of
        accelerate's; returns the prepared model, optimizer and `others`, then the per-phase LR scheduler."""
        args = self.args
        optimizer = adamw(model, args.learning_rate, args.weight_decay, betas=(args.adam_beta1, args.adam_beta2),
                          eps=args.adam_epsilon)
        prepared = self.accelerator.prepare(model, optimizer, *others)
        engine = self.accelerator.deepspeed_engine_wrapped.engine
        self.tuner.attach(engine)
        self.accelerator.deepspeed_engine_wrapped = MaskedEngine(engine, self.tuner)
        return (*prepared, PhaseLR(prepared[1], self.tuner.lr))

    def finish(self) -> SparseFineTuning | None:
        return self.tuner.finish()


class LTSFTTrainerMixin:
    """LT-SFT for a Trainer class: `class MyTrainer(LTSFTTrainerMixin, Trainer)` (before the Trainer in the bases),
    or `LTSFTTrainer`. `train_dataset` may also be ltsft `Examples` (or {language: Examples}), fed in `ltsft
    train`'s order.

    Multi-source (`LTSFTArguments.language_sfts`): `train_dataset` maps each source language to its `Examples`
    ({"en": ..., "de": ...}), fed one language per step (`multisource.MultiSourceOrder`) with that language's SFT
    swapped in for the step (`swap.LanguageSwap`), as `ltsft train` does; another dataset trains on one language.

    After `train()`, `self.sft` is the SparseFineTuning (rank 0; also saved to output_dir/sft_dir) and
    `self.tuner.stats` the run's statistics."""

    def __init__(self, *args, ltsft_args: LTSFTArguments, **kwargs):
        super().__init__(*args, **kwargs)
        check_trainer(self)
        self.ltsft_args = ltsft_args
        self.ltsft_config = ltsft_args.train_config(self.args, self.args.world_size)
        self.tuner = SparseFineTuner(self.model, self.ltsft_config, ltsft_args.base_model)
        if self.args.max_steps <= 0:
            self.args.max_steps = self.tuner.total_steps
        self.tuner.log = self.log
        self.order = self._order_and_swap()
        self.sft = None

    def _order_and_swap(self):
        """As `ltsft train` sets up its data (`training.TrainingRun.setup`), before the engine is built: the order of
        ltsft `Examples` (one language per step with several sources or language SFTs: `build_multisource`;
        else `StepOrder`; None: the Trainer's own sampling of another dataset) and the language swap, which joins
        the tuner's step hooks."""
        from ltsft_dist.swap import LanguageSwap
        from ltsft_dist.training import load_language_sfts

        config, data = self.ltsft_config, self.train_dataset
        sfts = load_language_sfts(config)
        if isinstance(data, Examples) and len(sfts) == 1:  # one source language with its SFT
            data = {next(iter(sfts)): data}
        if isinstance(data, Mapping):
            extra = sorted(set(sfts) - set(data))
            if extra:
                raise LtsftError(f"LTSFTArguments.language_sfts: {extra[0]!r} is not a source language of "
                                 f"train_dataset ({', '.join(sorted(data))})")
        config.languages = config.languages or sorted(data if isinstance(data, Mapping) else sfts)
        rank, world, swap = comm.rank(), comm.world_size(), None
        if isinstance(data, Mapping) and (len(data) > 1 or sfts):
            order, swap = build_multisource(self.model, data, sfts or None, config, sampling=config.sampling,
                                            rank=rank, world_size=world)
        elif isinstance(data, (Mapping, Examples)):
            examples = data if isinstance(data, Examples) else next(iter(data.values()))
            order = StepOrder(examples, config.batch_size, config.micro_batch_size, rank, world, config.seed)
        elif len(sfts) > 1:
            raise LtsftError(f"LTSFTArguments.language_sfts names {len(sfts)} languages: multi-source training needs "
                             "train_dataset as {language: ltsft_dist.data.Examples} (one language per step); with "
                             "another dataset give the one source language's SFT")
        else:  # the Trainer's own batches; a language SFT is then that of every step
            order = None
            swap = LanguageSwap(self.model, sfts, lambda step: next(iter(sfts))) if sfts else None
        self.tuner.step_hooks = [swap] if swap is not None else []
        return order

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            args = self.args
            self.optimizer = adamw(self.model if model is None else model, args.learning_rate, args.weight_decay,
                                   betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """Called once the DeepSpeed engine exists and before a checkpoint is loaded into it: where θ⁰ is taken."""
        if self.lr_scheduler is None:
            self.lr_scheduler = PhaseLR(optimizer if optimizer is not None else self.optimizer, self.tuner.lr)
            self._created_lr_scheduler = True
            engine = self.accelerator.deepspeed_engine_wrapped.engine
            self.tuner.step = self.state.global_step
            self.tuner.attach(engine, resuming=self.state.global_step > 0)
            self.accelerator.deepspeed_engine_wrapped = MaskedEngine(engine, self.tuner)
        return self.lr_scheduler

    def get_train_dataloader(self):
        if self.order is None:
            return super().get_train_dataloader()
        # items are whole micro-batches: batches of one, unwrapped (a sampler lets the Trainer skip on resume)
        return torch.utils.data.DataLoader(ScheduledBatches(self.order, self.tuner), batch_size=1,
                                           collate_fn=operator.itemgetter(0))

    def _state_file(self, checkpoint) -> Path:
        return Path(checkpoint) / STATE_DIR / f"rank{comm.rank()}.pt"

    def _save_checkpoint(self, model, trial):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        directory = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        path = self._state_file(directory)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = self.tuner.state_dict()
        write_atomically({path: lambda p: torch.save(state, p)})
        super()._save_checkpoint(model, trial)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = self._state_file(checkpoint)
        if not path.is_file():
            raise LtsftError(f"resume_from_checkpoint={checkpoint}: no LT-SFT state ({path.relative_to(checkpoint)}): "
                             "resume from a checkpoint an LTSFTTrainer wrote at this number of ranks")
        self.tuner.load_state_dict(torch.load(path, weights_only=True), str(path))

    def training_step(self, *args, **kwargs):
        self.tuner.begin_step()
        return super().training_step(*args, **kwargs)

    def log(self, logs: dict, *args, **kwargs):
        """The Trainer's logs (TensorBoard with report_to) plus the LT-SFT phase of the logged step."""
        if "loss" in logs and 0 < self.state.global_step <= self.tuner.total_steps:
            logs = {**logs, "sft_phase": 2.0 if self.tuner.phase_at(self.state.global_step - 1)[1] == "phase2" else 1.0}
        return super().log(logs, *args, **kwargs)

    def train(self, *args, **kwargs):
        """The Trainer's `train()` (resume_from_checkpoint and all), then the SFT: saved by rank 0 to
        output_dir/sft_dir, as `ltsft train` writes it."""
        try:
            output = super().train(*args, **kwargs)
        finally:  # an error mid-step must not leave a language delta in the working weights
            self.tuner.restore()
        self.sft = self.tuner.finish()
        stats = self.tuner.stats
        self.log({"sft/k": float(stats.k), "sft/frozen_drift": float(stats.frozen_drift)})
        if self.sft is not None:
            self.sft.save_pretrained(Path(self.args.output_dir) / self.ltsft_args.sft_dir)
        if comm.world_size() > 1:
            comm.barrier()
        return output


class LTSFTTrainer(LTSFTTrainerMixin, Trainer):
    """`transformers.Trainer` with LT-SFT: `LTSFTTrainer(model, args, train_dataset=..., ltsft_args=...)`."""
