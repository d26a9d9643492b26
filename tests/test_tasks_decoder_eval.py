"""Zero-shot evaluation of decoders beyond XCOPA: XNLI by log-likelihood (`xnli_ll`, lm-eval's whole sequences
"premise, right? Yes/Also/No, hypothesis"), Belebele passage questions (`belebele`, lm-eval's "P: ... Q: ... A: ..."
prompt)
and per-language perplexity of held-out text (`clm`). Each: the prompt as lm-eval builds it, scores equal to a hand
computation with plain transformers on a tiny random Llama, clear errors for bad input, and `ltsft eval` with a task
SFT, with and without a language SFT."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
from loglikelihoods import acc_and_acc_norm, by_hand
from sfts import random_sft
from transformers import AutoModelForCausalLM, AutoTokenizer

from ltsft_dist.cli import build_parser
from ltsft_dist.config import ModelConfig, SourceConfig
from ltsft_dist.demo_text import sentences
from ltsft_dist.errors import LtsftError
from ltsft_dist.evaluation import EvalOptions, evaluate, load_eval_config, markdown_table, read_eval_data
from ltsft_dist.models import save_tiny_base
from ltsft_dist.sft import base_fingerprint
from ltsft_dist.tasks import Encoding, get_task

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"
XNLI = FIXTURES / "xnli.dev.tsv"  # en, de (3 pairs each), sw (2)
BELEBELE = FIXTURES / "belebele_eng_Latn.jsonl"  # 4 questions on 2 passages
CONFIGS = Path(__file__).parent.parent / "ltsft_dist" / "configs"
SIZES = dict(vocab_size=500, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             intermediate_size=24, max_position_embeddings=160)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Llama and its WordPiece tokenizer, trained on the fixtures' text and the demo sentences."""
    texts = [line for line in XNLI.read_text(encoding="utf-8").splitlines()[1:]]
    rows = map(json.loads, BELEBELE.read_text().splitlines())
    texts += [v for row in rows for v in row.values() if isinstance(v, str)]
    texts += sentences("en", 40, seed=1) + sentences("de", 40, seed=1)
    directory = tmp_path_factory.mktemp("base") / "llama"
    save_tiny_base(directory, ModelConfig(tiny=SIZES, architecture="llama"), texts, seed=5)
    return directory


@pytest.fixture(scope="module")
def model_and_tokenizer(base):
    return AutoModelForCausalLM.from_pretrained(base).eval(), AutoTokenizer.from_pretrained(base)


def _outputs(task, model, encoded, batch: int) -> list[torch.Tensor]:
    """The task's forward in batches of `batch` rows: padding must not change a row's score."""
    tensors = encoded.examples.tensors
    with torch.inference_mode():
        parts = [task.forward(model, {k: t[i:i + batch] for k, t in tensors.items()})
                 for i in range(0, encoded.rows, batch)]
    return [torch.cat(part) for part in zip(*parts)]


# ---------------------------------------------------------------------- XNLI by log-likelihood


def test_xnli_prompt_is_lm_evals_per_language():
    task = get_task("xnli_ll")
    en = read_eval_data("xnli_ll", "en", XNLI)
    assert [r.label for r in en] == [2, 0, 1]  # contradiction, entailment, neutral: the choices' order
    assert task.context(en[0]) == ""  # lm-eval 0.4.13 scores each whole sequence after the start of a text
    assert task.continuations(en[0]) == [" The cat sat on the mat., right? Yes, The cat is standing.",
                                         " The cat sat on the mat., right? Also, The cat is standing.",
                                         " The cat sat on the mat., right? No, The cat is standing."]
    de = read_eval_data("xnli_ll", "de", XNLI)[0]
    assert [c.split(", ")[1] for c in task.choices(de)] == ["richtig? Ja", "richtig? Auch", "richtig? Nein"]
    sw = read_eval_data("xnli_ll", "sw", XNLI)[0]
    assert ", sahihi? Hapana, " in task.choices(sw)[2] and task.metrics == ("acc",)  # lm-eval reports acc only


def test_xnli_scores_equal_a_hand_computation(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    task = get_task("xnli_ll")
    records = read_eval_data("xnli_ll", "en", XNLI) + read_eval_data("xnli_ll", "de", XNLI)
    words = {"en": ("right", "Yes", "Also", "No"), "de": ("richtig", "Ja", "Auch", "Nein")}
    hand, choices = [], []
    for r in records:  # the prompt written out here, not taken from the task
        question, *labels = words[r.language]
        choices.append([f"{r.premise}, {question}? {w}, {r.hypothesis}" for w in labels])
        hand.append([by_hand(model, tokenizer, "", " " + c) for c in choices[-1]])  # after <s> alone
    encoded = task.encode(tokenizer, records, Encoding(max_seq_length=64))
    assert encoded.rows == 18  # a row per (pair, choice)
    outputs = _outputs(task, model, encoded, batch=4)
    torch.testing.assert_close(outputs[0], torch.tensor(hand, dtype=torch.float64).reshape(-1), rtol=1e-5, atol=1e-5)
    acc, acc_norm = acc_and_acc_norm(hand, choices, [r.label for r in records])
    scores = task.score(encoded, outputs, "en", EvalOptions())
    assert scores == {"acc": pytest.approx(acc), "acc_norm": pytest.approx(acc_norm), "examples": 6}


def test_an_empty_context_is_the_end_of_sequence_token_for_a_tokenizer_without_a_beginning_one(model_and_tokenizer):
    """lm-eval conditions a whole-sequence choice on BOS, or on EOS where the tokenizer has none (Qwen2's): every
    token of the choice is then scored, the first one too."""
    from tokenizers import processors

    model, tokenizer = model_and_tokenizer
    no_bos = copy.deepcopy(tokenizer)
    no_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    no_bos.bos_token = None
    assert no_bos("")["input_ids"] == [] and no_bos.eos_token_id is not None
    task = get_task("xnli_ll")
    record = read_eval_data("xnli_ll", "en", XNLI)[0]
    encoded = task.encode(no_bos, [record], Encoding(max_seq_length=64))
    ids, labels = encoded.examples.tensors["input_ids"][0], encoded.examples.tensors["labels"][0]
    choice = no_bos(task.continuations(record)[0])["input_ids"]
    assert ids[:len(choice) + 1].tolist() == [no_bos.eos_token_id, *choice]
    assert labels[0] == -100 and labels[1:len(choice) + 1].tolist() == choice  # the first token is scored too
    whole = torch.tensor([[no_bos.eos_token_id, *choice]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(whole).logits[0].double(), -1)
    expected = sum(float(logprobs[t - 1, whole[0, t]]) for t in range(1, whole.shape[1]))
    assert float(_outputs(task, model, encoded, batch=3)[0][0]) == pytest.approx(expected, abs=1e-5)


def test_xnli_bad_input_names_the_file_the_line_and_the_fix(tmp_path):
    with pytest.raises(LtsftError, match=r"no prompt words for language 'et'; use one of ar, bg, de"):
        read_eval_data("xnli_ll", "et", XNLI)
    bad = tmp_path / "xnli.test.tsv"
    lines = XNLI.read_text(encoding="utf-8").splitlines()
    bad.write_text("\n".join([lines[0], lines[1].replace("\tcontradiction\t", "\tmaybe\t", 1)]) + "\n")
    with pytest.raises(LtsftError, match=r"xnli.test.tsv:2: unknown label 'maybe'; use one of"):
        read_eval_data("xnli_ll", "en", bad)
    with pytest.raises(LtsftError, match=r"no labelled examples for language\(s\) \['fr'\]"):
        read_eval_data("xnli_ll", "fr", XNLI)


# ---------------------------------------------------------------------- Belebele


def test_belebele_prompt_is_lm_evals():
    task = get_task("belebele")
    records = read_eval_data("belebele", "en", BELEBELE)
    assert [r.correct for r in records] == [1, 0, 3, 2] and records[1].where.endswith("belebele_eng_Latn.jsonl:2")
    assert task.context(records[1]) == (
        "P: The river flows north through the old town. In spring the water rises and the bridges close for a week."
        "\nQ: Which way does the river flow?\nA: North\nB: South\nC: East\nD: West\nAnswer:")
    assert task.continuations(records[1]) == [" A", " B", " C", " D"]
    assert task.gold(records[1]) == 0


def test_belebele_scores_equal_a_hand_computation(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    task = get_task("belebele")
    rows = [json.loads(line) for line in BELEBELE.read_text().splitlines()]
    records = read_eval_data("belebele", "en", BELEBELE)
    hand = []
    for row in rows:
        context = (f"P: {row['flores_passage']}\nQ: {row['question'].strip()}\nA: {row['mc_answer1']}\n"
                   f"B: {row['mc_answer2']}\nC: {row['mc_answer3']}\nD: {row['mc_answer4']}\nAnswer:")
        hand.append([by_hand(model, tokenizer, context, " " + letter) for letter in "ABCD"])
    encoded = task.encode(tokenizer, records, Encoding(max_seq_length=160))
    outputs = _outputs(task, model, encoded, batch=3)
    torch.testing.assert_close(outputs[0], torch.tensor(hand, dtype=torch.float64).reshape(-1), rtol=1e-5, atol=1e-5)
    acc, acc_norm = acc_and_acc_norm(hand, [list("ABCD")] * 4, [int(row["correct_answer_num"]) - 1 for row in rows])
    assert acc == acc_norm  # every choice is one letter long
    assert task.score(encoded, outputs, "en", EvalOptions()) == {"acc": pytest.approx(acc),
                                                                  "acc_norm": pytest.approx(acc_norm), "examples": 4}
    with pytest.raises(LtsftError, match=r"belebele_eng_Latn.jsonl:1: context and choice 1 take \d+ tokens, more "
                                         r"than --max-seq-length 16; raise it"):
        task.encode(tokenizer, records, Encoding(max_seq_length=16))


@pytest.mark.parametrize("edit, message", [
    (lambda row: row.pop("mc_answer3"), r":2: missing \['mc_answer3'\]; each Belebele record needs flores_passage"),
    (lambda row: row.update(correct_answer_num="5"), r":2: correct_answer_num must be 1, 2, 3 or 4 .*got '5'"),
    (lambda row: row.update(question="  "), r":2: question must be non-empty text, got '  '; fix the record"),
    (lambda row: row.update(mc_answer1=None), r":2: mc_answer1 must be non-empty text, got None"),
])
def test_belebele_bad_records_name_the_line_the_field_and_the_fix(tmp_path, edit, message):
    rows = [json.loads(line) for line in BELEBELE.read_text().splitlines()]
    edit(rows[1])
    bad = tmp_path / "est_Latn.jsonl"
    bad.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(LtsftError, match="est_Latn.jsonl" + message):
        read_eval_data("belebele", "et", bad)


def test_belebele_accepts_an_integer_answer_number(tmp_path):
    row = json.loads(BELEBELE.read_text().splitlines()[0])
    (tmp_path / "b.jsonl").write_text(json.dumps({**row, "correct_answer_num": 2}) + "\n")
    assert read_eval_data("belebele", "en", tmp_path / "b.jsonl")[0].correct == 1


# ---------------------------------------------------------------------- perplexity


def _perplexity_by_hand(model, tokenizer, lines: list[str], max_len: int) -> tuple[float, int]:
    """exp(mean NLL per token) of the text: its lines' tokens, each line closed by </s>, in blocks of max_len - 1
    tokens each scored after <s> alone; every token of the text is predicted once."""
    lines_ids = tokenizer(lines, add_special_tokens=False)["input_ids"]
    stream = [t for ids in lines_ids for t in ids + [tokenizer.eos_token_id]]
    nll = 0.0
    for start in range(0, len(stream), max_len - 1):
        block = [tokenizer.bos_token_id] + stream[start:start + max_len - 1]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([block])).logits[0].double(), -1)
        nll -= sum(float(logprobs[t - 1, block[t]]) for t in range(1, len(block)))
    return math.exp(nll / len(stream)), len(stream)


def test_perplexity_equals_a_hand_computation(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    task = get_task("clm")
    lines = sentences("de", 30, seed=7)
    (tmp_path / "held.de.txt").write_text("\n".join(lines) + "\n")
    records = read_eval_data("clm", "de", tmp_path / "held.de.txt")
    encoded = task.encode_for_eval(tokenizer, records, Encoding(max_seq_length=24), None)
    expected, tokens = _perplexity_by_hand(model, tokenizer, lines, 24)
    assert encoded.report["tokens_repeated"] == 0 and encoded.rows == math.ceil(tokens / 23)
    for batch in (1, 5):  # the padded last block and the batching change nothing
        scores = task.score(encoded, _outputs(task, model, encoded, batch), "de", EvalOptions())
        assert scores["tokens"] == tokens and scores["examples"] == 30
        assert scores["perplexity"] == pytest.approx(expected, rel=1e-9)
        assert scores["nll_per_token"] == pytest.approx(math.log(expected), rel=1e-9)
    limited = read_eval_data("clm", "de", tmp_path / "held.de.txt", limit=5)
    assert limited == lines[:5]  # --limit: the first lines


# ---------------------------------------------------------------------- ltsft eval


@pytest.fixture(scope="module")
def sfts(base, tmp_path_factory):
    """An instruction task SFT (no head) and a German language SFT of the tiny base, saved."""
    model = AutoModelForCausalLM.from_pretrained(base)
    fingerprint = base_fingerprint(model)
    out = tmp_path_factory.mktemp("sfts")
    random_sft(model, density=0.2, seed=1, kind="task", base_fingerprint=fingerprint,
               training_config={"task": "instruct"}).save_pretrained(out / "task")
    random_sft(model, density=0.2, seed=2, languages=["de"], base_fingerprint=fingerprint).save_pretrained(out / "de")
    return out


def cli(*argv) -> int:
    args = build_parser().parse_args([str(a) for a in argv])
    return args.func(args)


@pytest.mark.parametrize("task, data, header", [
    ("xnli_ll", {"de": XNLI, "en": XNLI}, "| language | n | task+lang acc | TA-only acc |"),
    ("belebele", {"de": BELEBELE, "en": BELEBELE}, "| language | n | task+lang acc | task+lang acc_norm | "
                                                   "TA-only acc | TA-only acc_norm |"),
    ("clm", {"de": "held.de.txt", "en": "held.en.txt"}, "| language | n | task+lang ppl | TA-only ppl |"),
])
def test_ltsft_eval_with_and_without_a_language_sft(base, sfts, model_and_tokenizer, tmp_path, task, data, header):
    for lang in ("de", "en"):
        (tmp_path / f"held.{lang}.txt").write_text("\n".join(sentences(lang, 12, seed=3)) + "\n")
    data = {lang: tmp_path / path if isinstance(path, str) else path for lang, path in data.items()}
    argv = ["eval", "--base", base, "--task-sft", sfts / "task", "--task", task, "--lang-sft", f"de={sfts / 'de'}",
            "--max-seq-length", 160, "--batch-size", 4, "--out", tmp_path / "out", "--no-progress"]
    assert cli(*argv, *[a for lang, path in data.items() for a in ("--data", f"{lang}={path}")]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    de, en = results["languages"]["de"], results["languages"]["en"]
    assert set(de) == {"task+lang", "task-only"} and set(en) == {"task-only"}
    assert header in (tmp_path / "out" / "results.md").read_text()
    if task == "clm":  # TA-only perplexity is the hand computation on θ⁰ + φ_task; the language SFT changes it
        assert de["task+lang"]["perplexity"] != de["task-only"]["perplexity"]
        from ltsft_dist.sft import SparseFineTuning

        model, tokenizer = model_and_tokenizer
        task_sft = SparseFineTuning.from_pretrained(sfts / "task")
        task_sft.apply(model)
        try:
            expected, tokens = _perplexity_by_hand(model, tokenizer, sentences("de", 12, seed=3), 160)
        finally:
            task_sft.revert(model)
        assert de["task-only"]["perplexity"] == pytest.approx(expected, rel=1e-6)
        assert de["task-only"]["tokens"] == tokens
        assert "perplexity, lower is better" in markdown_table(results)


def test_the_eval_config_example_reads_and_names_an_evaluated_decoder_task():
    config = load_eval_config(CONFIGS / "eval_decoder_belebele.yaml")
    config.check()
    assert get_task(config.task, evaluated=True).decoder and set(config.lang_sft) <= set(config.data)
    assert get_task(config.task).sniff(config.data["et"]) == "jsonl"


def test_a_hub_dataset_language_without_prompt_words_is_refused_before_any_download():
    assert "hf" in get_task("belebele").formats and "hf" in get_task("xnli_ll").formats  # facebook/belebele, /xnli
    with pytest.raises(LtsftError, match="facebook/xnli: XNLI by log-likelihood has no prompt words for language 'qu'"):
        get_task("xnli_ll").read(SourceConfig(language="qu", hf_dataset="facebook/xnli", hf_config="qu"), "hf")


@pytest.mark.parametrize("task, model_type, message", [
    ("belebele", "bert", "an encoder (model_type 'bert' in its config.json), but --task belebele scores decoder "
                         "models: pass a decoder base"),
    ("nli", "llama", "a decoder (model_type 'llama' in its config.json), but --task nli scores encoder models: pass "
                     "an encoder base"),
])
def test_ltsft_eval_refuses_a_base_of_the_wrong_kind_from_its_config_json_alone(sfts, tmp_path, task, model_type,
                                                                                message):
    base = tmp_path / model_type  # its config.json alone: reading any weights would fail differently
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(LtsftError, match=re.escape(f"--base {base}: {message}")):
        cli("eval", "--base", base, "--task-sft", sfts / "task", "--task", task, "--data", f"en={XNLI}",
            "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_perplexity_of_a_language_sft_alone_against_the_base(base, sfts, model_and_tokenizer, tmp_path):
    """Without --task-sft (a task without a head): θ⁰ + φ_lang vs θ⁰, θ⁰'s perplexity the hand computation's."""
    lines = sentences("de", 12, seed=3)
    (tmp_path / "held.de.txt").write_text("\n".join(lines) + "\n")
    argv = ["eval", "--base", base, "--task", "clm", "--lang-sft", f"de={sfts / 'de'}", "--data",
            f"de={tmp_path / 'held.de.txt'}", "--max-seq-length", 40, "--out", tmp_path / "out", "--no-progress"]
    assert cli(*argv) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["task_sft"] is None and results["settings"] == {"task+lang": "θ⁰ + φ_lang", "task-only": "θ⁰"}
    de = results["languages"]["de"]
    model, tokenizer = model_and_tokenizer
    expected, tokens = _perplexity_by_hand(model, tokenizer, lines, 40)
    assert de["task-only"]["perplexity"] == pytest.approx(expected, rel=1e-6) and de["task-only"]["tokens"] == tokens
    assert de["task+lang"]["perplexity"] != de["task-only"]["perplexity"]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| language | n | θ⁰+lang ppl | θ⁰ ppl |" in table and "(no task SFT)" in table
    with pytest.raises(LtsftError, match=r"missing --task-sft: .* without one, --task names a task scored on the base "
                                         r"alone \(clm, xcopa, xnli_ll, belebele\)"):
        cli(*[a for a in argv if a not in ("--task", "clm")])
