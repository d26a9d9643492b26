"""Training data as fixed-length tensors, and the order every rank agrees on.

The order depends only on (seed, step), never on the world size: step s of every run consumes the same
global batch, each rank taking its slice. That is what lets a 3-rank run be checked against a
single-process oracle. MLM masks are drawn per row of a batch from (seed, step, the row's place in the global
batch): a rank draws only its own rows' masks, and they are the same at every world size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ltsft_dist.errors import LtsftError

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# A decoder's tokenizer: text starts with <s>, documents end with </s>, and a pad token (lm-eval and batched
# generation need one; a vocabulary grown later would change the model's embeddings).
CAUSAL_SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]


@dataclass
class Examples:
    """Fixed-length tokenised examples: `tensors` are the model's forward arguments, one row per example
    (e.g. input_ids, attention_mask, labels; start_positions/end_positions for QA), as tensors or as anything
    indexed like one (`token_cache.Column`: rows read from the memory-mapped cache). For MLM, `labels` is
    absent: masks are drawn per batch from `mlm`."""

    tensors: dict[str, torch.Tensor]
    mlm: MLMSpec | None = None

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]


@dataclass
class MLMSpec:
    mask_token_id: int
    special_ids: tuple[int, ...]
    vocab_size: int
    probability: float = 0.15
    own: torch.Tensor | None = None  # bool per token id: the language's own tokens (`own_tokens_mask`); None: all


def own_tokens_mask(columns, mask_token_id: int, vocab_size: int, chunk: int = 4096) -> torch.Tensor:
    """The tokens that occur in a language's rows, and [MASK], as a bool per token id (on the CPU, where masks
    are drawn). Read from the data alone, a chunk of rows at a time (token-cache columns stay on disk), so every
    rank that reads the same text gets the same set."""
    own = torch.zeros(vocab_size, dtype=torch.bool)
    for ids in columns:
        for start in range(0, len(ids), chunk):
            own[torch.as_tensor(ids[start:start + chunk]).unique()] = True
    own[mask_token_id] = True
    return own


def keep_inside(inputs: torch.Tensor, own: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """Inputs outside the language's own tokens become [MASK]: a random replacement stays inside the language, so
    the rows of other languages' tokens are never looked up. With `among_own`, one rule for a language's MLM."""
    return inputs.masked_fill(~own[inputs], mask_token_id)


def over_outputs(own: torch.Tensor, outputs: int) -> torch.Tensor:
    """`own` over a model's `outputs` token ids: a model may have more vocabulary rows than its tokenizer has
    tokens, and those are never own."""
    padded = torch.zeros(outputs, dtype=torch.bool)
    padded[:len(own)] = own
    return padded


def among_own(logits: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Logits with every token outside `own` (one per output, `over_outputs`) at -inf: the masked-token softmax
    runs over the language's own tokens, so the (tied) rows of the others get no gradient from its loss (a full
    softmax pushes them all away)."""
    return logits.masked_fill(~own, float("-inf"))


def bert_mask(ids: torch.Tensor, spec: MLMSpec, g: torch.Generator,
              at_least_one: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of `ids`: (inputs, labels). Each non-special token is chosen with `spec.probability`
    (`at_least_one`: every row with a maskable token gets one); a chosen token becomes [MASK] (80%), a random
    non-special id (10%; one outside `spec.own`, when given, becomes [MASK]) or stays (10%), and its label is the
    original id (-100 elsewhere)."""
    maskable = ~torch.isin(ids, torch.tensor(spec.special_ids))
    chosen = (torch.rand(ids.shape, generator=g) < spec.probability) & maskable
    if at_least_one:
        fallback = torch.rand(ids.shape, generator=g).masked_fill(~maskable, -1).argmax(1)
        needs = ~chosen.any(1) & maskable.any(1)
        chosen[needs, fallback[needs]] = True
    action = torch.rand(ids.shape, generator=g)
    random_ids = torch.randint(len(spec.special_ids), max(spec.vocab_size, len(spec.special_ids) + 1), ids.shape,
                               generator=g)
    inputs = torch.where(chosen & (action < 0.8), torch.full_like(ids, spec.mask_token_id), ids)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    if spec.own is not None:
        inputs = keep_inside(inputs, spec.own, spec.mask_token_id)
    return inputs, torch.where(chosen, ids, torch.full_like(ids, -100))


def train_wordpiece(lines: list[str], vocab_size: int, causal: bool = False):
    """A small WordPiece tokenizer built locally, for tiny models without the hub: the special tokens, the most
    frequent characters (alone and as ##continuations) and then the most frequent words. Built from counts with
    a fixed tie-break, so the same text always gives the same tokenizer (the `tokenizers` trainer does not: its
    hash maps are seeded per process, which made every run's token ids differ). `causal`: a decoder's tokenizer
    (<s> text, with </s> and <pad>), else an encoder's ([CLS] text [SEP], with [MASK] and [PAD])."""
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = CAUSAL_SPECIAL if causal else SPECIAL
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = Counter(word for line in lines
                    for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)))
    chars = Counter()
    for word, n in words.items():
        for c in word:
            chars[c] += n
    by_count = lambda counts: sorted(counts, key=lambda t: (-counts[t], t))  # noqa: E731
    room = max(0, vocab_size - len(special))
    kept_chars = by_count(chars)[:room // 2]
    vocab = list(special) + kept_chars + ["##" + c for c in kept_chars]
    known = set(vocab)
    vocab += [w for w in by_count(words) if w not in known and len(w) > 1][:max(0, vocab_size - len(vocab))]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token=special[1]))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    if causal:
        tok.decoder = decoders.WordPiece()  # generated ids read back as words
        pad, unk, bos, eos = special
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {eos} $B:1", special_tokens=[(bos, 2), (eos, 3)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, pad_token=pad, bos_token=bos,
                                       eos_token=eos)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def accumulation_steps(batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Micro-batches per rank per optimizer step: the global batch must split evenly over ranks and micro-batches."""
    if batch_size <= 0 or micro_batch_size <= 0 or batch_size % (micro_batch_size * world_size):
        raise LtsftError(f"batch_size={batch_size} must be a positive multiple of micro_batch_size × ranks = "
                         f"{micro_batch_size} × {world_size}")
    return batch_size // (micro_batch_size * world_size)


def row_masks(ids: torch.Tensor, spec: MLMSpec, seed: int, step: int, first_slot: int) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """BERT masking of rows `first_slot`, `first_slot`+1, ... of step `step`'s global batch, each row from its
    own generator seeded by (seed, step, slot): the same whichever rank, micro-batch or world size draws it."""
    masked = []
    for j in range(len(ids)):
        state = np.random.SeedSequence([seed, step, first_slot + j]).generate_state(2, np.uint32)
        g = torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
        masked.append(bert_mask(ids[j:j + 1], spec, g))
    return torch.cat([m[0] for m in masked]), torch.cat([m[1] for m in masked])


class StepOrder:
    """Which examples rank `rank` feeds at (step, micro-step): a seeded permutation per epoch, drop-last."""

    def __init__(self, examples: Examples, batch_size: int, micro_batch_size: int, rank: int, world_size: int,
                 seed: int):
        self.accumulation = accumulation_steps(batch_size, micro_batch_size, world_size)
        if len(examples) < batch_size:
            raise LtsftError(f"only {len(examples)} examples for a global batch of {batch_size}: lower batch_size")
        self.examples, self.batch, self.micro = examples, batch_size, micro_batch_size
        self.rank, self.world, self.seed = rank, world_size, seed
        self.steps_per_epoch = len(examples) // batch_size
        self._epoch, self._perm = None, None

    def _slot(self, micro: int) -> int:
        """Where this rank's micro-batch `micro` starts in the step's global batch."""
        return (micro * self.world + self.rank) * self.micro

    def indices(self, step: int, micro: int) -> torch.Tensor:
        epoch, within = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(len(self.examples), generator=g)
        start = within * self.batch + self._slot(micro)
        return self._perm[start:start + self.micro]

    def batch_at(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        idx = self.indices(step, micro)
        batch = {name: t[idx] for name, t in self.examples.tensors.items()}
        if self.examples.mlm is not None:
            inputs, labels = row_masks(batch["input_ids"], self.examples.mlm, self.seed, step, self._slot(micro))
            batch.update(input_ids=inputs, labels=labels)
        return batch
