"""Small models, data and configs shared by the single-process oracle and the multi-rank runs."""

from __future__ import annotations

import copy
import dataclasses
import math
import tempfile
from contextlib import contextmanager

import torch
from transformers import BertConfig, BertForSequenceClassification

from ltsft_dist.config import ModelConfig, PhaseConfig, TrainConfig
from ltsft_dist.data import Examples
from ltsft_dist.engine import ds_config_for
from ltsft_dist.hooks import StepHook
from ltsft_dist.sft import SFTMetadata, SparseFineTuning, base_fingerprint

TINY = dict(vocab_size=61, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=30,
            max_position_embeddings=20, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


# A Llama-shaped decoder: grouped-query attention (1 key/value head), RMSNorms, untied output head. Its numels
# (1220, 400, 200, 600, 20) leave ZeRO-3 padding at W=3, and 1220 at W=3 and 4 is not a multiple of 4 either.
TINY_LLAMA = dict(vocab_size=61, hidden_size=20, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=30, max_position_embeddings=24)


def tiny_classifier(seed: int = 0) -> BertForSequenceClassification:
    """Sizes chosen so that no parameter divides evenly across 3 or 4 ranks (padding paths get used)."""
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**TINY, num_labels=3))


def tiny_model(kind: str = "task", seed: int = 0):
    """The classifier for task/BitFit SFTs; for language SFTs a masked LM with untied output embeddings."""
    if kind != "language":
        return tiny_classifier(seed)
    from transformers import BertForMaskedLM

    from ltsft_dist.models import untie_output_embeddings

    torch.manual_seed(seed)
    model = BertForMaskedLM(BertConfig(**TINY))
    untie_output_embeddings(model)
    return model


def model_for(cfg: TrainConfig, seed: int = 0, ds_config: dict | None = None):
    """The scenario's model: a tiny decoder built as `ltsft train` builds it (`models.build_model`, which unties
    its output head), else the tiny BERT of its kind. With a ZeRO-3 `ds_config`, the decoder is saved and loaded
    back as a checkpoint is, straight into DeepSpeed's partitions, while the BERT is built whole and partitioned by
    the engine: both ways of reaching ZeRO-3 are covered."""
    from ltsft_dist.engine import zero_stage
    from ltsft_dist.models import build_model, is_decoder

    if not is_decoder(cfg.model.architecture):
        return tiny_model(cfg.kind, seed)
    model = build_model(cfg.model, cfg.task, seed=seed)
    if zero_stage(ds_config) != 3:
        return model
    from ltsft_dist import comm

    directory = comm.broadcast_object(tempfile.mkdtemp(prefix="ltsft-base-") if comm.rank() == 0 else None)
    if comm.rank() == 0:  # transformers saves from the main process only
        model.save_pretrained(directory)
    comm.barrier()
    return build_model(dataclasses.replace(cfg.model, name_or_path=directory, tiny=None), cfg.task, seed=seed,
                       ds_config=ds_config)


def clm_examples(n: int = 48, length: int = 12, seed: int = 4) -> Examples:
    """Full causal-LM blocks as the clm task makes them: <s> (id 2) then random tokens of the tiny vocabulary."""
    from ltsft_dist.tasks.clm import causal_examples

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, TINY_LLAMA["vocab_size"], (n, length), generator=g)
    ids[:, 0] = 2
    return causal_examples(ids)


def clm_config(stage_file: str = "zero2.json", **overrides) -> TrainConfig:
    """A language SFT of the tiny Llama (task clm)."""
    overrides = {"model": ModelConfig(tiny=dict(TINY_LLAMA), architecture="llama"), "weight_decay": 0.05, **overrides}
    return task_config(stage_file, kind="language", task="clm", **overrides)


def instruct_examples(n: int = 48, length: int = 12, seed: int = 5) -> Examples:
    """Instruction rows as the instruct task makes them: <s> (id 2), a prompt, a response ended by </s> (id 3),
    right-padded (id 0); labels on the response and </s> only. Prompt and response lengths vary, so micro-batches
    hold different numbers of labelled tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, TINY_LLAMA["vocab_size"], (n, length), generator=g)
    prompt = torch.randint(2, length // 2, (n,), generator=g)
    response = torch.randint(1, length // 2, (n,), generator=g)
    positions = torch.arange(length)[None, :]
    ends = (prompt + response)[:, None]  # the </s> position
    ids[:, 0] = 2
    ids = torch.where(positions == ends, 3, ids)
    attention = (positions <= ends).long()
    ids = ids * attention
    labels = torch.where((positions >= prompt[:, None]) & (positions <= ends), ids, -100)
    return Examples({"input_ids": ids, "attention_mask": attention, "labels": labels})


def mlm_examples(n: int = 48, length: int = 12, seed: int = 2) -> Examples:
    from ltsft_dist.data import MLMSpec

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, TINY["vocab_size"], (n, length), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    return Examples({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                    mlm=MLMSpec(mask_token_id=4, special_ids=(0, 1, 2, 3, 4), vocab_size=TINY["vocab_size"],
                                probability=0.3))


def classification_examples(n: int = 48, length: int = 12, used_vocab: int = 61, seed: int = 1) -> Examples:
    """A learnable task: the label is the first content token modulo 3. `used_vocab` < 61 leaves embedding rows
    untouched by phase 1 (exact zero diffs, hence ties at the threshold)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, used_vocab, (n, length), generator=g)
    ids[:, 0] = 2
    lengths = torch.randint(length // 2, length + 1, (n,), generator=g)
    attention = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = ids * attention
    return Examples({"input_ids": ids, "attention_mask": attention, "labels": ids[:, 1] % 3})


def task_config(stage_file: str = "zero2.json", **overrides) -> TrainConfig:
    cfg = TrainConfig(kind="task", languages=["xx"], density=0.1, output_dir=tempfile.mkdtemp(prefix="ltsft-"), batch_size=12, micro_batch_size=4,
                      weight_decay=0.1, max_grad_norm=0.5, seed=3, deepspeed=stage_file,
                      phase1=PhaseConfig(steps=6, lr=3e-3, warmup_steps=2, l1=0.0),
                      phase2=PhaseConfig(steps=6, lr=3e-3, l1=0.0))
    cfg.model.tiny = dict(TINY)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    cfg.validate()
    return cfg.complete()


def working_weight_drift(model, theta0: dict[str, torch.Tensor], diffs: dict | None, roles: dict[str, str]) -> int:
    """Elements of the working weights (what the forward pass uses) that moved although they are frozen:
    unselected positions of sparse parameters and every element of frozen parameters. Collective."""
    import deepspeed

    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        moved = 0
        for name, p in params.items():
            if roles[name] == "head":
                continue
            changed = (p.detach().reshape(-1) != theta0[name].reshape(-1).to(p.dtype))
            if roles[name] == "sparse" and diffs is not None and name in diffs:
                changed[diffs[name][0]] = False
            moved += int(changed.sum())
    return moved


def run_cases(cases: list[tuple[str, TrainConfig, Examples, int]], world_size: int) -> dict:
    """Several LT-SFT runs in one launch (process start-ups are the expensive part). Rank 0 returns
    {case name: {"diffs", "heads", "stats", "working_drift"}}."""
    import torch.distributed as dist

    from ltsft_dist.recipe import LTSFTRecipe

    results = {}
    for name, cfg, examples, accumulation in cases:
        cfg = copy.deepcopy(cfg)
        cfg.micro_batch_size = cfg.batch_size // (world_size * accumulation)
        ds = ds_config_for(cfg, world_size)
        model = model_for(cfg, ds_config=ds)
        built = _held_at_build(model)
        layer_calls = _count_first_layer_calls(model)
        recipe = LTSFTRecipe(model, examples, cfg, ds, show_progress=False)
        with _counting_sparse_pulls() as sparse_pulls:
            sft = recipe.run()
        diffs = sft.diffs if sft is not None else None
        diffs = [diffs]
        dist.broadcast_object_list(diffs, src=0)
        theta0 = dict(model_for(cfg).named_parameters())
        drift = working_weight_drift(model, theta0, diffs[0], recipe.eligibility.roles)
        if sft is not None:
            results[name] = {"diffs": sft.diffs, "heads": sft.heads, "stats": dict(recipe.stats.__dict__),
                             "working_drift": drift, "held_at_build": built, "first_layer_calls": layer_calls,
                             "sparse_pulls": sparse_pulls[0]}
    return results


@contextmanager
def _counting_sparse_pulls():
    """Counts the L1 pulls computed at a phase-2 mask's trainable offsets only (not over whole fragments)."""
    from ltsft_dist.masking import L1Pull

    calls, original = [0], L1Pull._delta_at

    def counted(self, f, offsets):
        calls[0] += 1
        return original(self, f, offsets)

    L1Pull._delta_at = counted
    try:
        yield calls
    finally:
        L1Pull._delta_at = original


def _count_first_layer_calls(model) -> list[int]:
    """A counter of the calls, in training mode, of the first module inside the first decoder layer (activation
    checkpointing recomputes the layer's forward, and so calls it again, in the backward pass); stays [0] for
    models without decoder layers."""
    calls = [0]
    layer = next((m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")), None)
    if layer is not None:
        inner = next(layer.children())
        inner.register_forward_hook(lambda module, args, out: calls.__setitem__(0, calls[0] + module.training))
    return calls


def _held_at_build(model) -> dict:
    """Elements this rank holds of the model as built, and of the whole model: a model loaded straight into ZeRO-3
    partitions holds about 1/W of it."""
    from ltsft_dist.shards import is_zero3_param, param_shape

    held = sum(p.ds_tensor.numel() if is_zero3_param(p) else p.numel() for p in model.parameters())
    total = sum(math.prod(param_shape(p)) for p in model.parameters())
    return {"held": held, "total": total, "partitioned": any(is_zero3_param(p) for p in model.parameters())}


class StopAt(StepHook):
    """A step hook that asks one rank only to stop at a given (phase, step): the others must follow."""

    def __init__(self, recipe, stop_step: int, in_phase2: bool, rank: int):
        self.recipe, self.stop_step, self.in_phase2, self.rank = recipe, stop_step, in_phase2, rank

    def before_step(self, step: int) -> None:
        in_phase2 = self.recipe.selected is not None
        if step == self.stop_step and in_phase2 == self.in_phase2 and self.recipe.rank == self.rank:
            self.recipe.request_stop()


def run_interrupted(cfg: TrainConfig, examples: Examples, world_size: int, stops: list[tuple[int, bool]]) -> dict:
    """Run to completion through several stop-and-resume cycles (fresh model and engine each time, as a
    requeued job would); rank 0 returns the final diffs and where it stopped."""
    from ltsft_dist.recipe import LTSFTRecipe, Preempted

    cfg = copy.deepcopy(cfg)
    cfg.micro_batch_size = cfg.batch_size // world_size
    stopped_at = []
    for stop_step, in_phase2 in stops + [(None, False)]:
        recipe = LTSFTRecipe(tiny_model(cfg.kind), examples, cfg, ds_config_for(cfg, world_size),
                             show_progress=False)
        if stop_step is not None:
            recipe.step_hooks.append(StopAt(recipe, stop_step, in_phase2, rank=world_size - 1))
        try:
            sft = recipe.run()
        except Preempted as stop:
            stopped_at.append(stop.path.name)
            continue
        return ({"diffs": sft.diffs, "heads": sft.heads, "stopped_at": stopped_at, "stats": dict(recipe.stats.__dict__)}
                if sft is not None else None)


LANGUAGES = ("de", "en", "sw")  # the source languages of the multi-source swap scenarios


def language_sfts(density: float = 0.25, scale: float = 0.1, model=None) -> dict[str, SparseFineTuning]:
    """Random language SFTs of `model` (by default the tiny masked LM), with its fingerprint and parameter names.
    Overlaps on purpose: "en" reuses half of "de"'s positions, "sw" a quarter of each. The output embeddings are
    frozen in language SFTs; a masked LM's SFTs carry its decoder as a dense head (absent from the task model and
    ignored by the swap), as trained ones do."""
    model = model if model is not None else tiny_model("language")
    meta = dict(kind="language", base_model="tiny-lm", base_fingerprint=base_fingerprint(model), k=0,
                density=density, training_config={})
    output = next(n for n, p in model.named_parameters() if p is model.get_output_embeddings().weight)
    g = torch.Generator().manual_seed(7)
    picks: dict[str, dict[str, torch.Tensor]] = {lang: {} for lang in LANGUAGES}
    shapes = {}
    for name, p in model.named_parameters():
        if name == output:
            continue
        n = p.numel()
        shapes[name] = tuple(p.shape)
        de = torch.randperm(n, generator=g)[:max(1, int(density * n))]
        en = torch.cat([de[:len(de) // 2], torch.randperm(n, generator=g)[:len(de) // 2]])
        sw = torch.cat([de[:len(de) // 4], en[-len(en) // 4:], torch.randperm(n, generator=g)[:len(de) // 2]])
        for lang, idx in zip(LANGUAGES, (de, en, sw)):
            picks[lang][name] = torch.unique(idx)  # sorted, no duplicates
    from ltsft_dist.models import is_decoder

    head = {} if is_decoder(model.config.model_type) else {output: model.get_output_embeddings().weight.detach().clone()}
    out = {}
    for lang in LANGUAGES:
        diffs = {name: (idx, torch.randn(len(idx), generator=g) * scale) for name, idx in picks[lang].items()}
        out[lang] = SparseFineTuning(diffs, {n: shapes[n] for n in diffs}, head,
                                     SFTMetadata(languages=[lang], **meta))
    return out
