"""`task: xcopa`, zero-shot log-likelihood multiple choice for decoders (lm-evaluation-harness's scoring): the
reader and lm-eval's prompt on the real XCOPA files, scores equal to a hand computation with plain transformers, and
`ltsft eval` of an instruction task SFT with and without a language SFT on a tiny Llama base."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import require_shared_data
from loglikelihoods import acc_and_acc_norm, by_hand
from sfts import random_sft
from transformers import AutoModelForCausalLM, AutoTokenizer

from ltsft_dist.config import ModelConfig, SourceConfig
from ltsft_dist.errors import LtsftError
from ltsft_dist.evaluation import EvalOptions, evaluate, markdown_table, read_eval_data
from ltsft_dist.models import save_tiny_base
from ltsft_dist.sft import base_fingerprint
from ltsft_dist.tasks import Encoding, get_task

SIZES = dict(vocab_size=400, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             intermediate_size=24, max_position_embeddings=96)


@pytest.fixture(scope="module")
def xcopa():
    return require_shared_data() / "xcopa"


@pytest.fixture(scope="module")
def base(xcopa, tmp_path_factory):
    """A tiny Llama and its WordPiece tokenizer, trained on the Estonian and Italian XCOPA text."""
    texts = [r[k] for lang in ("et", "it") for r in map(json.loads, (xcopa / f"val.{lang}.jsonl").open())
             for k in ("premise", "choice1", "choice2")]
    directory = tmp_path_factory.mktemp("base") / "llama"
    save_tiny_base(directory, ModelConfig(tiny=SIZES, architecture="llama"), texts, seed=3)
    return directory


def test_reader_and_lm_eval_prompt_on_the_real_files(xcopa):
    records = read_eval_data("xcopa", "et", xcopa / "val.et.jsonl")
    assert len(records) == 100 and records[0].where.endswith("val.et.jsonl:1")
    task = get_task("xcopa")
    first = records[0]  # {"premise": "Mees keeras kraani lahti.", "question": "effect", "label": 1, ...}
    assert task.context(first) == "Mees keeras kraani lahti seetõttu"
    assert task.continuations(first) == [" tualett täitus veega.", " tilast voolas vett."]
    cause = next(r for r in read_eval_data("xcopa", "it", xcopa / "val.it.jsonl") if r.question == "cause")
    assert task.context(cause).endswith(" perché") and task.gold(cause) == cause.label


def test_bad_files_name_the_line_and_the_fix(tmp_path):
    bad = tmp_path / "val.et.jsonl"
    bad.write_text('{"premise": "a.", "choice1": "b", "choice2": "c", "question": "why", "label": 0}\n')
    with pytest.raises(LtsftError, match=r"val.et.jsonl:1: question must be 'cause' or 'effect'"):
        read_eval_data("xcopa", "et", bad)
    bad.write_text('{"premise": "a.", "choice1": "b", "question": "cause", "label": 0}\n')
    with pytest.raises(LtsftError, match=r"val.et.jsonl:1: missing \['choice2'\]; each XCOPA line needs"):
        read_eval_data("xcopa", "et", bad)
    with pytest.raises(LtsftError, match=r"no connectors for language 'xx'; use one of en, et"):
        get_task("xcopa").read(SourceConfig(language="xx", train_file=str(bad)), "jsonl")


def test_scores_equal_a_hand_computation_with_plain_transformers(xcopa, base):
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    task = get_task("xcopa")
    records = read_eval_data("xcopa", "et", xcopa / "val.et.jsonl", limit=12)
    encoded = task.encode(tokenizer, records, Encoding(max_seq_length=64))
    assert encoded.rows == 24  # one padded row per (example, choice)
    with torch.inference_mode():
        outputs = [torch.cat(part) for part in zip(*(  # in batches of 5: padding must not change a row's score
            task.forward(model, {k: t[i:i + 5] for k, t in encoded.examples.tensors.items()}) for i in range(0, 24, 5)))]
    hand = [[by_hand(model, tokenizer, task.context(r), c) for c in task.continuations(r)] for r in records]
    torch.testing.assert_close(outputs[0], torch.tensor(hand, dtype=torch.float64).reshape(-1), rtol=1e-5, atol=1e-5)
    # acc_norm divides by the choice's own length, without the space that joins it to the context (lm-eval's)
    acc, acc_norm = acc_and_acc_norm(hand, [task.choices(r) for r in records], [r.label for r in records])
    assert task.choices(records[0]) == ["tualett täitus veega.", "tilast voolas vett."]
    scores = task.score(encoded, outputs, "et", EvalOptions())
    assert scores == {"acc": pytest.approx(acc), "acc_norm": pytest.approx(acc_norm), "examples": 12}


def test_ltsft_eval_of_an_instruction_sft_with_and_without_a_language_sft(xcopa, base, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(base)
    fingerprint = base_fingerprint(model)
    task_sft = random_sft(model, density=0.2, seed=1, kind="task", base_fingerprint=fingerprint,
                          training_config={"task": "instruct"})
    lang_sft = random_sft(model, density=0.2, seed=2, kind="language", languages=["et"], base_fingerprint=fingerprint)
    task_sft.save_pretrained(tmp_path / "task")
    lang_sft.save_pretrained(tmp_path / "et")
    data = {"et": str(xcopa / "val.et.jsonl"), "it": str(xcopa / "val.it.jsonl")}
    with pytest.raises(LtsftError, match=r"--task-sft: cannot tell the task from its heads \(none\); pass --task"):
        evaluate(str(base), str(tmp_path / "task"), data, {"et": str(tmp_path / "et")}, show_progress=False)
    results = evaluate(str(base), str(tmp_path / "task"), data, {"et": str(tmp_path / "et")}, task="xcopa",
                       options=EvalOptions(max_seq_length=96, batch_size=16, limit=40), show_progress=False)
    et, it = results["languages"]["et"], results["languages"]["it"]
    assert set(et) == {"task+lang", "task-only"} and set(it) == {"task-only"}
    assert all(s["examples"] == 40 and 0 <= s["acc"] <= 100 and 0 <= s["acc_norm"] <= 100
               for s in (et["task+lang"], et["task-only"], it["task-only"]))
    table = markdown_table(results)
    assert "| language | n | task+lang acc | task+lang acc_norm | TA-only acc | TA-only acc_norm |" in table
    # The language SFT changes the model: the log-likelihoods, hence (almost surely) some choice, differ.
    tokenizer = AutoTokenizer.from_pretrained(base)
    records = read_eval_data("xcopa", "et", xcopa / "val.et.jsonl", limit=4)
    first = get_task("xcopa").context(records[0]), get_task("xcopa").continuations(records[0])[0]
    before = by_hand(model, tokenizer, *first)
    lang_sft.apply(model)
    assert abs(by_hand(model, tokenizer, *first) - before) > 1e-4
