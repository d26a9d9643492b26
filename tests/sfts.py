"""Small SFTs and models for the SFT-artifact tests (test_sft, test_composable_format, test_artifact_cli, ...)."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

from ltsft_dist.sft import SFTMetadata, SparseFineTuning


def tiny_config(**overrides) -> BertConfig:
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=100)
    return BertConfig(**{**sizes, "max_position_embeddings": 64, **overrides})


def tiny_mlm(seed=0, **overrides) -> BertForMaskedLM:
    torch.manual_seed(seed)
    return BertForMaskedLM(tiny_config(**overrides))


def tiny_classifier(seed=0, **overrides) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_config(num_labels=3, **overrides))


def metadata(kind="language", languages=("de",), **overrides) -> SFTMetadata:
    fields = dict(
        kind=kind,
        languages=list(languages),
        base_model="tiny-bert",
        base_fingerprint="",
        k=0,
        density=0.1,
        training_config={"lr": 5e-5},
    )
    return SFTMetadata(**{**fields, **overrides})


def random_sft(model, density=0.1, seed=0, head_prefix=None, kind="language", **meta) -> SparseFineTuning:
    """Random positions in every body parameter; dense heads for the parameters under head_prefix."""
    g = torch.Generator().manual_seed(seed)
    diffs, shapes, heads = {}, {}, {}
    for name, param in model.named_parameters():
        if name.startswith(model.base_model_prefix + "."):
            n = max(1, int(param.numel() * density))
            indices = torch.randperm(param.numel(), generator=g)[:n].sort().values
            diffs[name] = (indices, torch.randn(n, generator=g) * 0.01)
            shapes[name] = tuple(param.shape)
        elif head_prefix and name.startswith(head_prefix):
            heads[name] = torch.randn(param.shape, generator=g)
    k = sum(len(i) for i, _ in diffs.values())
    return SparseFineTuning(diffs, shapes, heads, metadata(kind=kind, k=k, **meta))


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view, so that comparisons are bit-exact (-0.0 vs 0.0, NaN payloads)."""
    return t.detach().contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_bit_identical(model, before: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(bits(p), bits(before[name])), name


def assert_same_sft(a: SparseFineTuning, b: SparseFineTuning) -> None:
    assert a.shapes == b.shapes
    assert list(a.diffs) == list(b.diffs)
    for name in a.diffs:
        assert a.diffs[name][0].dtype == b.diffs[name][0].dtype == torch.int64
        assert torch.equal(a.diffs[name][0], b.diffs[name][0]), name
        assert torch.equal(bits(a.diffs[name][1]), bits(b.diffs[name][1])), name
    assert list(a.heads) == list(b.heads)
    for name in a.heads:
        assert a.heads[name].dtype == b.heads[name].dtype
        assert torch.equal(bits(a.heads[name]), bits(b.heads[name])), name


def small_sft(diffs: dict, shapes: dict | None = None, heads=None, **meta) -> SparseFineTuning:
    """diffs: name -> (index list, value list), all parameters of shape (4, 5) unless given."""
    tensors = {n: (torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(v)) for n, (i, v) in diffs.items()}
    shapes = shapes or {n: (4, 5) for n in diffs}
    return SparseFineTuning(tensors, shapes, heads or {}, metadata(**meta))
