"""Language-SFT text: files and HF text columns, seeded held-out split, line-by-line and packed rows, and eval
masking that is identical every evaluation (so eval loss is comparable across checkpoints)."""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from ltsft_dist.data import train_wordpiece
from ltsft_dist.errors import LtsftError
from ltsft_dist.tasks import mlm
from ltsft_dist.token_cache import text_file

WORDS = "the river flows north through the old town and past the harbour into the cold sea".split()
LINES = [" ".join(WORDS[i % 7:i % 7 + 3 + i % 9]) + f" number {i}" for i in range(100)]


@pytest.fixture(scope="module")
def tok():
    return train_wordpiece(LINES, 120)


def test_text_file_lines(tmp_path):
    path = tmp_path / "sw.txt"
    path.write_text("\ufeff  first line \n\n second line\r\n   \n", encoding="utf-8")
    assert list(text_file(path)) == ["first line", "second line"]
    assert list(text_file(path)) == ["first line", "second line"]  # read again from the start, lazily
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(LtsftError, match="blank.txt: the file is empty"):
        text_file(tmp_path / "blank.txt")
    with pytest.raises(LtsftError, match="nope.txt: file not found"):
        text_file(tmp_path / "nope.txt")
    (tmp_path / "bad.txt").write_bytes(b"ok\nfine\n\xff broken\n")
    with pytest.raises(LtsftError, match=r"bad.txt:3: not valid UTF-8"):
        list(text_file(tmp_path / "bad.txt"))


def test_hf_text_column(monkeypatch):
    calls = []

    def fake_load(path, name, split):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"text": ["a b", "  ", None, "c d "], "id": [1, 2, 3, 4]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert list(mlm.load_hf_text("wikimedia/wikipedia", "20231101.sw")) == ["a b", "c d"]
    assert calls == [("wikimedia/wikipedia", "20231101.sw", "train")]
    with pytest.raises(LtsftError, match=r"no column 'content' \(has \['text', 'id'\]\)"):
        mlm.load_hf_text("wikimedia/wikipedia", "20231101.sw", column="content")


def test_held_out_split_is_seeded_disjoint_and_ordered():
    train, held = mlm.split_held_out(LINES, 0.05, seed=3)
    assert len(held) == 5 and len(train) == 95
    assert sorted(train + held) == sorted(LINES)
    assert held == [x for x in LINES if x in set(held)]  # file order kept
    assert mlm.split_held_out(LINES, 0.05, seed=3) == (train, held)
    assert mlm.split_held_out(LINES, 0.05, seed=4)[1] != held
    with pytest.raises(LtsftError, match="too few"):
        mlm.split_held_out(["only one"], 0.05)
    with pytest.raises(LtsftError, match="between 0 and 1"):
        mlm.split_held_out(LINES, 5)


def test_line_by_line_rows_count_truncation(tok):
    encoded = mlm.encode_text(tok, LINES, max_len=8)
    ids = encoded.examples.tensors["input_ids"]
    assert ids.shape == (100, 8)
    lengths = [len(tok(x, add_special_tokens=False)["input_ids"]) for x in LINES]
    assert encoded.truncated == sum(n > 6 for n in lengths) > 0
    assert (ids[:, 0] == tok.cls_token_id).all()
    assert encoded.examples.mlm.mask_token_id == tok.mask_token_id


def test_packed_blocks_keep_every_token_in_order(tok):
    lines = LINES[:20]
    encoded = mlm.encode_text(tok, lines, max_len=16, packed=True)
    ids, mask = encoded.examples.tensors["input_ids"], encoded.examples.tensors["attention_mask"]
    stream = [i for x in lines for i in tok(x, add_special_tokens=False)["input_ids"]]
    bodies = []
    for row, m in zip(ids.tolist(), mask.tolist()):
        used = row[:sum(m)]
        assert used[0] == tok.cls_token_id and used[-1] == tok.sep_token_id
        bodies += used[1:-1]
    assert bodies == stream
    assert len(ids) == -(-len(stream) // 14)  # ceil: only the last block is padded
    assert mask[:-1].all()


def test_eval_masking_is_fixed_and_well_formed(tok):
    examples = mlm.encode_text(tok, LINES, max_len=12).examples
    first, again = mlm.fixed_masks(examples, seed=1), mlm.fixed_masks(examples, seed=1)
    assert torch.equal(first.tensors["input_ids"], again.tensors["input_ids"])
    assert torch.equal(first.tensors["labels"], again.tensors["labels"])
    assert not torch.equal(first.tensors["labels"], mlm.fixed_masks(examples, seed=2).tensors["labels"])
    original, labels = examples.tensors["input_ids"], first.tensors["labels"]
    chosen = labels != -100
    assert chosen.any(1).all()  # every row scores at least one position
    assert torch.equal(labels[chosen], original[chosen])
    assert not torch.isin(original[chosen], torch.tensor(tok.all_special_ids)).any()
    masked = first.tensors["input_ids"] == tok.mask_token_id
    assert (masked <= chosen).all() and masked.sum() > 0.6 * chosen.sum()
    assert torch.equal(first.tensors["input_ids"][~chosen], original[~chosen])
    assert first.mlm is None  # the trainer must not mask again


def test_eval_loss_identical_across_evaluations(tok):
    data = mlm.build_mlm_data(tok, LINES, max_len=12, eval_fraction=0.2, seed=0)
    assert data.report["eval_lines"] == 20 and data.report["train_rows"] == 80
    assert data.train.mlm is not None and "labels" not in data.train.tensors
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=20, vocab_size=len(tok), max_position_embeddings=16)).eval()

    def evaluate():
        with torch.no_grad():
            return [model(**batch).loss.item() for batch in mlm.eval_batches(data.eval, batch_size=6)]

    losses = evaluate()
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))  # 6+6+6+2 rows
    assert evaluate() == losses
    rebuilt = mlm.build_mlm_data(tok, LINES, max_len=12, eval_fraction=0.2, seed=0)
    assert torch.equal(rebuilt.eval.tensors["labels"], data.eval.tensors["labels"])  # same for the next run too


# data.mlm_own_tokens: two languages in one vocabulary, disjoint words; a language SFT of one scores among its own.
OWN = ["alpha beta gamma delta", "beta gamma epsilon alpha", "delta alpha beta zeta"] * 8
FOREIGN = ["rouge vert bleu noir", "blanc rouge jaune vert"] * 8


def _two_language_model(tok):
    """A tiny tied BERT with the option's restriction on its output (what training installs)."""
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=32, max_position_embeddings=32))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return model.eval()  # no dropout: the hand computation repeats the forward


def test_own_tokens_loss_is_the_softmax_over_the_language_tokens_and_leaves_other_rows_untouched(tmp_path):
    from ltsft_dist.data import bert_mask

    tok = train_wordpiece(OWN + FOREIGN, 80)
    examples = mlm.encode_text(tok, OWN, 12, probability=0.6, own_tokens=True).examples  # many random replacements
    own = examples.mlm.own
    words = {i for line in OWN for i in tok(line)["input_ids"]} | {tok.mask_token_id, tok.pad_token_id}
    assert set(own.nonzero().flatten().tolist()) == words  # the rows' tokens ([CLS], [SEP], [PAD] too) and [MASK]
    foreign = sorted({i for line in FOREIGN for i in tok(line, add_special_tokens=False)["input_ids"]} - words)
    assert foreign and not own[foreign].any()
    (tmp_path / "own.txt").write_text("\n".join(OWN) + "\n")  # from the token cache (rows on disk), the same set
    cached = mlm.encode_text(tok, text_file(tmp_path / "own.txt"), 12, cache_dir=str(tmp_path / "cache"),
                             own_tokens=True).examples
    assert not isinstance(cached.tensors["input_ids"], torch.Tensor) and torch.equal(cached.mlm.own, own)

    inputs, labels = bert_mask(examples.tensors["input_ids"], examples.mlm, torch.Generator().manual_seed(0),
                               at_least_one=True)
    assert own[inputs].all()  # random replacements stayed inside the language (else became [MASK])
    examples.mlm.own = None  # the same draw without the option does leave it, so the check above can fail
    plain, _ = bert_mask(examples.tensors["input_ids"], examples.mlm, torch.Generator().manual_seed(0),
                         at_least_one=True)
    assert not own[plain].all()

    model = _two_language_model(tok)
    full = _two_language_model(tok)
    mlm.MaskedLM().score_among_own_tokens(model, own)
    batch = {"input_ids": inputs, "attention_mask": examples.tensors["attention_mask"], "labels": labels}
    loss = model(**batch).loss
    hidden = model.cls.predictions.transform(model.bert(inputs, attention_mask=batch["attention_mask"])[0])
    decoder = model.get_output_embeddings()
    logits = hidden @ decoder.weight.T + decoder.bias  # by hand, the whole vocabulary's logits
    ids = own.nonzero().flatten()
    at = labels != -100
    target = (labels[at][:, None] == ids[None]).float().argmax(1)  # each label's place among the own tokens
    by_hand = torch.nn.functional.cross_entropy(logits[at][:, ids], target)
    assert torch.allclose(loss, by_hand, atol=1e-6)
    assert not torch.allclose(full(**batch).loss, by_hand, atol=1e-3)  # the whole vocabulary's loss differs

    loss.backward()
    grad = model.get_input_embeddings().weight.grad  # tied: the input and the output side of each row
    assert torch.equal(grad[~own], torch.zeros_like(grad[~own]))
    assert grad[own].abs().sum(1).gt(0).sum() > len(words) // 2
    full(**batch).loss.backward()  # the full softmax pushes every other row
    assert full.get_input_embeddings().weight.grad[foreign].abs().sum(1).gt(0).all()
    # Logits on another device (a ZeRO-3 model whose buffers DeepSpeed did not move): the set follows them once.
    on_meta = mlm._among_own_tokens(decoder, (), torch.zeros(2, len(tok), device="meta"))
    assert on_meta.device.type == "meta" and decoder.own_tokens.device.type == "meta"


def test_own_tokens_in_training_data_cover_the_held_out_text_and_are_validated(tmp_path):
    from ltsft_dist.config import DataConfig, ModelConfig, SourceConfig, TrainConfig
    from ltsft_dist.training_data import encode_sources, read_sources

    tok = train_wordpiece(OWN + FOREIGN, 80)
    (tmp_path / "own.txt").write_text("\n".join(OWN + ["omega alpha beta"]) + "\n")
    config = TrainConfig(kind="language", density=0.1, languages=["aa"], output_dir=str(tmp_path / "run"),
                         model=ModelConfig(tiny={"hidden_size": 16}),
                         data=DataConfig(train_file=str(tmp_path / "own.txt"), eval_fraction=0.3, max_seq_length=12,
                                         mlm_own_tokens=True))
    config.validate()
    data = encode_sources(config.complete(), tok, read_sources(config.complete()))
    train, held = data.train["aa"], data.held_out["aa"]
    ids = [train.tensors["input_ids"][:], held.tensors["input_ids"], held.tensors["labels"].clamp(min=0)]
    assert set(train.mlm.own.nonzero().flatten().tolist()) == {i for t in ids for i in t.flatten().tolist()}
    assert held.tensors["labels"].ne(-100).any()

    with pytest.raises(LtsftError, match="data.mlm_own_tokens: task classification does not score masked tokens"):
        TrainConfig(kind="task", density=0.1, model=ModelConfig(tiny={}),
                    data=DataConfig(train_file="x.jsonl", mlm_own_tokens=True)).validate()
    two = [SourceConfig(language="aa", train_file="a.txt"), SourceConfig(language="bb", train_file="b.txt")]
    with pytest.raises(LtsftError, match="data.mlm_own_tokens: .*give one source"):
        TrainConfig(kind="language", density=0.1, model=ModelConfig(tiny={}),
                    data=DataConfig(sources=two, mlm_own_tokens=True)).validate()
