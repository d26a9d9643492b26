"""``ltsft eval`` and ``ltsft export`` on a tiny saved base with random (untrained) SFTs: scores equal a hand-made
evaluation, 2 ranks give the same numbers as 1, the export loads with plain transformers, bad input is refused,
and a run on real XQuAD files writes the table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import require_shared_data
from distributed import run_ranks
from transformers import (AutoModelForMaskedLM, AutoModelForQuestionAnswering, AutoModelForSequenceClassification,
                          BertConfig, BertForMaskedLM, BertForPreTraining)

from ltsft_dist.cli import build_parser
from ltsft_dist.data import train_wordpiece
from ltsft_dist.demo_text import sentences
from ltsft_dist.errors import LtsftError
from ltsft_dist.evaluation import EvalConfig, EvalOptions, evaluate, load_eval_config, read_eval_data
from ltsft_dist.sft import SFTMetadata, SparseFineTuning, base_fingerprint, compose
from ltsft_dist.tasks import nli, qa
from ltsft_dist.tasks.metrics import accuracy, qa_scores

REPO = Path(__file__).resolve().parents[1]
QA_OPTIONS = dict(max_seq_length=48, stride=12, max_query_length=16, batch_size=4)
QA_FLAGS = ["--max-seq-length", "48", "--stride", "12", "--max-query-length", "16", "--batch-size", "4"]


# ---------------------------------------------------------------------------------------------- fixtures


def save_base(directory: Path, lines: list[str], vocab_size: int, max_positions: int = 64) -> Path:
    """A tiny BERT checkpoint (MLM head and pooler, like bert-base's) with its own WordPiece tokenizer."""
    tokenizer = train_wordpiece(lines, vocab_size)
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=37,
                                       max_position_embeddings=max_positions))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def random_sft(model, kind: str, languages: list[str], seed: int, scale: float = 0.05,
               fingerprint: str | None = None) -> SparseFineTuning:
    """Random sparse differences on 10% of every parameter (also an MLM head's, which a task model lacks);
    for a task SFT the parameters outside the body become dense heads instead."""
    g = torch.Generator().manual_seed(seed)
    prefix = model.base_model_prefix + "."
    diffs, shapes, heads = {}, {}, {}
    for name, param in model.named_parameters():
        if kind == "task" and not name.startswith(prefix):
            heads[name] = torch.randn(param.shape, generator=g)
            continue
        n = max(1, param.numel() // 10)
        indices = torch.randperm(param.numel(), generator=g)[:n].sort().values
        diffs[name] = (indices, torch.randn(n, generator=g) * scale)
        shapes[name] = tuple(param.shape)
    fingerprint = base_fingerprint(model) if fingerprint is None else fingerprint
    metadata = SFTMetadata(kind=kind, languages=languages, base_model="tiny", base_fingerprint=fingerprint,
                           k=sum(len(i) for i, _ in diffs.values()), density=0.1, training_config={})
    return SparseFineTuning(diffs, shapes, heads, metadata)


def squad_file(path: Path, language: str, n: int, seed: int) -> Path:
    """SQuAD-format questions on demo text: contexts of 5 sentences (longer than one 48-token window)."""
    text = sentences(language, 5 * n, seed=seed)
    data = []
    for i in range(n):
        context = " ".join(text[5 * i:5 * i + 5])
        target = text[5 * i + 2 + i % 3]
        answer = target.split()[2]  # the subject noun
        start = context.index(target) + target.index(f" {answer} ") + 1
        qas = [{"id": f"{language}-{i}", "question": " ".join(target.split()[3:6]) + " ?",
                "answers": [{"text": answer, "answer_start": start}]}]
        data.append({"title": f"t{i}", "paragraphs": [{"context": context, "qas": qas}]})
    path.write_text(json.dumps({"version": "1.1", "data": data}, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved base, a QA and an NLI task SFT, language SFTs for de and es, and QA/NLI data for de, es, en."""
    root = tmp_path_factory.mktemp("eval")
    lines = [s for lang in ("en", "de", "es") for s in sentences(lang, 300, seed=1)]
    base = save_base(root / "base", lines, vocab_size=300)
    mlm = BertForMaskedLM.from_pretrained(base)
    paths = {"base": base}
    for lang, seed in (("de", 1), ("es", 2)):
        random_sft(mlm, "language", [lang], seed).save_pretrained(root / f"lang-{lang}")
        paths[f"lang-{lang}"] = root / f"lang-{lang}"
    random_sft(AutoModelForQuestionAnswering.from_pretrained(base), "task", ["en"], 3).save_pretrained(root / "qa")
    paths.update(qa=root / "qa", nli=root / "nli")
    for lang, seed in (("de", 5), ("es", 6), ("en", 7)):
        paths[f"squad-{lang}"] = squad_file(root / f"squad.{lang}.json", lang, 11, seed)
    rows = ["pairID\tlanguage\tgold_label\tsentence1\tsentence2"]
    for lang in ("de", "es"):
        premises, hypotheses = sentences(lang, 30, seed=8), sentences(lang, 30, seed=9)
        rows += [f"{i}\t{lang}\t{nli.LABELS[i % 3]}\t{p}\t{h}" for i, (p, h) in enumerate(zip(premises, hypotheses))]
    (root / "xnli.dev.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    paths["xnli"] = root / "xnli.dev.tsv"
    nli_sft(base, paths["xnli"]).save_pretrained(root / "nli")
    return {name: str(path) for name, path in paths.items()}


def nli_sft(base: Path, data: Path) -> SparseFineTuning:
    """A random NLI task SFT whose classifier is centred and sharpened on the data: an untrained head on a random
    tiny BERT gives nearly the same logits to every pair, so it would predict one class for all of them."""
    from transformers import AutoTokenizer

    torch.manual_seed(0)  # the fresh head's initialisation: the same whichever tests ran before
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=3).eval()
    sft = random_sft(model, "task", ["en"], 4, scale=0.2)
    sft.apply(model)
    encoded = nli.encode_nli(AutoTokenizer.from_pretrained(base), nli.read_xnli_tsv(data).by_language["de"], 40)
    with torch.no_grad():
        logits = model(**{k: v for k, v in encoded.tensors.items() if k != "labels"}).logits
    sft.heads["classifier.weight"] = sft.heads["classifier.weight"] * 100
    sft.heads["classifier.bias"] = sft.heads["classifier.bias"] * 100 - 100 * logits.mean(0)
    return sft


def cli(*argv) -> int:
    args = build_parser().parse_args([str(a) for a in argv])
    return args.func(args)


def qa_argv(world, out, *extra) -> list[str]:
    return ["eval", "--base", world["base"], "--task-sft", world["qa"], "--lang-sft", f"de={world['lang-de']}",
            "--lang-sft", f"es={world['lang-es']}", "--data", f"de={world['squad-de']}", "--data",
            f"es={world['squad-es']}", "--data", f"en={world['squad-en']}", *QA_FLAGS, "--out", str(out),
            "--no-progress", *extra]


# ---------------------------------------------------------------------------------------------- (a) scores


def hand_qa(world, lang: str, with_lang_sft: bool) -> dict:
    """The evaluation done by hand: apply, forward in the same batches, post-process, score."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(world["base"])
    model = AutoModelForQuestionAnswering.from_pretrained(world["base"]).eval()
    SparseFineTuning.from_pretrained(world["qa"]).apply(model)
    if with_lang_sft:
        SparseFineTuning.from_pretrained(world[f"lang-{lang}"]).apply(model, skip_missing_heads=True)
    examples = qa.read_squad_json(world[f"squad-{lang}"], lang)
    features = qa.encode_qa(tokenizer, examples, 48, 12, 16)
    inputs = {k: v for k, v in features.examples.tensors.items() if k not in ("start_positions", "end_positions")}
    starts, ends = [], []
    with torch.no_grad():
        for b in range(0, len(inputs["input_ids"]), 4):
            out = model(**{k: v[b:b + 4] for k, v in inputs.items()})
            starts.append(out.start_logits)
            ends.append(out.end_logits)
    predictions = qa.predict_answers(features, examples, torch.cat(starts), torch.cat(ends))
    scores = qa_scores(qa.gold_answers(examples), predictions)
    return {"exact_match": scores["exact_match"], "f1": scores["f1"], "examples": len(examples),
            "lost_to_truncation": len(features.report.lost)}


@pytest.fixture(scope="module")
def one_rank_qa(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("qa1")
    assert cli(*qa_argv(world, out)) == 0
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


def test_qa_scores_equal_a_hand_made_evaluation(world, one_rank_qa):
    results, table = one_rank_qa
    assert results["task"] == "qa"  # told by the task SFT's qa_outputs head
    assert list(results["languages"]) == ["de", "es", "en"]
    for lang in ("de", "es", "en"):
        got = results["languages"][lang]
        assert got["task-only"] == hand_qa(world, lang, with_lang_sft=False)
        if lang == "en":
            assert "task+lang" not in got  # no language SFT for en: TA-only only
        else:
            assert got["task+lang"] == hand_qa(world, lang, with_lang_sft=True)
    ta = [results["languages"][lang]["task-only"]["f1"] for lang in ("de", "es", "en")]
    assert results["average"]["task-only"]["f1"] == pytest.approx(sum(ta) / 3)
    assert results["average"]["task+lang"]["languages"] == 2
    # untrained SFTs score low but not all equal; the language SFT changes the predictions
    assert any(results["languages"][lang]["task+lang"] != results["languages"][lang]["task-only"]
               for lang in ("de", "es"))
    rows = table.splitlines()
    assert rows[2].split("|")[1:5] == [" language ", " n ", " task+lang EM ", " task+lang F1 "]
    assert [row.split("|")[1].strip() for row in rows[4:8]] == ["de", "es", "en", "**average**"]
    assert rows[6].count("–") == 2  # en has no task+lang cells
    assert f"{results['average']['task-only']['f1']:.2f}" in rows[7]
    assert rows[9] == "Averages over the languages each setting ran on: task+lang 2, TA-only 3."


def test_an_eval_config_file_gives_the_same_scores_and_flags_override_it(world, one_rank_qa, tmp_path):
    config = {"base": world["base"], "task_sft": world["qa"], "lang_sft": {"de": world["lang-de"], "es": "nowhere"},
              "data": {lang: world[f"squad-{lang}"] for lang in ("de", "es", "en")}, "max_seq_length": 48,
              "stride": 12, "max_query_length": 16, "batch_size": 1000, "out": str(tmp_path / "ignored")}
    (tmp_path / "eval.yaml").write_text(json.dumps(config))  # JSON is YAML
    assert cli("eval", tmp_path / "eval.yaml", "--lang-sft", f"es={world['lang-es']}", "--batch-size", "4",
               "--out", tmp_path / "out", "--no-progress") == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["options"]["batch_size"] == 4 and results["lang_sfts"]["es"] == world["lang-es"]
    assert results["languages"] == one_rank_qa[0]["languages"]
    assert not (tmp_path / "ignored").exists()
    (tmp_path / "bad.yaml").write_text("base: x\nbatch: 4\n")
    with pytest.raises(LtsftError, match="unknown key 'batch'; valid keys here: base, batch_size"):
        cli("eval", tmp_path / "bad.yaml")
    with pytest.raises(LtsftError, match="missing --task-sft: give it on the command line or as task_sft:"):
        cli("eval", "--base", world["base"], "--data", f"de={world['squad-de']}", "--out", tmp_path)


def test_nli_accuracy_equals_a_hand_made_evaluation(world, tmp_path):
    from transformers import AutoTokenizer

    results = evaluate(world["base"], world["nli"], {"de": world["xnli"], "es": world["xnli"]},
                       {"de": world["lang-de"]}, options=EvalOptions(max_seq_length=40, batch_size=8),
                       show_progress=False)
    assert results["task"] == "nli"
    tokenizer = AutoTokenizer.from_pretrained(world["base"])
    records = nli.read_xnli_tsv(world["xnli"])
    for lang, settings in (("de", ("task-only", "task+lang")), ("es", ("task-only",))):
        assert set(results["languages"][lang]) == set(settings)
        examples = nli.encode_nli(tokenizer, records.by_language[lang], 40).tensors
        for setting in settings:
            model = AutoModelForSequenceClassification.from_pretrained(world["base"], num_labels=3).eval()
            task = SparseFineTuning.from_pretrained(world["nli"])
            task.apply(model)
            if setting == "task+lang":
                SparseFineTuning.from_pretrained(world["lang-de"]).apply(model, skip_missing_heads=True)
            with torch.no_grad():
                logits = torch.cat([model(**{k: v[b:b + 8] for k, v in examples.items() if k != "labels"}).logits
                                    for b in range(0, 30, 8)])
            expected = 100.0 * accuracy(logits, examples["labels"])
            correct = (logits.argmax(-1) == examples["labels"]).int().tolist()
            assert results["languages"][lang][setting] == {"accuracy": expected, "examples": 30, "correct": correct}
    assert results["languages"]["de"]["task+lang"] != results["languages"]["de"]["task-only"]


@pytest.mark.parametrize("name, lang, data_format, reader", [
    ("xnli.dev.tsv", "sw", "xnli-tsv", lambda path: nli.read_xnli_tsv(path, ["sw"])),
    ("americasnli_dev.tsv", "quy", "americasnli-tsv", lambda path: nli.read_americasnli_tsv(path, ["quy"])),
    ("multinli_sample.jsonl", "en", "multinli-jsonl", lambda path: nli.read_multinli_jsonl(path, "en")),
])
def test_nli_reader_is_chosen_by_extension_and_header(name, lang, data_format, reader, tmp_path):
    path = REPO / "tests" / "fixtures" / "tasks" / name
    expected = reader(path).by_language[lang]
    assert read_eval_data("nli", lang, path) == expected
    assert read_eval_data("nli", lang, path, limit=1) == expected[:1]
    renamed = tmp_path / "data.txt"  # the same rows under a name that does not tell the format
    renamed.write_bytes(path.read_bytes())
    with pytest.raises(LtsftError, match="pass --format"):
        read_eval_data("nli", lang, renamed)
    assert read_eval_data("nli", lang, renamed, data_format) == expected


def test_a_base_without_pooler_loads_the_same_pooler_every_time(tmp_path):
    """(Task SFTs store the pooler densely, so their results never depend on it; see test_train_tasks.)"""
    from ltsft_dist.models import load_task_model

    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=9)).save_pretrained(tmp_path)
    state = torch.get_rng_state()
    first, second = (load_task_model(str(tmp_path), "nli").bert.pooler.dense.weight for _ in range(2))
    assert torch.equal(first, second) and torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------------------------------------- (b) 2 ranks


def _two_rank_eval(argv: list[str]) -> list[tuple[int, int]]:
    """Runs the command; returns (inputs, batches this rank ran) per evaluated setting."""
    import torch.distributed as dist

    from ltsft_dist import evaluation

    assert dist.get_world_size() == 2
    shares, deal = [], evaluation._Runner.my_batches
    evaluation._Runner.my_batches = lambda runner, n: shares.append((n, len(deal(runner, n)))) or deal(runner, n)
    assert cli(*argv) == 0
    return shares


@pytest.mark.slow
@pytest.mark.multirank
def test_two_ranks_give_the_same_numbers_as_one(world, one_rank_qa, tmp_path):
    rank0, rank1 = run_ranks(_two_rank_eval, 2, qa_argv(world, tmp_path))
    # (the first call sizes the progress bar) every setting's batches of 4 windows were split between the ranks
    assert len(rank0) == len(rank1) == 2 * 5
    for (n, mine), (n1, theirs) in zip(rank0[5:], rank1[5:]):
        assert n == n1 and mine + theirs == -(-n // 4) and mine >= theirs >= mine - 1 and theirs > 0
    two = json.loads((tmp_path / "results.json").read_text())
    one, table = one_rank_qa
    assert two["languages"] == one["languages"] and two["average"] == one["average"]
    assert (tmp_path / "results.md").read_text() == table


# ---------------------------------------------------------------------------------------------- (c) export


def test_export_loads_with_plain_transformers_and_matches_in_memory(world, tmp_path):
    from transformers import AutoTokenizer

    assert cli("export", "--base", world["base"], "--sft", world["qa"], "--sft", world["lang-de"], "--task", "qa",
               "-o", tmp_path / "merged") == 0
    exported = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    batch = tokenizer(["wer sieht den hund ?"], ["die kleine katze sieht den hund im garten ."], return_tensors="pt")
    in_memory = AutoModelForQuestionAnswering.from_pretrained(world["base"]).eval()
    plain = exported.bert.encoder.layer[0].output.dense.weight.clone()
    composed, _ = compose(*(SparseFineTuning.from_pretrained(world[name]) for name in ("qa", "lang-de")))
    assert not torch.equal(plain, in_memory.bert.encoder.layer[0].output.dense.weight)  # the export is not θ⁰
    composed.apply(in_memory, skip_missing_heads=True)
    with torch.no_grad():
        got, want = exported(**batch), in_memory(**batch)
    assert torch.equal(got.start_logits, want.start_logits) and torch.equal(got.end_logits, want.end_logits)

    # a language SFT alone as a masked LM: the output embeddings stay θ⁰ (untied), as in its training
    assert cli("export", "--base", world["base"], "--sft", world["lang-de"], "--task", "mlm",
               "-o", tmp_path / "mlm") == 0
    exported = AutoModelForMaskedLM.from_pretrained(tmp_path / "mlm").eval()
    base = BertForMaskedLM.from_pretrained(world["base"]).eval()
    assert torch.equal(exported.cls.predictions.decoder.weight, base.bert.embeddings.word_embeddings.weight)
    assert not torch.equal(exported.bert.embeddings.word_embeddings.weight, base.bert.embeddings.word_embeddings.weight)
    from ltsft_dist.models import untie_output_embeddings

    untie_output_embeddings(base)
    SparseFineTuning.from_pretrained(world["lang-de"]).apply(base)
    with torch.no_grad():
        assert torch.equal(exported(**batch).logits, base(**batch).logits)

    # --overwrite replaces a previous export (here the QA one) and leaves no temporary directory behind
    assert cli("export", "--base", world["base"], "--sft", world["lang-de"], "--task", "mlm",
               "-o", tmp_path / "merged", "--overwrite") == 0
    assert json.loads((tmp_path / "merged" / "ltsft_export.json").read_text())["task"] == "mlm"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "mlm"]


# ---------------------------------------------------------------------------------------------- (d) bad input


def test_bad_input_is_refused_with_the_flag_and_the_fix(world, tmp_path):
    def error(*argv) -> str:
        with pytest.raises(LtsftError) as caught:
            cli(*argv)
        return str(caught.value)

    base = ["eval", "--base", world["base"], "--out", str(tmp_path / "out"), "--no-progress"]
    msg = error(*base, "--task-sft", world["qa"], "--data", f"de={tmp_path / 'nope.json'}")
    assert "--data de=" in msg and "file not found" in msg
    msg = error(*base, "--task-sft", world["qa"], "--data", f"de={world['squad-de']}",
                "--lang-sft", f"es={world['lang-es']}")
    assert "--lang-sft es" in msg and "no --data es" in msg
    msg = error(*base, "--task-sft", world["qa"], "--data", f"de={world['squad-de']}", "--format", "xnli-tsv")
    assert "--format xnli-tsv is an NLI/XNLI_LL format" in msg  # the tasks that read it
    msg = error(*base, "--task-sft", world["qa"], "--data", f"en={world['squad-en']}", "--data",
                f"xx={world['squad-de']}", "--qa-metric", "mlqa")
    assert "--qa-metric mlqa has no rules for ['xx']" in msg
    msg = error(*base, "--task-sft", world["qa"], "--data", world["squad-de"])
    assert "expected LANG=PATH" in msg
    msg = error(*base, "--task-sft", world["lang-de"], "--data", f"de={world['squad-de']}")
    assert f"--task-sft {world['lang-de']}: a language SFT, expected a task SFT" in msg
    msg = error(*base, "--task-sft", str(tmp_path / "missing"), "--data", f"de={world['squad-de']}")
    assert msg.startswith(f"--task-sft: {tmp_path / 'missing'}: not an SFT directory")
    msg = error(*base, "--task-sft", world["nli"], "--task", "qa", "--data", f"de={world['squad-de']}")
    assert "carries no qa head" in msg and "qa_outputs" in msg
    msg = error(*base, "--task-sft", world["qa"], "--data", f"es={world['squad-es']}",
                "--lang-sft", f"es={world['lang-de']}")
    assert "for ['de'], not es" in msg
    other = random_sft(BertForMaskedLM.from_pretrained(world["base"]), "language", ["de"], 9, fingerprint="f" * 64)
    other.save_pretrained(tmp_path / "other")
    msg = error(*base, "--task-sft", world["qa"], "--data", f"de={world['squad-de']}",
                "--lang-sft", f"de={tmp_path / 'other'}")
    assert f"--lang-sft de={tmp_path / 'other'}" in msg and "fingerprint ffffffffffff" in msg
    msg = error("export", "--base", world["base"], "--sft", world["lang-de"], "--task", "qa", "-o", tmp_path / "x")
    assert "no --sft carries the qa head" in msg and not (tmp_path / "x").exists()
    (tmp_path / "taken").mkdir()
    msg = error("export", "--base", world["base"], "--sft", world["qa"], "--task", "qa", "-o", tmp_path / "taken")
    assert "already exists" in msg and "--overwrite" in msg
    assert not (tmp_path / "out").exists()  # nothing was written by any failed run


# ---------------------------------------------------------------------------------------------- (e) XQuAD


@pytest.mark.slow
def test_real_xquad_end_to_end_through_the_cli(tmp_path):
    root = require_shared_data() / "xquad"
    files = {lang: root / f"xquad.{lang}.json" for lang in ("en", "de", "es")}
    texts = sorted({e.context for path in files.values() for e in qa.read_squad_json(path)[:120]})
    base = save_base(tmp_path / "base", texts, vocab_size=2000, max_positions=128)
    random_sft(AutoModelForQuestionAnswering.from_pretrained(base), "task", ["en"], 3).save_pretrained(tmp_path / "qa")
    random_sft(BertForMaskedLM.from_pretrained(base), "language", ["de"], 1).save_pretrained(tmp_path / "de")
    argv = [sys.executable, "-m", "ltsft_dist.cli", "eval", "--base", base, "--task-sft", tmp_path / "qa",
            "--lang-sft", f"de={tmp_path / 'de'}", *[f"--data={lang}={path}" for lang, path in files.items()],
            "--max-seq-length", "128", "--stride", "32", "--limit", "40", "--out", tmp_path / "out"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(a) for a in argv], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["languages"]) == {"en", "de", "es"}
    for lang, settings in results["languages"].items():
        assert set(settings) == ({"task-only", "task+lang"} if lang == "de" else {"task-only"})
        for scores in settings.values():
            assert scores["examples"] == 40 and 0 <= scores["f1"] <= 100 and scores["exact_match"] <= scores["f1"]
            assert 0 <= scores["lost_to_truncation"] < 40
    table = (tmp_path / "out" / "results.md").read_text()
    assert table in done.stdout  # also printed
    assert [row.split("|")[1].strip() for row in table.splitlines()[4:8]] == ["en", "de", "es", "**average**"]


def test_one_typed_eval_config_for_ltsft_eval_and_the_pipeline(tmp_path):
    """`ltsft eval`'s config file and a pipeline's `evaluation` section are one class with one set of defaults,
    read by the typed loader of training configs; the pipeline refuses the keys its stages set."""
    import yaml

    from ltsft_dist.commands.demo import write_demo
    from ltsft_dist.pipeline import load_pipeline

    (tmp_path / "eval.yaml").write_text("batch_size: four\n")
    with pytest.raises(LtsftError, match=r"eval.yaml: batch_size: expected int, got 'four'"):
        load_eval_config(tmp_path / "eval.yaml")
    path = write_demo(tmp_path / "demo")
    evaluation = load_pipeline(path).evaluation
    assert type(evaluation) is EvalConfig and evaluation.max_seq_length == 16  # as the demo config sets it
    assert evaluation.stride == EvalConfig().stride == EvalOptions().stride == 128  # unset: the one default
    data = yaml.safe_load(path.read_text())
    data["evaluation"]["task_sft"] = "elsewhere"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(LtsftError, match="evaluation.task_sft is set by the pipeline"):
        load_pipeline(path)
