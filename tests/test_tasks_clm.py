"""`task: clm`, language SFTs of decoders: the offline decoder tokenizer, packed full blocks with a document
boundary per line, the held-out loss as the mean token loss (its exp the perplexity), the method's eligibility
defaults for Llama-style names, config errors for a decoder with an encoder task (and the reverse), and per
architecture: a tiny model builds, trains, and its SFT saved and loaded reproduces the trained logits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from oracle import oracle_ltsft
from scenarios import TINY_LLAMA, clm_config
from test_train_tasks import held_out_loss_of, train, write_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from ltsft_dist import eligibility as elig
from ltsft_dist.config import ModelConfig, PhaseConfig, load_config
from ltsft_dist.demo_text import sentences
from ltsft_dist.errors import LtsftError
from ltsft_dist.heldout import HeldOut
from ltsft_dist.models import DECODERS, build_model, save_tiny_base, tiny_tokenizer
from ltsft_dist.naming import body_prefix, module_type_and_layer
from ltsft_dist.sft import SFTMetadata, SparseFineTuning, base_fingerprint
from ltsft_dist.tasks import Encoding, get_task

LINES = sentences("en", 60, seed=1)
SIZES = dict(vocab_size=300, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             intermediate_size=24, max_position_embeddings=64)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(ModelConfig(tiny=SIZES, architecture="llama"), LINES)


def test_decoder_tokenizer_is_built_offline_with_bos_eos_and_pad(tok):
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    ids = tok("the river")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids  # <s> text: a prompt the model continues
    assert tok.decode(ids, skip_special_tokens=True) == "the river"
    again = tiny_tokenizer(ModelConfig(tiny=SIZES, architecture="llama"), LINES)
    assert again.get_vocab() == tok.get_vocab()  # the same text gives the same ids in every process
    encoder = tiny_tokenizer(ModelConfig(tiny=SIZES, architecture="bert"), LINES)
    assert encoder.mask_token == "[MASK]" and encoder.eos_token is None


def test_encode_packs_full_blocks_with_a_document_boundary_after_every_line(tok):
    encoded = get_task("clm").encode(tok, LINES, Encoding(max_seq_length=16))
    ids, labels = encoded.examples.tensors["input_ids"], encoded.examples.tensors["labels"]
    assert ids.shape == (encoded.rows, 16) and bool(encoded.examples.tensors["attention_mask"].all())
    assert bool((ids[:, 0] == tok.bos_token_id).all())  # every block starts as the tokenizer starts a text
    assert bool((labels[:, 0] == -100).all()) and torch.equal(labels[:, 1:], ids[:, 1:])
    stream = [i for line in tok(LINES, add_special_tokens=False)["input_ids"] for i in line + [tok.eos_token_id]]
    body = ids[:-1, 1:].reshape(-1).tolist()  # the blocks, their <s> removed, are the stream in order...
    assert body == stream[:len(body)]
    partial = len(stream) - len(body)
    assert 0 < partial < 15  # ...and the last block completes the partial rest with the tokens before it
    assert ids[-1, 1:].tolist() == stream[-15:]
    assert encoded.report["tokens"] == encoded.report["tokens_used"] == len(stream)
    assert encoded.report["tokens_dropped"] == 0 and encoded.report["tokens_repeated"] == 15 - partial
    assert stream.count(tok.eos_token_id) == len(LINES)


def test_encode_errors_name_the_fix(tok):
    with pytest.raises(LtsftError, match=r"fewer than one block of data.max_seq_length=64; add text, lower"):
        get_task("clm").encode(tok, LINES[:2], Encoding(max_seq_length=64))
    encoder = tiny_tokenizer(ModelConfig(tiny=SIZES, architecture="bert"), LINES)
    with pytest.raises(LtsftError, match="no end-of-sequence token"):
        get_task("clm").encode(encoder, LINES, Encoding(max_seq_length=16))


def test_held_out_loss_is_the_mean_token_loss_whatever_the_batching(tok):
    """HeldOut weights each batch by its labelled tokens; with the first position unlabelled that is exactly the
    number of predicted tokens, so the held-out loss is the mean over all predicted tokens (exp: perplexity)."""
    model = build_model(ModelConfig(tiny=SIZES, architecture="llama"), "clm", vocab_size=len(tok), seed=1).eval()
    examples = get_task("clm").encode(tok, LINES, Encoding(max_seq_length=16)).examples
    assert len(examples) % 5  # an uneven last batch
    with torch.no_grad():
        logits = model(input_ids=examples.tensors["input_ids"]).logits
        by_hand = F.cross_entropy(logits[:, :-1].flatten(0, 1), examples.tensors["input_ids"][:, 1:].flatten())
    for micro in (1, 5, len(examples)):
        assert HeldOut({"en": examples}, micro, 0, 1).loss(model)["all"] == pytest.approx(float(by_hand), rel=1e-6)
    assert get_task("clm").held_out_scores(2.0) == {"perplexity": pytest.approx(math.exp(2.0))}


@pytest.mark.parametrize("architecture", DECODERS)
def test_eligibility_defaults_follow_the_method_for_decoders(architecture):
    model = build_model(ModelConfig(tiny=SIZES, architecture=architecture), "clm", seed=0)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight  # untied (Gemma ties)
    assert model.config.tie_word_embeddings is False
    roles = elig.resolve(model, "language")
    frozen = roles.names("frozen")
    assert frozen == [n for n, _ in model.named_parameters() if "norm" in n or n == "lm_head.weight"]
    assert "lm_head.weight" in frozen and "model.norm.weight" in frozen
    assert "model.embed_tokens.weight" in roles.names("sparse") and roles.names("head") == []
    table = roles.table(model)
    assert [line.split() for line in table.splitlines() if line.startswith("lm_head")] == [["lm_head", "0", "0",
                                                                                        str(SIZES["vocab_size"] * 16)]]


def test_llama_names_map_to_module_types_and_layers():
    model = build_model(ModelConfig(tiny=SIZES, architecture="llama"), "clm", seed=0)
    assert body_prefix(model) == "model."  # lm_head is outside the body
    assert module_type_and_layer("model.layers.1.self_attn.q_proj.weight") == ("self_attn.q_proj", 1)
    assert module_type_and_layer("model.layers.0.mlp.down_proj.weight") == ("mlp.down_proj", 0)
    assert module_type_and_layer("model.layers.0.input_layernorm.weight") == ("input_layernorm", 0)
    assert module_type_and_layer("model.norm.weight") == ("model.norm", None)


def _config(tmp_path: Path, **changes) -> Path:
    config = {"kind": "language", "task": "clm", "languages": ["en"], "density": 0.1,
              "model": {"architecture": "llama", "tiny": {"vocab_size": 100}}, "data": {"train_file": "en.txt"}}
    for key, value in changes.items():
        section, _, leaf = key.rpartition(".")
        (config[section] if section else config)[leaf] = value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"task": "mlm"}, r"model.architecture: 'llama' is a decoder, and task mlm trains encoder models only: set "
                      r"task: clm to train this architecture, or set model.architecture to one of bert, xlm-roberta"),
    ({"kind": "task", "task": "qa", "model.architecture": "qwen2"},
     r"model.architecture: 'qwen2' is a decoder, and task qa trains encoder models only: set task: instruct to train "
     r"this architecture, or set model.architecture to one of bert, xlm-roberta"),
    ({"model.architecture": "bert"}, r"model.architecture: 'bert' is an encoder, and task clm trains decoder "
                                     r"models only: set task: mlm to train this architecture, or set "
                                     r"model.architecture to one of llama, qwen2, mistral, gemma"),
    ({"model.architecture": "llama2"}, r"model.architecture: 'llama2' is not one of bert, xlm-roberta, llama"),
])
def test_decoder_and_encoder_mismatches_fail_at_config_load(tmp_path, changes, message):
    with pytest.raises(LtsftError, match=rf"run.yaml: {message}"):
        load_config(_config(tmp_path, **changes))


def test_a_decoder_language_sft_config_loads(tmp_path):
    config = load_config(_config(tmp_path, **{"model.architecture": "gemma"}))
    assert config.task == "clm" and config.model.architecture == "gemma"
    path = _config(tmp_path, **{"model.architecture": "mistral"})
    config = yaml.safe_load(path.read_text())
    del config["task"]  # a language SFT of a tiny decoder trains clm by default, of an encoder mlm
    path.write_text(yaml.safe_dump(config))
    assert load_config(path).task == "clm"
    config["model"]["architecture"] = "xlm-roberta"
    path.write_text(yaml.safe_dump(config))
    assert load_config(path).task == "mlm"


@pytest.mark.parametrize("architecture", DECODERS)
def test_each_decoder_trains_and_its_sft_reproduces_the_trained_logits(architecture, tok, tmp_path):
    """A few steps of both phases (the single-process Algorithm 1), then the SFT saved, loaded and applied to a
    fresh base: the trained model's logits; reverted: the base's logits, bit for bit."""
    model = ModelConfig(tiny=dict(SIZES, vocab_size=len(tok)), architecture=architecture)
    cfg = clm_config("zero0.json", model=model, density=0.2, batch_size=8, phase1=PhaseConfig(steps=3, lr=1e-2),
                     phase2=PhaseConfig(steps=3, lr=1e-2))
    examples = get_task("clm").encode(tok, LINES, Encoding(max_seq_length=16)).examples
    trained = build_model(cfg.model, "clm", seed=0)
    base = build_model(cfg.model, "clm", seed=0).eval()
    mask, phi, heads = oracle_ltsft(trained, examples, cfg)
    assert heads == {}
    sft_k = sum(int(m.sum()) for m in mask.values())
    diffs = {n: (torch.nonzero(m.reshape(-1)).view(-1), phi[n].reshape(-1)[m.reshape(-1)]) for n, m in mask.items()
             if m.any()}
    sft = SparseFineTuning(diffs, {n: tuple(p.shape) for n, p in base.named_parameters() if n in diffs}, {},
                           SFTMetadata(kind="language", languages=["en"], base_model=f"tiny-{architecture}",
                                       base_fingerprint=base_fingerprint(base), k=sft_k, density=0.2,
                                       training_config={}))
    assert sft_k == cfg.k_for(elig.resolve(base, "language").count(base, "sparse"))
    sft.save_pretrained(tmp_path / "sft")
    loaded = SparseFineTuning.from_pretrained(tmp_path / "sft")
    ids = examples.tensors["input_ids"][:4]
    with torch.no_grad():
        before = base(input_ids=ids).logits
        loaded.apply(base)
        after = base(input_ids=ids).logits
        expected = trained.eval()(input_ids=ids).logits
        loaded.revert(base)
        reverted = base(input_ids=ids).logits
    assert not torch.equal(after, before)  # the SFT changes the model
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)  # θ⁰ + φ: the trained model
    assert torch.equal(reverted, before)
    assert all(torch.equal(p, q) for p, q in zip(base.parameters(), build_model(cfg.model, "clm", seed=0).parameters()))


@pytest.mark.parametrize("architecture", ["llama", "gemma"])
def test_save_tiny_base_writes_a_causal_lm_with_its_tokenizer(architecture, tmp_path):
    save_tiny_base(tmp_path / "base", ModelConfig(tiny=SIZES, architecture=architecture), LINES, seed=2)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "base")
    assert model.config.model_type == architecture and tokenizer.pad_token == "<pad>"
    assert tokenizer(LINES)["input_ids"] == tiny_tokenizer(ModelConfig(tiny=SIZES, architecture=architecture),
                                                           LINES)(LINES)["input_ids"]
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    with torch.no_grad():
        assert torch.equal(model(input_ids=torch.tensor([[2, 5, 6]])).logits,
                           build_model(ModelConfig(tiny=SIZES, architecture=architecture), "clm",
                                       vocab_size=len(tokenizer), seed=2)(input_ids=torch.tensor([[2, 5, 6]])).logits)


def test_save_tiny_base_refuses_a_tokenizer_transformers_would_reload_differently(tmp_path):
    """transformers maps a qwen2 directory's tokenizer to its own Qwen2Tokenizer, which rebuilds a BPE from the
    vocabulary: the WordPiece tokenizer would come back tokenizing differently, so no such base is written."""
    with pytest.raises(LtsftError, match="tiny qwen2 base as Qwen2Tokenizer, which tokenizes differently; build"):
        save_tiny_base(tmp_path / "base", ModelConfig(tiny=SIZES, architecture="qwen2"), LINES, seed=2)
    assert not (tmp_path / "base").exists()


@pytest.mark.slow
@pytest.mark.multirank
def test_ltsft_train_clm_on_two_ranks_keeps_the_best_phi_by_held_out_perplexity(tmp_path):
    """`ltsft train` of a tiny Llama on text at W=2 ZeRO-3: the decoder tokenizer, full blocks, the held-out loss
    and its perplexity, the best φ by it; θ⁰ + the saved φ gives that held-out loss again."""
    text = tmp_path / "en.txt"
    text.write_text("\n".join(sentences("en", 400, seed=2)) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    path = write_config(tmp_path, {
        "kind": "language", "task": "clm", "languages": ["en"], "output_dir": str(out), "density": 0.05,
        "model": {"architecture": "llama", "tiny": {**TINY_LLAMA, "vocab_size": 200, "max_position_embeddings": 32}},
        "data": {"train_file": str(text), "max_seq_length": 32, "eval_fraction": 0.1, "eval_every": 2},
        "phase1": {"steps": 4, "lr": 3e-3}, "phase2": {"steps": 6, "lr": 3e-3}, "batch_size": 8,
        "micro_batch_size": 4, "deepspeed": "zero3.json", "log_every": 2})
    result = train(path, ranks=2)
    table = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()
             if line.startswith(("model.embed_tokens ", "lm_head ", "model.norm "))}  # the eligibility table
    assert table == {"model.embed_tokens": ["4000", "0", "0"], "lm_head": ["0", "0", "4000"],
                     "model.norm": ["0", "0", "20"]}  # real sizes, although ZeRO-3 has partitioned the model
    results = json.loads((out / "results.json").read_text())
    assert results["frozen_drift"] == 0
    data = results["data"]["en"]  # the token accounting, also on stderr
    assert data["tokens"] == data["tokens_used"] > 0 and data["held_out_tokens"] == data["held_out_tokens_used"] > 0
    assert f"data [en]: {data['tokens'] + data['held_out_tokens']} tokens, " in result.stderr
    assert len(list((tmp_path / "token_cache").iterdir())) == 1  # rank 0 built it once; both parts in it
    evals = results["eval_losses"]["phase2"]
    assert [e["step"] for e in evals] == [2, 4, 6]
    assert all(e["perplexity"] == pytest.approx(math.exp(e["all"])) and e["perplexity_en"] == e["perplexity"]
               for e in evals)
    best = min(evals, key=lambda e: e["all"])
    assert results["best_eval"] == {"step": best["step"], "loss": best["all"]}
    sft = SparseFineTuning.from_pretrained(out / "sft")
    assert sft.metadata.kind == "language" and sft.heads == {} and 0 < sft.nnz <= results["k"]
    assert not any("norm" in n or n == "lm_head.weight" for n in sft.diffs)
    assert held_out_loss_of(path, out / "sft", out / "tokenizer") == pytest.approx(best["all"], rel=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert tokenizer.pad_token == "<pad>" and tokenizer.eos_token == "</s>"


def test_the_demo_clm_config_loads(tmp_path):
    text = tmp_path / "en.txt"
    text.write_text("\n".join(LINES) + "\n")
    demo = Path(__file__).resolve().parents[1] / "ltsft_dist" / "configs" / "demo_clm.yaml"
    config = load_config(demo, [f"data.train_file={text}"])
    assert (config.kind, config.task, config.model.architecture) == ("language", "clm", "llama")
    assert config.deepspeed_path().name == "zero3.json"
