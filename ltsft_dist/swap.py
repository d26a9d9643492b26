"""The per-step language delta swap of multi-source task training (Ansell et al., 2022, §3.2).

Each optimizer step trains on one source language L and must see θ⁰ + φ_T + φ_L in its forward and backward
passes, while the optimizer's fp32 masters hold θ⁰ + φ_T only. `LanguageSwap` is a recipe step hook:

- `before_step(step)`: for L = `language_at(step)`, save the working-weight values at φ_L's positions
  (`index_select`) and write saved + φ_L there (`index_copy_`, the float32 sum `SparseFineTuning.apply` computes);
- `before_optimizer_step(step)`: write the saved values back (`index_copy_`), bit for bit: never by subtraction.

Only working weights (what the forward pass reads) are edited, never the masters (ZeRO 0, where a parameter is its
own master, and fp32 ZeRO-3 where DeepSpeed may alias the two, are covered because the restore happens before
`engine.step()`). The cost per step is O(K_L), not O(N): per language and per working tensor the local index and
value tensors are computed once (intersected with the element range this rank holds); working tensors that share
one storage (DeepSpeed's flat buffers) are handled as one flat view with one merged index, so a step is one gather
and two scatters over K_L elements (about K_L / W under ZeRO-3) in a handful of calls. The apply runs in chunks
so that what a chunk gathers is still in cache when it is scattered back. Where each rank's working tensors are,
and which element range they hold, comes from `shards.working_spans` (the only place that knows DeepSpeed's
layouts). Under ZeRO 0/1/2 every rank holds the whole working model, so every rank applies all K_L elements.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

import torch

from ltsft_dist.errors import LtsftError
from ltsft_dist.hooks import StepHook
from ltsft_dist.naming import body_prefix
from ltsft_dist.sft import SparseFineTuning, base_fingerprint
from ltsft_dist.shards import param_shape, working_spans

logger = logging.getLogger(__name__)

CHUNK = 8192  # positions per gather/scatter pair when applying (keeps the touched cache lines warm)


def check_language_sfts(model: torch.nn.Module, sfts: Mapping[str, SparseFineTuning],
                        languages: Iterable[str] = (), fingerprint: str | None = None) -> dict[str, list[str]]:
    """Raise `LtsftError` unless every language in `languages` has an SFT and every SFT fits `model`: same
    base (`metadata.base_fingerprint`, when recorded, against `base_fingerprint(model)`; `fingerprint` passes
    one computed earlier, before `deepspeed.initialize`) and, per diff, a parameter of the same shape.
    Diffs of parameters outside the model's body that the model lacks (a masked-LM head) are skipped;
    returns {language: [parameter names that will be swapped]}."""
    missing = sorted(set(languages) - set(sfts))
    if missing:
        raise LtsftError(f"no language SFT for source language(s) {', '.join(map(repr, missing))} (have: "
                         f"{', '.join(map(repr, sorted(sfts))) or 'none'}); give one per source language, or "
                         "train task-adapter-only (TA-only) without a language swap")
    fingerprint = base_fingerprint(model) if fingerprint is None else fingerprint
    params, body = dict(model.named_parameters()), body_prefix(model)
    plan = {}
    for language, sft in sfts.items():
        if not isinstance(sft, SparseFineTuning):
            raise LtsftError(f"language {language!r}: expected a SparseFineTuning, got {type(sft).__name__}")
        theirs = sft.metadata.base_fingerprint
        if theirs and theirs != fingerprint:
            raise LtsftError(f"language SFT {language!r} was trained on another base model "
                             f"({sft.metadata.base_model or 'unnamed'}: its body's parameter names/shapes differ "
                             "from this model's); use language SFTs of the model being fine-tuned")
        names = []
        for name in sft.diffs:
            p = params.get(name)
            if p is None:
                if name.startswith(body):
                    raise LtsftError(f"language SFT {language!r} changes {name!r}, which this model does not have "
                                     "(an SFT of another architecture?)")
                continue  # e.g. the MLM head of a language SFT: not part of a task model
            if param_shape(p) != sft.shapes[name]:
                raise LtsftError(f"language SFT {language!r}: shape mismatch for {name!r}: SFT "
                                 f"{sft.shapes[name]}, model {param_shape(p)}")
            names.append(name)
        skipped = len(sft.diffs) - len(names)
        if skipped or sft.heads:
            logger.info("language SFT %r: %d diff(s) outside this model's body and %d dense head(s) not swapped",
                        language, skipped, len(sft.heads))
        plan[language] = names
    return plan


class LanguageSwap(StepHook):
    """A recipe step hook adding the step's language SFT φ_L to the working weights for the forward and backward
    passes and restoring them exactly before the optimizer step:

        order = MultiSourceOrder(...)
        swap = LanguageSwap(model, {"en": sft_en, "de": sft_de}, order)  # before deepspeed.initialize
        LTSFTRecipe(model, ..., order=order, step_hooks=[swap]).run()

    `language_at` is the order (anything with `language_at(step)`) or a function step -> language code. Construct
    it before the engine is built: the checks (see `check_language_sfts`) then run before training starts, and
    the fingerprint is that of the model as given. The working-weight plan is built at the first step, once
    DeepSpeed has laid the weights out. `seconds` accumulates the time spent applying and restoring."""

    timer = "swap"

    def __init__(self, model: torch.nn.Module, sfts: Mapping[str, SparseFineTuning],
                 language_at: Callable[[int], str] | object, *, languages: Iterable[str] | None = None,
                 fingerprint: str | None = None):
        self.language_at = getattr(language_at, "language_at", language_at)
        if not callable(self.language_at):
            raise LtsftError("language_at must be a function of the step or an order with language_at(step)")
        if languages is None:
            languages = getattr(language_at, "languages", ())
        self.model, self.sfts = model, dict(sfts)
        self._names = check_language_sfts(model, self.sfts, languages, fingerprint)
        # What a checkpoint records, so that a resume notices a language SFT changed on disk since the start.
        self.fingerprints = {f"language SFT {lang!r}": sft.fingerprint() for lang, sft in self.sfts.items()}
        self._params = dict(model.named_parameters())
        self._bounds_cache: dict[tuple[str, str, str], tuple[int, int] | None] = {}
        self._layouts: dict[tuple, tuple[torch.Tensor, list]] = {}
        self._applied: tuple[int, str, list] | None = None
        self.seconds = {"apply": 0.0, "restore": 0.0}
        self.steps = 0

    # --- the hook --------------------------------------------------------------------------------

    def before_step(self, step: int) -> None:
        self.apply(self.language_at(step), step)

    @torch.no_grad()
    def apply(self, language: str, step: int | None = None) -> None:
        """Add φ_language to the working weights (e.g. for evaluating on that language); `restore` undoes it."""
        if self._applied is not None:
            raise LtsftError(f"language swap: {language!r} applied while the delta of {self._applied[1]!r} (step "
                             f"{self._applied[0]}) is still applied (restore or before_optimizer_step was not called)")
        start = time.perf_counter()
        if language not in self.sfts:
            raise LtsftError(f"step {step} trains on language {language!r}, which has no language SFT")
        groups: dict[int, list] = {}  # working tensors sharing one storage (e.g. DeepSpeed's flat buffers)
        for span in working_spans((n, self._params[n]) for n in self._names[language]):
            if self._bounds(language, span) is not None:
                groups.setdefault(span.tensor.untyped_storage().data_ptr(), []).append(span)
        saved = []
        for spans in groups.values():
            flat, index, chunks = self._merged(language, spans)
            original = torch.empty(index.numel(), dtype=flat.dtype, device=flat.device)
            at = 0
            # Chunked, so that the lines a chunk reads are still in cache when it writes them back.
            for chunk_index, chunk_values in chunks:
                chunk = original.narrow(0, at, chunk_index.numel())
                torch.index_select(flat, 0, chunk_index, out=chunk)
                if flat.dtype == torch.float32:
                    updated = torch.add(chunk, chunk_values)
                else:  # as SparseFineTuning.apply: the sum in float32, rounded to the working dtype
                    updated = (chunk.float() + chunk_values).to(flat.dtype)
                flat.index_copy_(0, chunk_index, updated)
                at += chunk_index.numel()
            saved.append((flat, index, original))
        self._applied = (step, language, saved)
        self.steps += 1
        self.seconds["apply"] += time.perf_counter() - start

    @torch.no_grad()
    def seconds_spent(self) -> float:
        return sum(self.seconds.values())

    def before_optimizer_step(self, step: int) -> None:
        self.restore()

    @torch.no_grad()
    def restore(self) -> None:
        """Write back the values saved at `before_step` (a no-op when nothing is applied)."""
        if self._applied is None:
            return
        start = time.perf_counter()
        for tensor, index, original in reversed(self._applied[2]):
            tensor.index_copy_(0, index, original)
        self._applied = None
        self.seconds["restore"] += time.perf_counter() - start

    @property
    def applied_language(self) -> str | None:
        return None if self._applied is None else self._applied[1]

    # --- plans -------------------------------------------------------------------------------------

    def _merged(self, language: str, spans: list) -> tuple[torch.Tensor, torch.Tensor, list]:
        """One flat view of the storage the spans share, φ_L's positions in it (ascending) and, in chunks of
        `CHUNK` (views), those positions with their values. Cached per language and layout (span offsets in the
        storage), which DeepSpeed keeps from step to step; only the flat view is made anew. Memory: 12 bytes per
        local position per language (int64 index, float32 value), beside the SFTs themselves."""
        spans = sorted(spans, key=lambda sp: sp.tensor.storage_offset())
        key = (language, tuple((sp.name, sp.kind, sp.tensor.storage_offset()) for sp in spans))
        merged = self._layouts.get(key)
        if merged is None:
            if len(self._layouts) > 64 * len(self.sfts):  # layouts that changed (re-allocations): forget them
                self._layouts.clear()
            for a, b in zip(spans, spans[1:]):
                if a.tensor.storage_offset() + a.numel > b.tensor.storage_offset():
                    raise LtsftError(f"working weights of {a.name!r} ({a.kind}) and {b.name!r} ({b.kind}) share "
                                     "memory: a language delta would be applied twice")
            index_parts, value_parts = [], []
            for sp in spans:  # SFT offsets -> offsets in the storage
                lo, hi = self._bounds(language, sp)
                indices, values = self.sfts[language].diffs[sp.name]
                index_parts.append(indices[lo:hi] + (sp.tensor.storage_offset() - sp.start))
                value_parts.append(values[lo:hi])
            device = spans[0].tensor.device
            index, values = torch.cat(index_parts).to(device), torch.cat(value_parts).to(device)
            chunks = [(index[i:i + CHUNK], values[i:i + CHUNK]) for i in range(0, index.numel(), CHUNK)]
            merged = self._layouts[key] = (index, chunks)
        tensor = spans[0].tensor
        storage = tensor.untyped_storage()
        flat = tensor.new_empty(0).set_(storage, 0, (storage.nbytes() // tensor.element_size(),))
        return (flat, *merged)

    def _bounds(self, language: str, span) -> tuple[int, int] | None:
        """Where φ_L's positions inside the span lie in the SFT's (sorted) index of that parameter: a contiguous
        slice [lo, hi), found in O(log K) once per (language, parameter, kind of working tensor); None if empty."""
        key = (language, span.name, span.kind)
        if key not in self._bounds_cache:
            indices = self.sfts[language].diffs[span.name][0]
            lo = int(torch.searchsorted(indices, span.start))
            hi = int(torch.searchsorted(indices, span.start + span.numel))
            self._bounds_cache[key] = (lo, hi) if lo < hi else None
        return self._bounds_cache[key]
