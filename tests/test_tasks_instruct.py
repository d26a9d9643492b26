"""`task: instruct`, task SFTs of decoders on instruction data: the three record shapes and their errors, labels on
response tokens only (plain and chat-template records), prompts longer than the context, and `ltsft train` of a tiny
Llama whose saved SFT gives back the held-out loss of the best φ."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from scenarios import TINY_LLAMA
from test_train_tasks import held_out_loss_of, train, write_config

from ltsft_dist import eligibility as elig
from ltsft_dist.config import ModelConfig, SourceConfig
from ltsft_dist.demo_text import sentences
from ltsft_dist.errors import LtsftError
from ltsft_dist.models import build_model, save_tiny_base, tiny_tokenizer
from ltsft_dist.sft import SparseFineTuning
from ltsft_dist.tasks import Encoding, get_task
from ltsft_dist.tasks.instruct import ALPACA_PROMPT
from ltsft_dist.training_data import read_source

WORDS = sentences("en", 80, seed=7)
SIZES = dict(vocab_size=300, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             intermediate_size=24, max_position_embeddings=96)
# A template in words the tiny WordPiece vocabulary knows, rendering turns as "<role> : <content> ;".
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} ; {% endfor %}"
            "{% if add_generation_prompt %}assistant : {% endif %}")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(ModelConfig(tiny=SIZES, architecture="llama"),
                          WORDS + ["user assistant system : ;", ALPACA_PROMPT])


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _read(path):
    return read_source(SourceConfig(language="en", train_file=path), "instruct").records


def _learnt(tok, encoded, row: int) -> str:
    ids, labels = encoded.examples.tensors["input_ids"][row], encoded.examples.tensors["labels"][row]
    return tok.decode(ids[labels != -100].tolist())


def test_the_three_record_shapes_are_read_from_jsonl(tmp_path):
    path = _jsonl(tmp_path / "train.jsonl", [
        {"prompt": "the river", "response": "flows north"},
        {"instruction": "name a city", "input": "in the north", "output": "the town"},
        {"instruction": "name a city", "output": "the town"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}])
    plain, alpaca, alpaca_no_input, chat = _read(path)
    assert (plain.prompt, plain.response, plain.where) == ("the river", "flows north", f"{path}:1")
    assert alpaca.prompt.endswith("### Instruction:\nname a city\n\n### Input:\nin the north\n\n### Response:\n")
    assert "### Input" not in alpaca_no_input.prompt and alpaca_no_input.response == "the town"
    assert chat.messages == (("user", "hi"), ("assistant", "hello")) and chat.prompt == ""


@pytest.mark.parametrize("row, message", [
    ({"prompt": "the river"}, r":2: no response field \('response' or 'output'\); each record needs one of"),
    ({"instruction": "x", "input": "y"}, r":2: no response field"),
    ({"text": "x"}, r":2: fields \['text'\]; each record needs one of \{prompt, response\}"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r":2: no assistant message to learn"),
    ({"messages": [{"role": "user"}]}, r":2: 'messages' must be a list of"),
    ({"prompt": "x", "response": 3}, r":2: 'response' must be a string, got int"),
])
def test_bad_records_name_the_file_line_and_the_fix(tmp_path, row, message):
    path = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, row])
    with pytest.raises(LtsftError, match=message):
        _read(path)


def test_only_response_tokens_and_the_closing_eos_are_learnt(tok, tmp_path):
    records = _read(_jsonl(tmp_path / "t.jsonl", [{"prompt": "the river", "response": "flows north"},
                                                   {"prompt": "a cat\n", "response": "sat on the mat"}]))
    encoded = get_task("instruct").encode(tok, records, Encoding(max_seq_length=24))
    ids, labels = encoded.examples.tensors["input_ids"], encoded.examples.tensors["labels"]
    mask = encoded.examples.tensors["attention_mask"]
    assert _learnt(tok, encoded, 0) == "flows north </s>" and _learnt(tok, encoded, 1) == "sat on the mat </s>"
    whole = tok("the river\nflows north")["input_ids"] + [tok.eos_token_id]  # <s> prompt \n response </s>
    assert ids[0, :len(whole)].tolist() == whole and int(mask[0].sum()) == len(whole)
    assert bool((ids[0, len(whole):] == tok.pad_token_id).all()) and bool((labels[0, len(whole):] == -100).all())
    assert bool((labels[:, 0] == -100).all())  # never predicted: the trainer's token count is the model's
    assert encoded.report == {"rows": 2, "truncated_responses": 0, "response_tokens": int((labels != -100).sum())}


def test_a_chat_learns_every_assistant_turn_through_the_template(tok, tmp_path):
    tok = copy.deepcopy(tok)
    tok.chat_template = TEMPLATE
    chat = {"messages": [{"role": "system", "content": "the river"}, {"role": "user", "content": "a cat"},
                         {"role": "assistant", "content": "sat on the mat"}, {"role": "user", "content": "she"},
                         {"role": "assistant", "content": "reads the book"}]}
    records = _read(_jsonl(tmp_path / "chat.jsonl", [chat]))
    encoded = get_task("instruct").encode(tok, records, Encoding(max_seq_length=64))
    assert _learnt(tok, encoded, 0) == "sat on the mat ; reads the book ;"  # each answer and its end of turn
    ids = encoded.examples.tensors["input_ids"][0]
    rendered = tok.apply_chat_template([dict(m) for m in chat["messages"]], tokenize=False)
    assert ids[:int(encoded.examples.tensors["attention_mask"][0].sum())].tolist() == \
        tok(rendered, add_special_tokens=False)["input_ids"]  # the template's text, framed by the template alone
    tok.chat_template = None
    with pytest.raises(LtsftError, match=r"chat.jsonl:1: a chat \('messages'\), but the tokenizer has no chat "
                                         r"template; use a tokenizer with one \(model.tokenizer\)"):
        get_task("instruct").encode(tok, records, Encoding(max_seq_length=64))


def test_long_prompts_are_refused_and_long_responses_cut_and_counted(tok, tmp_path):
    long = " ".join(WORDS[:6])
    path = _jsonl(tmp_path / "long.jsonl", [{"prompt": "the river", "response": long},
                                            {"prompt": long, "response": "north"}])
    records = _read(path)
    with pytest.raises(LtsftError, match=rf"{path}:2 \(\d+ prompt tokens\): the prompt fills "
                                         r"data.max_seq_length=16 and leaves no room for the response \(1 record"):
        get_task("instruct").encode(tok, records, Encoding(max_seq_length=16))
    encoded = get_task("instruct").encode(tok, records[:1], Encoding(max_seq_length=16))
    assert encoded.report["truncated_responses"] == 1
    assert bool(encoded.examples.tensors["attention_mask"].all())  # cut to the context, learnt to its end
    assert int(encoded.examples.tensors["labels"][0, -1]) != -100


def test_a_decoder_task_sft_keeps_the_lm_head_frozen_and_trains_norms_sparsely():
    model = build_model(ModelConfig(tiny=SIZES, architecture="llama"), "instruct", seed=0)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    roles = elig.resolve(model, "task")
    assert roles.names("frozen") == ["lm_head.weight"] and roles.names("head") == []
    assert "model.embed_tokens.weight" in roles.names("sparse") and "model.norm.weight" in roles.names("sparse")


@pytest.mark.slow
@pytest.mark.multirank
def test_ltsft_train_instruct_on_two_ranks_keeps_the_best_phi_by_held_out_loss(tmp_path):
    """`ltsft train` of a Llama checkpoint on prompt/response records at W=2, ZeRO-3 (loaded straight into the
    partitions) with accumulation: the held-out loss of the best φ is what θ⁰ + the saved φ gives."""
    lines = sentences("en", 240, seed=5)
    rows = [{"prompt": lines[i], "response": lines[i + 1]} for i in range(0, 240, 2)]
    base = tmp_path / "base"
    save_tiny_base(base, ModelConfig(tiny={**TINY_LLAMA, "vocab_size": 200, "max_position_embeddings": 48},
                                     architecture="llama"), lines, seed=1)
    out = tmp_path / "run"
    path = write_config(tmp_path, {
        "kind": "task", "task": "instruct", "languages": ["en"], "output_dir": str(out), "density": 0.05,
        "model": {"name_or_path": str(base)},
        "data": {"train_file": _jsonl(tmp_path / "en.jsonl", rows), "max_seq_length": 48, "eval_fraction": 0.2,
                 "eval_every": 2},
        "phase1": {"steps": 4, "lr": 3e-3}, "phase2": {"steps": 6, "lr": 3e-3}, "batch_size": 8,
        "micro_batch_size": 2, "deepspeed": "zero3.json", "log_every": 2})
    train(path, ranks=2)
    results = json.loads((out / "results.json").read_text())
    assert results["frozen_drift"] == 0
    evals = results["eval_losses"]["phase2"]
    best = min(evals, key=lambda e: e["all"])
    assert results["best_eval"] == {"step": best["step"], "loss": best["all"]}
    sft = SparseFineTuning.from_pretrained(out / "sft")
    assert sft.metadata.kind == "task" and sft.heads == {} and 0 < sft.nnz <= results["k"]
    assert "lm_head.weight" not in sft.diffs
    assert held_out_loss_of(path, out / "sft", out / "tokenizer") == pytest.approx(best["all"], rel=1e-5)
    assert torch.isfinite(torch.tensor(best["all"]))
