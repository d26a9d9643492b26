"""The token cache of language-SFT text: built once per (text, tokenizer, max_len, packing, split) and reused,
every token accounted for, rows read lazily and only by the rank that trains on them, masks drawn per batch the same
at every world size, the held-out set bounded, and concurrent builders ending with one valid cache."""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pytest
import torch

from ltsft_dist import token_cache
from ltsft_dist.config import DataConfig, ModelConfig, TrainConfig
from ltsft_dist.data import Examples, MLMSpec, StepOrder, train_wordpiece
from ltsft_dist.errors import LtsftError
from ltsft_dist.tasks import Encoding, get_task
from ltsft_dist.token_cache import Column, Layout, cached_rows, text_file
from ltsft_dist.training_data import encode_sources, read_sources

WORDS = "the river flows north through the old town and past the harbour into the cold sea".split()
LINES = [" ".join(WORDS[i % 7:i % 7 + 3 + i % 11]) + f" number {i}" for i in range(400)]


@pytest.fixture(scope="module")
def tok():
    return train_wordpiece(LINES, 150)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("\n".join(LINES) + "\n\n", encoding="utf-8")
    return path


def stream_of(tok, lines, separator=None):
    end = [] if separator is None else [separator]
    return [i for ids in tok(list(lines), add_special_tokens=False)["input_ids"] if ids for i in ids + end]


def bodies(rows, prefix=1, suffix=1):
    """The text tokens of rows (their special frame and padding removed), in row order."""
    return [i for ids, n in zip(np.asarray(rows.ids).tolist(), rows.lengths.tolist()) for i in ids[prefix:n - suffix]]


def count_tokenize(monkeypatch) -> list:
    calls = []
    real = token_cache.tokenize
    monkeypatch.setattr(token_cache, "tokenize", lambda tok, lines: calls.append(len(lines)) or real(tok, lines))
    return calls


def test_every_token_is_accounted_for_in_both_parts(tok, corpus, tmp_path):
    train, held = text_file(corpus).split(0.1, seed=3)
    layout = Layout(16, packed=True)
    rows = {part: cached_rows(source, tok, layout, tmp_path / "cache") for part, source in (("train", train),
                                                                                              ("held", held))}
    assert isinstance(rows["train"].ids, np.memmap) and rows["train"].ids.dtype == np.uint16
    assert 0 < len(list(held)) < len(LINES) // 5 and len(list(train)) + len(list(held)) == len(LINES)
    assert not set(held) & set(train)
    for part, source in (("train", train), ("held", held)):
        r = rows[part]
        stream = stream_of(tok, source)
        assert bodies(r) == stream  # every token, in order, once
        assert r.count.tokens == r.count.used == len(stream) and r.count.dropped == r.count.repeated == 0
        assert (r.lengths[:-1] == 16).all() and 2 < r.lengths[-1] <= 16  # only the last row is padded
        assert r.count.rows == len(r) == -(-len(stream) // 14)
    total = len(stream_of(tok, LINES))
    assert rows["train"].count.tokens + rows["held"].count.tokens == total


def test_line_by_line_counts_what_truncation_drops(tok, corpus, tmp_path):
    rows = cached_rows(text_file(corpus), tok, Layout(8, packed=False), tmp_path / "cache")
    lengths = [len(t) for t in tok(LINES, add_special_tokens=False)["input_ids"]]
    assert len(rows) == len(LINES) and rows.count.truncated == sum(n > 6 for n in lengths) > 0
    assert rows.count.dropped == sum(max(0, n - 6) for n in lengths)
    assert rows.count.used + rows.count.dropped == rows.count.tokens == sum(lengths)


def test_causal_layout_overlaps_the_last_block_so_every_token_is_used(tmp_path, corpus):
    from ltsft_dist.models import tiny_tokenizer

    dec = tiny_tokenizer(ModelConfig(tiny={"vocab_size": 150}, architecture="llama"), LINES)
    rows = cached_rows(text_file(corpus), dec, Layout(16, True, dec.eos_token_id, "overlap"), tmp_path / "c")
    stream = stream_of(dec, LINES, dec.eos_token_id)
    assert (rows.lengths == 16).all() and (np.asarray(rows.ids)[:, 0] == dec.bos_token_id).all()
    assert bodies(rows, 1, 0)[:15 * (len(rows) - 1)] == stream[:15 * (len(rows) - 1)]
    assert np.asarray(rows.ids)[-1, 1:].tolist() == stream[-15:]
    assert rows.count.used == rows.count.tokens == len(stream) and rows.count.dropped == 0
    assert rows.count.repeated == 15 * len(rows) - len(stream)


def test_second_build_reuses_the_cache_and_any_changed_input_makes_a_new_one(tok, corpus, tmp_path, monkeypatch):
    calls = count_tokenize(monkeypatch)
    cache = tmp_path / "cache"
    source = text_file(corpus)
    first = cached_rows(source, tok, Layout(16), cache)
    assert sum(calls) == len(LINES) and len(list(cache.iterdir())) == 1
    again = cached_rows(text_file(corpus), tok, Layout(16), cache)  # a new reader of the same file
    assert sum(calls) == len(LINES)  # not tokenised again
    assert np.array_equal(first.ids, again.ids) and len(list(cache.iterdir())) == 1

    other_tok = train_wordpiece(LINES[:50], 150)
    cached_rows(source, other_tok, Layout(16), cache)
    cached_rows(source, tok, Layout(24), cache)
    cached_rows(source, tok, Layout(16, packed=False), cache)
    cached_rows(source.split(0.1, 0)[0], tok, Layout(16), cache)
    assert sum(calls) == 5 * len(LINES) and len(list(cache.iterdir())) == 5
    corpus.write_text("\n".join(LINES[:300]) + "\n", encoding="utf-8")  # the file changed
    changed = cached_rows(text_file(corpus), tok, Layout(16), cache)
    assert sum(calls) == 5 * len(LINES) + 300 and len(list(cache.iterdir())) == 6
    assert changed.count.lines == 300
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]


def test_a_builder_that_loses_the_race_keeps_the_finished_cache(tok, corpus, tmp_path):
    source, layout = text_file(corpus), Layout(16)
    directory = tmp_path / "cache" / token_cache.cache_key(source, tok, layout)
    token_cache.build(source, tok, layout, directory)
    before = (directory / "train.ids").stat().st_mtime_ns
    token_cache.build(source, tok, layout, directory)  # finds the directory taken when it renames: drops its own
    assert (directory / "train.ids").stat().st_mtime_ns == before
    assert os.listdir(tmp_path / "cache") == [directory.name]


def _build_in_process(tokenizer_dir, corpus, directory, barrier) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    barrier.wait()
    token_cache.build(text_file(corpus), tok, Layout(16), directory)


@pytest.mark.slow
def test_two_processes_building_at_once_leave_one_valid_cache(tok, corpus, tmp_path):
    tok.save_pretrained(str(tmp_path / "tok"))
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    directory = tmp_path / "cache" / token_cache.cache_key(text_file(corpus), loaded, Layout(16))
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_build_in_process, args=(str(tmp_path / "tok"), corpus, directory, barrier))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert os.listdir(tmp_path / "cache") == [directory.name]  # one cache, no temp directory left
    rows = token_cache.open_rows(directory, "train")
    assert bodies(rows) == stream_of(loaded, LINES)


def examples_of(rows, tok) -> Examples:
    spec = MLMSpec(tok.mask_token_id, tuple(tok.all_special_ids), len(tok))
    return Examples(token_cache.columns(rows, dense=False), mlm=spec)


def test_ranks_read_disjoint_rows_that_cover_every_block(tok, corpus, tmp_path):
    rows = cached_rows(text_file(corpus), tok, Layout(16), tmp_path / "cache")
    n = len(rows) // 8 * 8
    rows = token_cache.Rows(rows.ids[:n], rows.lengths[:n], rows.count)  # whole batches: an epoch is every row
    read = {0: [], 1: []}
    for rank in (0, 1):
        examples = examples_of(rows, tok)
        for column in examples.tensors.values():
            make = column.make
            column.make = lambda ids, lengths, make=make, rank=rank: read[rank].append(ids.copy()) or make(ids,
                                                                                                          lengths)
        order = StepOrder(examples, 8, 2, rank, 2, seed=5)
        picked = torch.cat([order.indices(s, m) for s in range(order.steps_per_epoch) for m in range(2)])
        for s in range(order.steps_per_epoch):
            batch = order.batch_at(s, 0)
            assert torch.equal(batch["attention_mask"].sum(1), torch.from_numpy(rows.lengths[order.indices(s, 0)]
                                                                                  .astype(np.int64)))
        read[rank] = (picked, np.concatenate(read[rank]))
    (p0, got0), (p1, got1) = read[0], read[1]
    assert not set(p0.tolist()) & set(p1.tolist())
    assert sorted(p0.tolist() + p1.tolist()) == list(range(n))
    assert len(got0) == len(got1) == n // 2  # micro-batch 0 (2 rows) of each step, for two columns: no other rows
    assert set(map(bytes, got0)) <= set(map(bytes, np.asarray(rows.ids)[p0.numpy()]))


def test_masks_are_drawn_per_batch_and_equal_at_every_world_size(tok, corpus, tmp_path):
    rows = cached_rows(text_file(corpus), tok, Layout(16), tmp_path / "cache")
    examples = examples_of(rows, tok)
    for step in (0, 3, 40):
        single = StepOrder(examples, 8, 8, 0, 1, seed=7).batch_at(step, 0)
        ranks = [StepOrder(examples, 8, 2, r, 2, seed=7) for r in (0, 1)]
        parts = [ranks[r].batch_at(step, m) for m in range(2) for r in (0, 1)]  # global-batch layout order
        for name in ("input_ids", "labels", "attention_mask"):
            assert torch.equal(single[name], torch.cat([p[name] for p in parts])), (step, name)
        assert (single["labels"] != -100).any() and (single["input_ids"] == tok.mask_token_id).any()
    a, b = StepOrder(examples, 8, 8, 0, 1, 7), StepOrder(examples, 8, 8, 0, 1, 8)
    assert not torch.equal(a.batch_at(1, 0)["labels"], b.batch_at(1, 0)["labels"])  # the seed matters


def language_config(corpus, tmp_path, **data) -> TrainConfig:
    data = {"eval_fraction": 0.2, **data}
    config = TrainConfig(kind="language", task="mlm", output_dir=str(tmp_path / "run"),
                         model=ModelConfig(tiny={"vocab_size": 150}), density=0.1,
                         data=DataConfig(train_file=str(corpus), max_seq_length=16, **data))
    config.validate()
    return config


def test_eval_max_examples_bounds_the_held_out_set_with_a_seeded_choice(tok, corpus, tmp_path):
    config = language_config(corpus, tmp_path, eval_max_examples=5)
    data = encode_sources(config, tok, read_sources(config))
    held, report = data.held_out[""], data.report[""]
    assert len(held) == 5 and report["held_out_rows"] > 5 and "labels" in held.tensors
    assert isinstance(data.train[""].tensors["input_ids"], Column)  # training rows stay on disk
    assert (tmp_path / "token_cache").is_dir()  # beside output_dir
    assert torch.equal(encode_sources(config, tok, read_sources(config)).held_out[""].tensors["labels"],
                       held.tensors["labels"])
    everything = encode_sources(language_config(corpus, tmp_path, eval_max_examples=0), tok, read_sources(config))
    assert len(everything.held_out[""]) == report["held_out_rows"]
    ids = everything.held_out[""].tensors["attention_mask"]
    assert any(torch.equal(held.tensors["attention_mask"][0], row) for row in ids)
    assert report["tokens_used"] + report["held_out_tokens_used"] == len(stream_of(tok, LINES))
    with pytest.raises(LtsftError, match=r"data.eval_max_examples: must be a whole number ≥ 0"):
        language_config(corpus, tmp_path, eval_max_examples=-1)
    corpus.write_text("\n".join(LINES[:3]) + "\n", encoding="utf-8")
    few = language_config(corpus, tmp_path, eval_fraction=0.01)
    with pytest.raises(LtsftError, match=r"text.txt: no held-out rows at data.eval_fraction=0.01; add text or raise"):
        encode_sources(few, tok, read_sources(few))


def test_clm_encodes_from_the_cache(tmp_path, corpus):
    from ltsft_dist.models import tiny_tokenizer

    dec = tiny_tokenizer(ModelConfig(tiny={"vocab_size": 150}, architecture="llama"), LINES)
    source = token_cache.replace(text_file(corpus), cache_dir=str(tmp_path / "c"))
    encoded = get_task("clm").encode(dec, source, Encoding(max_seq_length=16))
    in_memory = get_task("clm").encode(dec, LINES, Encoding(max_seq_length=16))
    assert isinstance(encoded.examples.tensors["labels"], Column)
    idx = torch.tensor([0, 5, len(in_memory.examples) - 1])
    for name, t in in_memory.examples.tensors.items():
        assert torch.equal(encoded.examples.tensors[name][idx], t[idx]), name
    assert encoded.report == in_memory.report and encoded.report["tokens_dropped"] == 0


def _rank_reads_the_cache(tokenizer_dir: str, corpus: str, cache: str) -> dict:
    from transformers import AutoTokenizer

    from ltsft_dist import comm

    calls = []
    real = token_cache.tokenize
    token_cache.tokenize = lambda tok, lines: calls.append(len(lines)) or real(tok, lines)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    train, held = text_file(corpus).split(0.1, seed=1)
    rows = cached_rows(train, tok, Layout(16), cache)
    order = StepOrder(examples_of(rows, tok), 8, 4, comm.rank(), comm.world_size(), seed=0)
    picked = torch.cat([order.indices(s, 0) for s in range(order.steps_per_epoch)])
    return {"tokenised_lines": sum(calls), "rows": len(rows), "mapped": isinstance(rows.ids, np.memmap),
            "picked": picked.tolist(), "held_rows": len(cached_rows(held, tok, Layout(16), cache))}


@pytest.mark.slow
@pytest.mark.multirank
def test_rank_zero_builds_the_cache_and_the_other_rank_maps_it(tok, corpus, tmp_path):
    from distributed import _run_ranks

    tok.save_pretrained(str(tmp_path / "tok"))
    ranks = _run_ranks(_rank_reads_the_cache, 2, str(tmp_path / "tok"), str(corpus), str(tmp_path / "cache"),
                       timeout=300)
    assert [r["tokenised_lines"] for r in ranks] == [len(LINES), 0]  # once, on rank 0, for both parts
    assert ranks[0]["rows"] == ranks[1]["rows"] > 0 and all(r["mapped"] for r in ranks)
    assert ranks[0]["held_rows"] == ranks[1]["held_rows"] > 0
    assert not set(ranks[0]["picked"]) & set(ranks[1]["picked"])
    assert len(list((tmp_path / "cache").iterdir())) == 1
