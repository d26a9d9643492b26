"""Multi-source task training: one source language per optimizer step (Ansell et al., 2022, §3.2).

`MultiSourceOrder` has the interface of `ltsft_dist.data.StepOrder` (`accumulation`, `batch_at(step, micro)`) plus
`language_at(step)`. Every optimizer step draws one language; all its micro-batches, on every rank, come from that
language, so the step's language SFT can be swapped in for the whole step (`ltsft_dist.swap.LanguageSwap`).

Everything is a pure function of (seed, step) and of the configuration, never of the world size or of what was
asked before, so every rank agrees without communicating and a resumed run continues exactly where it stopped:

- language of step s: a categorical draw with probabilities p_L from a generator seeded by (seed, s // 1024);
- its position: the number c of steps before s that drew the same language (counted from the draws; the
  per-block counts are cached, which changes no result) — step s feeds batch c of that language;
- batch c of language L: epoch e = c // steps_per_epoch(L), a seeded permutation of L's pool per (seed, L, e),
  drop-last, and the same rank/micro-batch layout as `StepOrder` (so a W-rank run matches a 1-process run).

Pools: a per-language cap keeps a seeded random subset of at most `cap` examples (the paper caps at 15K per
language); an upsampling factor f repeats the pool f times per epoch (fractional f: the first ⌊f·n⌋ slots of the
repeated, seeded order). The pool sizes m_L = ⌊f_L · min(n_L, cap_L)⌋ drive the policies: "proportional"
p_L ∝ m_L, "uniform" p_L = 1/#languages, "temperature" p_L ∝ m_L^(1/T) (T = 1 is proportional, T → ∞ uniform).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ltsft_dist.data import Examples, accumulation_steps, bert_mask
from ltsft_dist.errors import LtsftError

if TYPE_CHECKING:
    from ltsft_dist.sft import SparseFineTuning
    from ltsft_dist.swap import LanguageSwap

POLICIES = ("proportional", "uniform", "temperature")
BLOCK = 1024  # language draws per generator


def _seed(*parts) -> int:
    """A stable 63-bit seed from any parts (Python's hash() differs between processes)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def _generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


@dataclass
class SamplingConfig:
    """How source languages are drawn per optimizer step (see the module docstring)."""

    policy: str = field(default="proportional", metadata={"help": "proportional | uniform | temperature"})
    temperature: float = field(default=1.0, metadata={"help": 'for policy "temperature": p ∝ size^(1/T)'})
    upsample: dict[str, float] = field(default_factory=dict, metadata={"help": "language -> factor (default 1)"})
    cap: int | dict[str, int] | None = field(default=None, metadata={
        "help": "max examples per language (one number for all, or per language)"})


class MultiSourceOrder:
    """Which examples rank `rank` feeds at (step, micro-step) when each step trains on one source language."""

    def __init__(self, sources: Mapping[str, Examples], batch_size: int, micro_batch_size: int, rank: int,
                 world_size: int, seed: int, *, policy: str = "proportional", temperature: float = 1.0,
                 upsample: Mapping[str, float] | None = None, cap: int | Mapping[str, int] | None = None):
        if not sources:
            raise LtsftError("multi-source training needs at least one source language")
        if policy not in POLICIES:
            raise LtsftError(f"unknown sampling policy {policy!r}: use one of {', '.join(POLICIES)}")
        if policy == "temperature" and not temperature > 0:
            raise LtsftError(f"sampling temperature must be positive, got {temperature}")
        if not 0 <= rank < world_size:
            raise LtsftError(f"rank {rank} is outside a world of {world_size}")
        self.accumulation = accumulation_steps(batch_size, micro_batch_size, world_size)
        self.languages = sorted(sources)  # independent of the dict's order
        self.sources = {lang: sources[lang] for lang in self.languages}
        self._check_sources()
        upsample = dict(upsample or {})
        caps = dict(cap) if isinstance(cap, Mapping) else {lang: cap for lang in self.languages}
        for what, table in (("upsample", upsample), ("cap", caps)):
            unknown = sorted(set(table) - set(self.languages))
            if unknown:
                raise LtsftError(f"{what}: {unknown[0]!r} is not a source language ({', '.join(self.languages)})")
        self.batch, self.micro, self.rank, self.world, self.seed = batch_size, micro_batch_size, rank, world_size, seed
        self.pools, self.sizes = {}, {}
        for lang in self.languages:
            n = len(self.sources[lang])
            limit = caps.get(lang)
            if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
                raise LtsftError(f"cap for {lang!r} must be a positive integer, got {limit!r}")
            factor = upsample.get(lang, 1.0)
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
                raise LtsftError(f"upsample factor for {lang!r} must be a positive number, got {factor!r}")
            kept = n if limit is None else min(n, limit)
            # A seeded order of the language's examples: the cap keeps its head, upsampling cycles through it.
            self.pools[lang] = torch.randperm(n, generator=_generator(seed, "pool", lang))[:kept]
            self.sizes[lang] = int(factor * kept)
            if self.sizes[lang] < batch_size:
                raise LtsftError(
                    f"source language {lang!r} has {n} examples ({self.sizes[lang]} after cap {limit} and "
                    f"upsampling ×{factor}), fewer than one global batch of {batch_size}: lower batch_size, raise "
                    "its cap or upsampling, or leave the language out")
        self.steps_per_epoch = {lang: self.sizes[lang] // batch_size for lang in self.languages}
        weights = torch.tensor([1.0 if policy == "uniform" else float(self.sizes[lang]) for lang in self.languages],
                               dtype=torch.float64)
        if policy == "temperature":
            weights = weights ** (1.0 / temperature)
        self.policy, self.temperature = policy, temperature
        self.probabilities = {lang: float(w) for lang, w in zip(self.languages, weights / weights.sum())}
        self._cdf = torch.cumsum(weights / weights.sum(), 0)
        self._blocks: list[torch.Tensor] = []  # language ids of block b (cache of a pure function)
        self._counts: list[torch.Tensor] = []  # steps per language before block b
        self._epochs: dict[str, tuple[int, torch.Tensor]] = {}
        self._mlm_cache: tuple | None = None

    def _check_sources(self) -> None:
        first = self.languages[0]
        keys = set(self.sources[first].tensors)
        for lang, examples in self.sources.items():
            if not isinstance(examples, Examples):
                raise LtsftError(f"source {lang!r}: expected ltsft_dist.data.Examples, got {type(examples).__name__}")
            if (examples.mlm is None) != (self.sources[first].mlm is None):
                raise LtsftError(f"sources {first!r} and {lang!r}: mixing masked-LM and labelled examples")
            if set(examples.tensors) != keys:
                raise LtsftError(f"source {lang!r} has tensors {sorted(examples.tensors)}, source {first!r} has "
                                 f"{sorted(keys)}: every source language needs the same model inputs")

    @property
    def examples(self) -> Examples:
        """An `Examples` standing for the sources where `LTSFTRecipe` wants one (with a custom order it only reads
        `.mlm`, to normalise masked-LM losses): the first language's."""
        return self.sources[self.languages[0]]

    # --- which language, which batch of it --------------------------------------------------------------

    def _extend(self, block: int) -> None:
        while len(self._blocks) <= block:
            b = len(self._blocks)
            u = torch.rand(BLOCK, generator=_generator(self.seed, "language", b), dtype=torch.float64)
            ids = torch.searchsorted(self._cdf, u, right=True).clamp_(max=len(self.languages) - 1)
            before = self._counts[-1] + torch.bincount(self._blocks[-1], minlength=len(self.languages)) \
                if self._blocks else torch.zeros(len(self.languages), dtype=torch.int64)
            self._blocks.append(ids)
            self._counts.append(before)

    def language_ids(self, start: int, stop: int) -> torch.Tensor:
        """Language indices (into `languages`) of steps [start, stop)."""
        if stop <= start:
            return torch.zeros(0, dtype=torch.int64)
        self._extend((stop - 1) // BLOCK)
        return torch.cat(self._blocks[start // BLOCK:(stop - 1) // BLOCK + 1])[start % BLOCK:][:stop - start]

    def language_at(self, step: int) -> str:
        if step < 0:
            raise LtsftError(f"step must be non-negative, got {step}")
        block, within = divmod(step, BLOCK)
        self._extend(block)
        return self.languages[int(self._blocks[block][within])]

    def position(self, step: int) -> tuple[str, int]:
        """(language, c): step `step` trains on batch c of its language (c = earlier steps of that language)."""
        block, within = divmod(step, BLOCK)
        self._extend(block)
        ids = self._blocks[block]
        lang = int(ids[within])
        return self.languages[lang], int(self._counts[block][lang]) + int((ids[:within] == lang).sum())

    def _permutation(self, lang: str, epoch: int) -> torch.Tensor:
        cached = self._epochs.get(lang)
        if cached is None or cached[0] != epoch:
            cached = (epoch, torch.randperm(self.sizes[lang], generator=_generator(self.seed, "epoch", lang, epoch)))
            self._epochs[lang] = cached
        return cached[1]

    def global_batch(self, step: int) -> tuple[str, torch.Tensor]:
        """(language, example indices of the whole global batch of `step`, in rank/micro-batch layout order)."""
        lang, c = self.position(step)
        epoch, within = divmod(c, self.steps_per_epoch[lang])
        slots = self._permutation(lang, epoch)[within * self.batch:(within + 1) * self.batch]
        pool = self.pools[lang]
        return lang, pool[slots % len(pool)]

    def indices(self, step: int, micro: int) -> tuple[str, torch.Tensor]:
        """(language, indices into `sources[language]`) that this rank feeds at (step, micro)."""
        lang, rows = self.global_batch(step)
        start = (micro * self.world + self.rank) * self.micro
        return lang, rows[start:start + self.micro]

    def batch_at(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        lang, idx = self.indices(step, micro)
        examples = self.sources[lang]
        batch = {name: t[idx] for name, t in examples.tensors.items()}
        if examples.mlm is not None:
            inputs, labels = self._mlm_batch(step)
            start = (micro * self.world + self.rank) * self.micro
            batch.update(input_ids=inputs[start:start + self.micro], labels=labels[start:start + self.micro])
        return batch

    def _mlm_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT masking (`data.bert_mask`) of the step's global batch, seeded by (seed, language,
        batch number): the same on every rank and for every world size."""
        if self._mlm_cache is not None and self._mlm_cache[0] == step:
            return self._mlm_cache[1]
        lang, c = self.position(step)
        _, rows = self.global_batch(step)
        ids = self.sources[lang].tensors["input_ids"][rows]
        inputs, labels = bert_mask(ids, self.sources[lang].mlm, _generator(self.seed, "mlm", lang, c))
        self._mlm_cache = (step, (inputs, labels))
        return inputs, labels


def build_multisource(model: torch.nn.Module, sources: Mapping[str, Examples],
                      sfts: Mapping[str, SparseFineTuning] | None, config, *,
                      sampling: SamplingConfig | None = None, rank: int | None = None,
                      world_size: int | None = None) -> tuple[MultiSourceOrder, LanguageSwap | None]:
    """Everything a multi-source task run needs besides the recipe: `(order, swap)` for
    `LTSFTRecipe(model, order.examples, config, ds_config, order=order, step_hooks=[swap] if swap else [])`.

    `config` is the `TrainConfig` (batch_size, micro_batch_size, seed). `sfts` maps every source language to its
    language SFT; `sfts=None` is TA-only training (no language SFT, `swap` is None). One source language with
    its SFT is single-source training with the source-language SFT applied. Call it before the DeepSpeed engine
    is built (before `LTSFTRecipe`): mismatched or missing SFTs then fail before training starts. Rank and world
    size default to the initialised process group's."""
    import torch.distributed as dist

    from ltsft_dist.swap import LanguageSwap

    if rank is None or world_size is None:
        initialised = dist.is_available() and dist.is_initialized()
        rank = (dist.get_rank() if initialised else 0) if rank is None else rank
        world_size = (dist.get_world_size() if initialised else 1) if world_size is None else world_size
    sampling = sampling or SamplingConfig()
    order = MultiSourceOrder(sources, config.batch_size, config.micro_batch_size, rank, world_size, config.seed,
                             policy=sampling.policy, temperature=sampling.temperature, upsample=sampling.upsample,
                             cap=sampling.cap)
    if sfts is None:
        return order, None
    # SFTs of languages that are not sources (e.g. the target languages') are not needed here: left out.
    return order, LanguageSwap(model, {lang: sft for lang, sft in sfts.items() if lang in order.sources}, order,
                               languages=order.languages)
