"""The LT-SFT recipe (Ansell et al., 2022, Algorithm 1) on a DeepSpeed engine of any ZeRO stage:

    phase 1 (full fine-tuning) -> global top-K of |θ¹ − θ⁰| -> rewind to θ⁰ -> phase 2 (masked) -> φ = θ² − θ⁰

Every step below works on this rank's shard only; the library pieces it calls are named for their role:
`shards` (where my elements are), `snapshot` (θ⁰), `topk` (the global selection), `masking` (phase 2).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ltsft_dist import checkpoint, comm
from ltsft_dist import eligibility as elig
from ltsft_dist.checkpoint import Progress
from ltsft_dist.config import PhaseConfig, TrainConfig, to_dict
from ltsft_dist.data import Examples, StepOrder
from ltsft_dist.devices import engine_device, to_device
from ltsft_dist.engine import build_engine
from ltsft_dist.errors import LtsftError
from ltsft_dist.files import write_text
from ltsft_dist.heldout import HeldOut
from ltsft_dist.hooks import StepHook
from ltsft_dist.masking import GradientMask, L1Pull
from ltsft_dist.monitor import Monitor, density_scalars, mask_overlap, peak_memory_mb, selected_per_parameter
from ltsft_dist.shards import Shards, param_shape
from ltsft_dist.sft import SFTMetadata, SparseFineTuning, base_fingerprint
from ltsft_dist.snapshot import Snapshot
from ltsft_dist.tasks import get_task
from ltsft_dist.topk import random_scores, select_topk

FLOAT_MAX = torch.finfo(torch.float32).max
MAX_OVERFLOW_RETRIES = 64  # consecutive fp16 overflows of one step: the scale falls from 2^16 to 1 well within it


class Preempted(Exception):
    """Training stopped on request after writing a checkpoint; rerunning the same command resumes it."""

    def __init__(self, path: Path):
        super().__init__(f"checkpointed to {path}; run the same command again to resume")
        self.path = path


@dataclass
class RunStats:
    k: int = 0
    n_eligible: int = 0
    threshold: float = 0.0
    ties_at_threshold: int = 0
    ties_taken: int = 0
    zero_valued_selected: int = 0  # selected positions that ended phase 2 exactly at θ⁰
    frozen_drift: int = 0  # frozen elements not bit-identical to θ⁰ after phase 2 (must be 0)
    theta0_bytes_per_rank: int = 0
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss (on_nonfinite_loss: skip)
    overflow_steps: int = 0  # attempts DeepSpeed skipped on an inf/NaN gradient, each redone (not in the schedule)
    seconds: dict = field(default_factory=dict)
    losses: dict = field(default_factory=dict)
    eval_losses: dict = field(default_factory=dict)  # per phase: [{step, all, <language>...}]
    best_eval: dict | None = None  # the evaluation φ was taken from
    data: dict = field(default_factory=dict)  # per language: rows, lines, tokens used/dropped (training_data)


def linear_lr(step: int, phase: PhaseConfig) -> float:
    """Linear warm-up then linear decay to zero, as HF's `get_linear_schedule_with_warmup`."""
    if step < phase.warmup_steps:
        return phase.lr * step / phase.warmup_steps
    return phase.lr * max(0.0, (phase.steps - step) / max(1, phase.steps - phase.warmup_steps))


class _Mark(NamedTuple):
    """Where the last log line was: rates and per-step times are over the steps since then."""
    time: float
    tokens: int
    hook_seconds: dict  # per hook timer: seconds spent so far
    step: int


class LTSFTRecipe:
    def __init__(self, model: torch.nn.Module, examples: Examples, config: TrainConfig, ds_config: dict,
                 base_model: str = "", log_dir: Path | None = None, show_progress: bool = True, order=None,
                 step_hooks: list[StepHook] = (), held_out: HeldOut | None = None):
        """`order` replaces the default `StepOrder` (e.g. one language per step for multi-source training);
        `step_hooks` (`ltsft_dist.hooks.StepHook`) run around every optimizer step (e.g. a per-step language
        delta swap).
        Rank 0 writes TensorBoard scalars to `log_dir` (if given) and, with `show_progress`, log lines.
        With `held_out`, phase 2 is evaluated every `data.eval_every` steps and at its end, and φ is taken from
        the evaluation with the lowest loss."""
        self.config, self.examples, self.log_dir = config, examples, log_dir
        self.task = get_task(config.task)
        self.held_out = held_out
        self.best: dict | None = None  # phase 2's best evaluation so far: step, loss, selected values, heads
        self.show_progress = show_progress
        self.order, self.step_hooks = order, list(step_hooks)
        self.model = model
        self.selected: Sequence[torch.Tensor] | None = None  # the mask, per sparse fragment of my shard
        self._stop_requested = False
        self._stop_agreed = False  # the ranks' agreement on a stop request, made once per optimizer step
        self.phase_name = ""  # the phase being trained, for messages
        self.global_step = 0  # optimizer steps done since the start of the run (TensorBoard's x axis)
        self.tokens_seen = 0  # tokens (non-padding positions) this rank has fed forward
        self.checkpoint_root = Path(config.output_dir) / "checkpoints"
        self.base_model = base_model
        self.stats = RunStats()
        self.setup(model, ds_config)

    # --- setup ---------------------------------------------------------------------------------

    def setup(self, model: torch.nn.Module, ds_config: dict) -> None:
        cfg = self.config
        self.eligibility = elig.resolve(model, cfg.kind, cfg.eligibility)
        elig.apply_roles(model, self.eligibility)
        self.shapes = {n: param_shape(p) for n, p in model.named_parameters()}
        self.fingerprint = base_fingerprint(model)
        self.stats.n_eligible = self.eligibility.count(model, "sparse")
        self.stats.k = cfg.k_for(self.stats.n_eligible)
        self.engine = build_engine(model, ds_config, cfg.phase1.lr, cfg.weight_decay)
        self.shards = Shards(self.engine, model)
        self.rank = self.shards.rank
        self.monitor = Monitor(self.log_dir if self.rank == 0 else None,
                               print_lines=self.rank == 0 and self.show_progress)
        if self.rank == 0 and self.show_progress:
            print(f"eligible parameters ({cfg.kind} SFT), elements per module type:\n{self.eligibility.table(model)}")
            print(f"K = {self.stats.k} of {self.stats.n_eligible} eligible ({self.stats.k / self.stats.n_eligible:.2%})")
        self.snapshot = Snapshot(self.shards)
        self.stats.theta0_bytes_per_rank = self.snapshot.nbytes
        self.sparse, self.heads = fragments_by_role(self.shards, self.eligibility.roles)
        self._sparse_at = {f: i for i, f in enumerate(self.sparse)}  # a fragment's index in self.sparse
        self._head_at = {f: i for i, f in enumerate(self.heads)}
        if self.order is None:
            self.order = StepOrder(self.examples, cfg.batch_size, cfg.micro_batch_size, self.rank,
                                   self.shards.world_size, cfg.seed)

    # --- the algorithm -------------------------------------------------------------------------

    def run(self) -> SparseFineTuning | None:
        """The whole algorithm; resumes from the latest complete checkpoint under output_dir, if any.
        Raises `Preempted` after checkpointing when a stop was requested (e.g. by SIGUSR1)."""
        try:
            return self._run()
        finally:
            self.monitor.close()  # flushes the TensorBoard events, also when stopped or failing

    def _run(self) -> SparseFineTuning | None:
        cfg = self.config
        at = self.resume()
        mask = None
        for r in range(at.round, cfg.rounds + 1):
            resuming = r == at.round
            if resuming and at.phase == "phase2":
                phase2_start = at.step
            else:
                if cfg.selection == "magnitude":
                    self.train_phase(r, "phase1", cfg.phase1, None, at.step if resuming else 0)
                self.selected = self.select(k_of_round(cfg, self.stats.k, r), previous=self.selected)
                self.snapshot.rewind()
                self.shards.reset_optimizer_state()
                phase2_start = 0
            mask = GradientMask(self.shards, self.snapshot, self.sparse, self.selected)
            self.selected = mask.selected(self.sparse)  # the bool masks are dropped: the plans hold them
            mask.attach()
            self.train_phase(r, "phase2", cfg.phase2, mask, phase2_start)
            mask.detach()
            if r < cfg.rounds:
                self.snapshot.rewind()
                self.shards.reset_optimizer_state()
        self.stats.frozen_drift = self.frozen_drift(mask)
        return self.extract(self.selected)

    def train_phase(self, round_: int, phase_name: str, phase: PhaseConfig, mask: GradientMask | None,
                    first_step: int = 0) -> None:
        name = phase_name + (f".{round_}" if self.config.rounds > 1 else "")
        self.phase_name = name
        self.global_step = self._global_step(round_, phase_name, first_step)
        self.engine.train()  # dropout on, as in the paper's training (from_pretrained returns a model in eval mode)
        l1 = L1Pull(self.shards, self.snapshot, self.sparse, phase.l1, self.stats.n_eligible, mask)
        bar = tqdm(range(first_step, phase.steps), desc=name, disable=self.rank != 0 or not self.show_progress,
                   leave=False, initial=first_step, total=phase.steps)
        self._clock = (name, time.perf_counter())
        mark = self._mark(first_step)
        for step in bar:
            lr = linear_lr(step, phase)
            self.shards.set_lr(lr)
            step_loss = self.train_step(step, mask, l1)
            self.global_step += 1
            self.stats.losses.setdefault(name, []).append(step_loss)
            if (step + 1) % self.config.log_every == 0 or step + 1 == phase.steps:
                mark = self._log(name, step, step_loss, lr, l1, bar, mark)
            every = self.config.data.eval_every
            if mask is not None and self.held_out is not None and (
                    step + 1 == phase.steps or (every and (step + 1) % every == 0)):
                self._evaluate(name, step + 1)
            self._maybe_checkpoint(Progress(round_, phase_name, step + 1), last=step + 1 == phase.steps)
        self._tick()
        if mask is not None and self.best is not None:
            self._restore_best()

    # --- the best φ by held-out loss -----------------------------------------------------------

    def _evaluate(self, phase: str, step: int) -> None:
        losses = self.held_out.loss(self.engine)
        scores = {score + ("" if lang == "all" else f"_{lang}"): value for lang, loss in losses.items()
                  for score, value in self.task.held_out_scores(loss).items()}  # clm: perplexity
        self.stats.eval_losses.setdefault(phase, []).append({"step": step, **losses, **scores})
        self.monitor.scalars({f"eval/{phase}/loss" + ("" if lang == "all" else f"/{lang}"): value
                              for lang, value in losses.items()}, self.global_step)
        self.monitor.scalars({f"eval/{phase}/{name.replace('_', '/', 1)}": value for name, value in scores.items()},
                             self.global_step)
        self.monitor.line("eval", phase=phase, step=step, **{f"loss_{lang}": v for lang, v in losses.items()},
                          **scores)
        if self.best is None or losses["all"] < self.best["loss"]:
            self.best = {"step": step, "loss": losses["all"],
                         "selected": [self.shards.master(f)[sel].clone() for f, sel in zip(self.sparse, self.selected)],
                         "heads": [self.shards.master(f).clone() for f in self.heads]}

    @torch.no_grad()
    def _restore_best(self) -> None:
        """Back to the best evaluation's weights (only the selected positions and the heads can differ)."""
        for f, sel, values in zip(self.sparse, self.selected, self.best["selected"]):
            self.shards.master(f)[sel] = values
        for f, values in zip(self.heads, self.best["heads"]):
            self.shards.master(f).copy_(values)
        self.shards.sync_working_weights()
        self.stats.best_eval = {"step": self.best["step"], "loss": self.best["loss"]}
        if self.rank == 0 and self.show_progress:
            print(f"kept the best φ by held-out loss: step {self.best['step']}, loss {self.best['loss']:.4f}")
        self.best = None

    # --- checkpoints ---------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask for a checkpoint and a clean stop at the end of the current step (signal-handler safe)."""
        self._stop_requested = True

    def _maybe_checkpoint(self, progress: Progress, last: bool) -> None:
        """`_stop_agreed` is what the ranks agreed on during the step (they get a signal at different moments)."""
        every = self.config.checkpoint_every
        periodic = every > 0 and progress.step % every == 0 and not last
        if not (self._stop_agreed or periodic):
            return
        self._tick()
        path = checkpoint.save(self.checkpoint_root, progress, self.shards, self._parameters(), self._elements,
                               self._run_state(), self._inputs())
        if self._stop_agreed:
            raise Preempted(path)

    def _tick(self) -> None:
        """Add the time since the last tick to the current phase's seconds (before a checkpoint, which carries them)."""
        name, since = self._clock
        now = time.perf_counter()
        self.stats.seconds[name] = self.stats.seconds.get(name, 0.0) + now - since
        self._clock = (name, now)

    def _parameters(self) -> dict[str, dict]:
        """What a checkpoint must be resumed with: every parameter's name, shape and role, in canonical order."""
        return {name: {"shape": list(shape), "role": self.eligibility.roles[name]} for name, shape in self.shapes.items()}

    def _elements(self, f) -> dict[str, torch.Tensor]:
        """Everything a checkpoint keeps of my fragment f, flat: θ⁰, master, optimizer state, mask, best values."""
        out = {"theta0": self.snapshot.theta0(f), "master": self.shards.master(f),
               **{f"optimizer.{key}": value for key, value in self.shards.optimizer_elements(f).items()}}
        i, j = self._sparse_at.get(f), self._head_at.get(f)
        if i is not None and self.selected is not None:
            out["mask"] = self.selected[i]
            if self.best is not None:
                out["best"] = torch.zeros_like(out["master"]).masked_scatter_(self.selected[i],
                                                                              self.best["selected"][i])
        if j is not None and self.best is not None:
            out["best"] = self.best["heads"][j]
        return out

    def _run_state(self) -> dict:
        return {"stats": dict(self.stats.__dict__), "optimizer": self.shards.optimizer_scalars(),
                "selected": self.selected is not None,
                "best": None if self.best is None else {"step": self.best["step"], "loss": self.best["loss"]}}

    def resume(self) -> Progress:
        if not self.config.resume:
            return Progress()
        directory = checkpoint.resumable(self.checkpoint_root, self.rank, self.shards.world_size)
        if directory is None:
            return Progress()
        progress, run, saved = checkpoint.load(directory, self.shards, self._parameters(), self._inputs())
        self._restore(run, saved)
        if self.rank == 0 and self.show_progress:
            print(f"resumed from {directory} (round {progress.round}, {progress.phase}, step {progress.step})")
        return progress

    @torch.no_grad()
    def _restore(self, run: dict, saved) -> None:
        """Scatter a checkpoint into my shard, whatever the layout that wrote it: masters, optimizer state, θ⁰,
        mask and best values of my fragments; then the working weights are synced and the statistics carried on."""
        optimizer = [{} for _ in self.shards.segments]
        theta0, selected, best_selected, best_heads = [], [], [], []
        for f in self.shards.fragments:
            values = saved(f)
            self.shards.master(f).copy_(values["master"])
            theta0.append((f, values["theta0"]))
            for kind, value in values.items():
                if kind.startswith("optimizer."):
                    flat = optimizer[f.segment].setdefault(kind.removeprefix("optimizer."),
                                                           torch.zeros_like(self.shards.segments[f.segment]))
                    flat.narrow(0, f.segment_offset, f.numel).copy_(value)
            if f in self._sparse_at and run["selected"]:
                selected.append(values["mask"])
                if run["best"] is not None:
                    best_selected.append(values["best"][values["mask"]])
            elif f in self._head_at and run["best"] is not None:
                best_heads.append(values["best"])
        self.snapshot.restore(theta0)
        self.shards.load_optimizer_state(optimizer, run["optimizer"])
        self.shards.sync_working_weights()
        self.selected = selected if run["selected"] else None
        self.best = None if run["best"] is None else {**run["best"], "selected": best_selected, "heads": best_heads}
        here = self.stats.theta0_bytes_per_rank  # of this layout, not the one that wrote the checkpoint
        for key, value in run["stats"].items():
            setattr(self.stats, key, value)
        self.stats.theta0_bytes_per_rank = here

    def _inputs(self) -> dict[str, str]:
        """Fingerprints of the inputs a checkpoint must be resumed with: what the step hooks read (language SFTs)."""
        return {key: value for hook in self.step_hooks for key, value in hook.fingerprints.items()}

    def train_step(self, step: int, mask: GradientMask | None, l1: L1Pull) -> float:
        """One optimizer step; returns this rank's share of the global mean loss.

        A step DeepSpeed skips on a gradient overflow (fp16's dynamic loss scaling, also bf16's overflow check: no
        weight moves, fp16's loss scale is lowered) is redone with the same batches, so a phase of N steps makes N updates and the
        data of step s stays a function of (seed, s) whatever overflowed. The skipped attempt is counted
        (`stats.overflow_steps`) and neither the masking hooks nor the L1 pull act on it."""
        attempts = MAX_OVERFLOW_RETRIES if self.shards.loss_scale_adapts else 2  # else the same step overflows again
        for _ in range(attempts):
            loss = self._attempt_step(step, mask, l1)
            if not self.shards.step_skipped():
                return loss
            self.stats.overflow_steps += 1
            self.monitor.line("overflow", phase=self.phase_name, step=step + 1, loss_scale=self.shards.loss_scale(),
                              overflow_steps=self.stats.overflow_steps)
        raise LtsftError(
            f"gradients not finite (inf or NaN) with a finite loss {attempts} times in a row in {self.phase_name} step "
            f"{step + 1} (loss scale now {self.shards.loss_scale():g}), so DeepSpeed skipped every attempt: lower the "
            "learning rate or enable clipping (max_grad_norm), or, from fp16, train in bf16 or fp32 (deepspeed: "
            "zero2_bf16.json or zero2.json)")

    def _attempt_step(self, step: int, mask: GradientMask | None, l1: L1Pull) -> float:
        batches = [self.order.batch_at(step, micro) for micro in range(self.order.accumulation)]
        scale = self._token_loss_scale(batches)
        self.tokens_seen += sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                                for b in batches)
        device = engine_device(self.engine)
        batches = [to_device(b, device) for b in batches]  # all copies queued at once: they overlap the compute
        for hook in self.step_hooks:
            hook.before_step(step)
        try:
            step_loss = 0.0
            finite = True
            for i, batch in enumerate(batches):
                if scale is None:
                    loss = self.engine(**batch).loss
                else:
                    labels = batch.pop("labels")
                    logits = self.engine(**batch).logits
                    if self.task.decoder:  # position t predicts token t+1
                        logits, labels = logits[:, :-1], labels[:, 1:]
                    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum") * scale
                finite = finite and math.isfinite(loss.item())
                self.engine.backward(loss)
                if i == len(batches) - 1:
                    for hook in self.step_hooks:
                        hook.before_optimizer_step(step)
                pull = nullcontext()
                if self.engine.is_gradient_accumulation_boundary():
                    grads = self.shards.grads()
                    if self._agree(step, finite):
                        # Skipped: DeepSpeed still steps (its counters and our masking hooks stay in step), but with
                        # zero gradients and learning rate 0 no weight moves (AdamW's moments decay by one step and
                        # its step count advances).
                        for g in grads:
                            g.zero_()
                        self.shards.set_lr(0.0)
                    else:
                        if mask is not None:
                            mask.mask_gradients(grads)
                        pull = l1.pulling(grads)
                with pull:
                    self.engine.step()
                step_loss += loss.item() / self.order.accumulation
        finally:  # an error mid-step must not leave a language delta in the working weights
            for hook in self.step_hooks:
                hook.restore()
        return step_loss

    def _agree(self, step: int, finite: bool) -> bool:
        """The ranks' one agreement per optimizer step (a single small all-reduce): whether a stop was requested
        (see `_maybe_checkpoint`) and which ranks saw a non-finite loss. Returns True if this step is to be
        skipped; raises `LtsftError` on every rank if it is to stop the run (`on_nonfinite_loss`)."""
        flags = torch.zeros(1 + self.shards.world_size, dtype=torch.int32)
        flags[0] = int(self._stop_requested)
        flags[1 + self.rank] = int(not finite)
        if self.shards.world_size > 1:
            comm.all_reduce(flags)
        self._stop_agreed = bool(flags[0])
        bad_ranks = torch.nonzero(flags[1:]).view(-1).tolist()
        if not bad_ranks:
            return False
        where = f"{self.phase_name} step {step + 1}"
        ranks = f"rank{'s' if len(bad_ranks) > 1 else ''} {', '.join(map(str, bad_ranks))}"
        if self.config.on_nonfinite_loss == "stop":
            last = checkpoint.latest(self.checkpoint_root)
            raise LtsftError(
                f"non-finite loss (NaN or inf) on {ranks} in {where}; last complete checkpoint: "
                f"{last if last is not None else 'no checkpoint yet'}. Lower the learning rate or enable clipping "
                "(max_grad_norm), check the data of that step, or set on_nonfinite_loss: skip to skip such steps")
        self.stats.skipped_steps += 1
        self.monitor.line("skipped", phase=self.phase_name, step=step + 1, reason=f"non-finite-loss-on-{ranks}",
                          skipped_steps=self.stats.skipped_steps)
        return True

    def _token_loss_scale(self, batches: list[dict]) -> float | None:
        """A task with a per-token loss (`Task.token_loss`: masked tokens, tags, responses) has different numbers
        of labelled tokens per micro-batch. Normalising each token's loss by the step's global token count
        (DeepSpeed then averages over ranks and accumulation steps) makes the gradient the mean over all labelled
        tokens of the global batch, whatever the world size."""
        if not self.task.token_loss:
            return None
        tokens = torch.tensor([sum(int((b["labels"] != -100).sum()) for b in batches)])
        if self.shards.world_size > 1:
            comm.all_reduce(tokens)
        return self.shards.world_size * self.order.accumulation / max(1, int(tokens))

    def select(self, k: int, previous: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """Global top-k of |θ − θ⁰| (or of seeded random scores); earlier rounds' picks are kept."""
        start = time.perf_counter()
        result = select_masks(self.config, self.shards, self.snapshot, self.sparse, k, previous)
        self.stats.threshold = result.threshold
        self.stats.ties_at_threshold, self.stats.ties_taken = result.ties_at_threshold, result.ties_taken
        self.stats.seconds["select"] = self.stats.seconds.get("select", 0.0) + time.perf_counter() - start
        self._report_selection(result.masks, k, result.threshold)
        return result.masks

    def _report_selection(self, masks: list[torch.Tensor], k: int, threshold: float) -> None:
        """Threshold, K, mask density per module type and per layer, and the mask's overlap with each language
        SFT swapped in by a step hook: counted on my shard, summed over ranks in one all-reduce of one vector."""
        sfts = {}
        for hook in self.step_hooks:
            sfts.update(hook.sfts)
        values = selection_scalars(self.shards, self.shapes, self.eligibility.roles, self.sparse, masks, sfts, k,
                                   threshold)
        overlap = {lang: values[f"mask/overlap/{lang}"] for lang in sfts}
        self.monitor.scalars(values, self.global_step)
        self.monitor.line("select", k=k, threshold=threshold, **{f"overlap_{lang}": c for lang, c in overlap.items()})

    def frozen_drift(self, mask: GradientMask) -> int:
        """Frozen elements of my shard that are not bit-identical to θ⁰ (summed over ranks)."""
        return frozen_drift(self.shards, self.snapshot, mask)

    def extract(self, selected: list[torch.Tensor]) -> SparseFineTuning | None:
        """φ = θ² − θ⁰ at the selected positions, plus the dense head; gathered on rank 0 (bytes ∝ K)."""
        metadata = sft_metadata(self.config, self.base_model, self.fingerprint, self.stats.k, self.stats.n_eligible)
        sft = extract_sft(self.shards, self.snapshot, self.sparse, self.heads, selected, self.shapes, metadata)
        if sft is not None:
            self.stats.zero_valued_selected = sum(int((v == 0).sum()) for _, v in sft.diffs.values())
        return sft

    # --- reporting -----------------------------------------------------------------------------

    def _mark(self, step: int) -> _Mark:
        spent = {}
        for h in self.step_hooks:
            if h.timer:
                spent[h.timer] = spent.get(h.timer, 0.0) + h.seconds_spent()
        return _Mark(time.perf_counter(), self.tokens_seen, spent, step)

    def _log(self, phase: str, step: int, loss: float, lr: float, l1: L1Pull, bar, since: _Mark) -> _Mark:
        """Collective (every rank calls it). Loss and tokens are summed over ranks; times, swap time and peak
        memory are rank 0's. Returns the mark the next interval starts from."""
        now = self._mark(step + 1)
        totals = torch.tensor([loss, now.tokens - since.tokens], dtype=torch.float64)
        if self.shards.world_size > 1:
            comm.all_reduce(totals)
        mean_loss = float(totals[0]) / self.shards.world_size
        penalty = l1.penalty() if l1.scale else 0.0
        if self.rank != 0:
            return now
        steps, seconds = max(1, now.step - since.step), max(1e-9, now.time - since.time)
        values = {"train/loss": mean_loss, "train/lr": lr, "train/l1": penalty,
                  "train/phase": 2.0 if phase.startswith("phase2") else 1.0,
                  "train/tokens_per_s": float(totals[1]) / seconds, "train/step_seconds": seconds / steps,
                  "train/peak_memory_mb": peak_memory_mb(), "train/skipped_steps": self.stats.skipped_steps,
                  "train/overflow_steps": self.stats.overflow_steps}
        for timer, seconds in now.hook_seconds.items():
            values[f"train/{timer}_seconds"] = (seconds - since.hook_seconds[timer]) / steps
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            values["train/grad_norm"] = float(norm)
        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
        self.monitor.scalars(values, self.global_step)
        fields = {t.split("/", 1)[1]: v for t, v in values.items() if t != "train/phase"}
        self.monitor.line("step", phase=phase, step=step + 1, **fields)
        return now

    def _global_step(self, round_: int, phase_name: str, step: int) -> int:
        """Optimizer steps before `step` of this phase since the start of the run, over all phases and rounds."""
        cfg = self.config
        phase1 = cfg.phase1.steps if cfg.selection == "magnitude" else 0
        return (round_ - 1) * (phase1 + cfg.phase2.steps) + (phase1 if phase_name == "phase2" else 0) + step

    def save_results(self, path: Path) -> None:
        """Strict JSON: the non-finite losses of skipped steps are written as null."""
        losses = {k: [v if math.isfinite(v) else None for v in vs] for k, vs in self.stats.losses.items()}
        write_text(path, json.dumps({**self.stats.__dict__, "losses": losses}, indent=2, allow_nan=False))


# --- the method's steps on my shard, shared by every loop that drives training (this recipe, the HF Trainer) ----

def fragments_by_role(shards: Shards, roles: dict[str, str]) -> tuple[list, list]:
    """My sparse (eligible) fragments and my dense-head fragments."""
    return ([f for f in shards.fragments if roles[f.name] == "sparse"],
            [f for f in shards.fragments if roles[f.name] == "head"])


def k_of_round(config: TrainConfig, k: int, round_: int) -> int:
    """The mask size after round `round_` of `config.rounds`: K grows in equal parts (all of K for BitFit)."""
    return k if config.selection == "all" else round(k * round_ / config.rounds)


def select_masks(config: TrainConfig, shards: Shards, snapshot: Snapshot, sparse: list, k: int,
                 previous: list[torch.Tensor] | None):
    """Global top-k of |θ − θ⁰| (or of seeded random scores, or all for BitFit); earlier rounds' picks are kept.
    Collective; returns `topk.select_topk`'s result (masks per sparse fragment, threshold, ties)."""
    if config.selection == "random":
        scores = random_scores([f.key for f in sparse], [f.numel for f in sparse], config.seed, shards.device)
    elif config.selection == "all":
        scores = [torch.ones(f.numel, device=shards.device) for f in sparse]
    else:
        scores = [snapshot.delta(f).abs_() for f in sparse]
    if previous is not None:
        for s, prev in zip(scores, previous):
            s.masked_fill_(prev, FLOAT_MAX)
    return select_topk(scores, [f.key for f in sparse], k, shards.all_reduce, shards.all_gather_object)


def selection_scalars(shards: Shards, shapes: dict, roles: dict[str, str], sparse: list, masks: list[torch.Tensor],
                      sfts: dict, k: int, threshold: float) -> dict[str, float]:
    """Threshold, K, mask density per module type and layer, and overlap with each language SFT in `sfts`:
    counted on my shard, summed over ranks in one all-reduce of one vector (collective)."""
    names = [n for n in shapes if roles[n] == "sparse"]
    counts = shards.all_reduce(torch.cat([selected_per_parameter(sparse, masks, names),
                                          mask_overlap(sparse, masks, sfts)]))
    per_param = {n: int(c) for n, c in zip(names, counts[:len(names)])}
    overlap = {lang: int(c) for lang, c in zip(sfts, counts[len(names):])}
    return {"select/threshold": threshold, "select/k": k, **density_scalars(per_param, shapes),
            **{f"mask/overlap/{lang}": c for lang, c in overlap.items()}}


def frozen_drift(shards: Shards, snapshot: Snapshot, mask: GradientMask) -> int:
    """Frozen elements of my shard that are not bit-identical to θ⁰ (summed over ranks; collective)."""
    local = sum(int((snapshot.changed(f) & mask.frozen_of(f)).sum())
                for f in shards.fragments)
    return int(shards.all_reduce(torch.tensor([local])))


def sft_metadata(config: TrainConfig, base_model: str, fingerprint: str, k: int, n_eligible: int) -> SFTMetadata:
    return SFTMetadata(kind="language" if config.kind == "language" else "task", languages=list(config.languages),
                       base_model=base_model, base_fingerprint=fingerprint, k=k, density=k / n_eligible,
                       training_config=to_dict(config))


def extract_sft(shards: Shards, snapshot: Snapshot, sparse: list, heads: list, selected: list[torch.Tensor],
                shapes: dict, metadata: SFTMetadata) -> SparseFineTuning | None:
    """φ = θ − θ⁰ at the selected positions, plus the dense head; gathered on rank 0 (bytes ∝ K), None elsewhere.
    Collective."""
    local = []
    for f, sel in zip(sparse, selected):
        idx = torch.nonzero(sel).view(-1)
        if idx.numel():
            local.append((f.name, idx + f.param_offset, snapshot.delta(f)[idx]))
    local_heads = [(f.name, f.param_offset, shards.master(f).clone()) for f in heads]
    gathered = shards.gather_object_to_zero((local, local_heads))
    if shards.rank != 0:
        return None
    parts, dense = {}, {}
    for rank_sparse, rank_heads in gathered:
        for name, idx, values in rank_sparse:
            parts.setdefault(name, []).append((idx, values))
        for name, offset, values in rank_heads:
            flat = dense.setdefault(name, torch.zeros(torch.Size(shapes[name]).numel()))
            flat[offset:offset + values.numel()] = values
    diffs = {}
    for name, chunks in parts.items():
        idx = torch.cat([c[0] for c in chunks])
        values = torch.cat([c[1] for c in chunks]).float()
        order = torch.argsort(idx)
        diffs[name] = (idx[order], values[order])
    return SparseFineTuning(diffs, {n: shapes[n] for n in diffs}, {n: v.view(shapes[n]) for n, v in dense.items()},
                            metadata)
