"""`ltsft train` on every task: NLI and extractive QA task SFTs, multi-source training with language SFTs
swapped in per step, the held-out eval loss and the best φ by it; config errors for the data section."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import require_shared_data
from sfts import random_sft

from ltsft_dist import launch_env
from ltsft_dist.config import PACKAGE_DS_CONFIGS, ModelConfig, load_config
from ltsft_dist.demo_text import sentences
from ltsft_dist.errors import LtsftError
from ltsft_dist.heldout import HeldOut
from ltsft_dist.models import build_model, save_tiny_base
from ltsft_dist.sft import SparseFineTuning
from ltsft_dist.training_data import encode_sources, read_sources

REPO = Path(__file__).resolve().parents[1]
TINY = {"vocab_size": 600, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 128}


def write_config(directory: Path, config: dict) -> Path:
    path = directory / "run.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def train(config_path: Path, ranks: int = 1) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", LTSFT_DIST_TIMEOUT_S="120", MASTER_PORT=str(launch_env.free_port()),
               VENV=sys.prefix)
    if ranks == 1:
        command = [sys.executable, "-m", "ltsft_dist.cli", "train", str(config_path)]
    else:
        command = ["bash", str(REPO / "launch" / "local.sh"), str(ranks), str(config_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def base_config(out: Path, **extra) -> dict:
    return {"kind": "task", "output_dir": str(out), "density": 0.05,
            "phase1": {"steps": 3, "lr": 1e-3}, "phase2": {"steps": 4, "lr": 1e-3},
            "batch_size": 8, "micro_batch_size": 4, "deepspeed": "zero2.json", "log_every": 2, **extra}


def nli_tsv(path: Path, languages: list[str], n: int = 48) -> Path:
    """An XNLI-1.0-style TSV (all languages in one file) from the generated demo sentences."""
    rows = ["language\tgold_label\tsentence1\tsentence2\tpairID"]
    for lang in languages:
        text = sentences(lang, 2 * n, seed=3)
        for i in range(n):
            label = ("entailment", "neutral", "contradiction")[i % 3]
            rows.append(f"{lang}\t{label}\t{text[2 * i]}\t{text[2 * i + (i % 3 != 0)]}\t{lang}{i}")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def held_out_loss_of(run_config: Path, sft_dir: Path, tokenizer_dir: Path, base_sfts=()) -> float:
    """The held-out loss of base (+ language SFTs) + the trained SFT, recomputed in this process."""
    from transformers import AutoTokenizer

    config = load_config(run_config)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    data = encode_sources(config, tokenizer, read_sources(config))
    model = build_model(config.model, config.task, num_labels=len(data.labels) if data.labels else None,
                        vocab_size=len(tokenizer), seed=config.seed)
    SparseFineTuning.from_pretrained(sft_dir).apply(model)
    for sft in base_sfts:
        sft.apply(model, skip_missing_heads=True)
    return HeldOut(data.held_out, 4, 0, 1).loss(model)["all"]


@pytest.mark.slow
def test_nli_task_sft_from_an_xnli_tsv_keeps_the_best_phi_by_held_out_loss(tmp_path):
    out = tmp_path / "out"
    config = base_config(out, task="nli", languages=["de"],
                         model={"tiny": TINY},
                         data={"train_file": str(nli_tsv(tmp_path / "xnli.tsv", ["en", "de"])), "max_seq_length": 48,
                               "eval_fraction": 0.25, "eval_every": 1})
    config["phase2"] = {"steps": 6, "lr": 3e-3}
    path = write_config(tmp_path, config)
    result = train(path)
    assert "data [de]: train_records=36, held_out_records=12" in result.stdout
    sft = SparseFineTuning.from_pretrained(out / "sft")
    results = json.loads((out / "results.json").read_text())
    assert sft.metadata.kind == "task" and sft.metadata.languages == ["de"]
    # the classifier and the pooler (which the tiny base, an MLM checkpoint, lacks) are the dense head
    assert sorted(sft.heads) == ["bert.pooler.dense.bias", "bert.pooler.dense.weight", "classifier.bias",
                                 "classifier.weight"] and sft.heads["classifier.bias"].shape == (3,)
    assert sft.nnz <= results["k"]
    evals = results["eval_losses"]["phase2"]
    assert [e["step"] for e in evals] == [1, 2, 3, 4, 5, 6]
    best = min(evals, key=lambda e: e["all"])
    assert results["best_eval"] == {"step": best["step"], "loss": best["all"]}
    # φ is the best evaluation's: recomputing the held-out loss of θ⁰ + φ gives that loss.
    assert held_out_loss_of(path, out / "sft", out / "tokenizer") == pytest.approx(best["all"], rel=1e-5)


@pytest.fixture(scope="module")
def xquad_base(tmp_path_factory):
    """A tiny base (model + tokenizer) over the English and German XQuAD text, and random language SFTs."""
    xquad = require_shared_data() / "xquad"
    from ltsft_dist.tasks.qa import read_squad_json

    d = tmp_path_factory.mktemp("xquad")
    files = {}
    texts = []
    for lang in ("en", "de"):
        examples = read_squad_json(xquad / f"xquad.{lang}.json")[:120]  # the first articles: enough for a few steps
        files[lang] = d / f"xquad.{lang}.json"
        paragraphs: dict[str, list] = {}
        for ex in examples:
            paragraphs.setdefault(ex.context, []).append(
                {"id": ex.id, "question": ex.question, "answers": ex.answers})
        files[lang].write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": [
            {"context": c, "qas": qas} for c, qas in paragraphs.items()]}]}, ensure_ascii=False), encoding="utf-8")
        texts += list(paragraphs) + [ex.question for ex in examples]
    save_tiny_base(d / "base", ModelConfig(tiny=TINY), texts, seed=5)
    mlm = build_model(ModelConfig(name_or_path=str(d / "base")), "mlm")
    sfts = {}
    for i, lang in enumerate(("en", "de")):
        sfts[lang] = random_sft(mlm, density=0.02, seed=10 + i, languages=[lang])
        sfts[lang].save_pretrained(d / f"lang_{lang}")
    return d, files, sfts


@pytest.mark.slow
@pytest.mark.multirank
def test_multisource_qa_on_xquad_swaps_language_sfts_on_two_ranks(xquad_base, tmp_path):
    d, files, sfts = xquad_base
    out = tmp_path / "out"
    config = base_config(out, task="qa", model={"name_or_path": str(d / "base")},
                         data={"sources": [{"language": lang, "train_file": str(files[lang])} for lang in ("en", "de")],
                               "max_seq_length": 96, "doc_stride": 32, "max_query_length": 24,
                               "eval_fraction": 0.1},
                         language_sfts={lang: str(d / f"lang_{lang}") for lang in ("en", "de")},
                         sampling={"policy": "uniform"})
    path = write_config(tmp_path, config)
    result = train(path, ranks=2)
    assert "data [en]:" in result.stdout and "data [de]:" in result.stdout
    sft = SparseFineTuning.from_pretrained(out / "sft")
    results = json.loads((out / "results.json").read_text())
    assert sft.metadata.kind == "task" and sft.metadata.languages == ["en", "de"]
    assert sorted(sft.heads) == ["qa_outputs.bias", "qa_outputs.weight"]
    assert results["frozen_drift"] == 0 and sft.nnz <= results["k"]
    assert sft.metadata.training_config["language_sfts"]["de"] == str(d / "lang_de")
    # the held-out loss is evaluated with each language's SFT active: recomputed here the same way
    per_language = results["eval_losses"]["phase2"][-1]
    from transformers import AutoTokenizer

    cfg = load_config(path)
    tokenizer = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    data = encode_sources(cfg, tokenizer, read_sources(cfg))
    model = build_model(cfg.model, "qa")
    sft.apply(model)
    for lang in ("en", "de"):
        sfts[lang].apply(model, skip_missing_heads=True)
        loss = HeldOut({lang: data.held_out[lang]}, 4, 0, 1).loss(model)[lang]
        sfts[lang].revert(model)
        assert loss == pytest.approx(per_language[lang], rel=1e-4), lang
    # and on to zero-shot evaluation on the real XQuAD files: the trained task SFT with each language's SFT
    evaluation = subprocess.run(
        [sys.executable, "-m", "ltsft_dist.cli", "eval", "--base", str(d / "base"), "--task-sft", str(out / "sft"),
         "--lang-sft", f"de={d / 'lang_de'}", "--data", f"de={files['de']}", "--data", f"en={files['en']}",
         "--max-seq-length", "96", "--stride", "32", "--max-query-length", "24", "--limit", "30", "--out",
         str(tmp_path / "eval"), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    scores = json.loads((tmp_path / "eval" / "results.json").read_text())["languages"]
    assert scores["de"]["task+lang"]["examples"] == scores["en"]["task-only"]["examples"] == 30
    assert "task+lang" not in scores["en"]  # no English language SFT was given for evaluation
    assert all(0 <= scores[lang]["task-only"]["f1"] <= 100 for lang in ("de", "en"))


@pytest.mark.parametrize("change, message", [
    (lambda c: c["data"].update(sources=[{"language": "en", "train_file": "a.txt"}]), "give exactly one of data.train_file"),
    (lambda c: c.update(task="qa"), "task: language SFTs train task mlm"),
    (lambda c: c.update(language_sfts={"en": "x"}), "language_sfts: language SFTs are activated while training task"),
    (lambda c: c["data"].update(eval_fraction=1.5), "data.eval_fraction: must lie in [0, 1)"),
    (lambda c: c["data"].update(format="csv"), "data.train_file.format: 'csv' is not one of"),
])
def test_data_section_errors_name_the_key(tmp_path, change, message):
    config = {"kind": "language", "model": {"tiny": TINY}, "density": 0.1, "data": {"train_file": "en.txt"}}
    change(config)
    with pytest.raises(LtsftError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(write_config(tmp_path, config))


def test_task_config_errors_before_training(tmp_path):
    tsv = nli_tsv(tmp_path / "x.tsv", ["en"])
    config = base_config(tmp_path / "o", task="nli", model={"tiny": TINY},
                         data={"sources": [{"language": "en", "train_file": str(tsv)},
                                           {"language": "en", "train_file": str(tsv)}]})
    with pytest.raises(LtsftError, match="a language appears twice"):
        load_config(write_config(tmp_path, config))
    config["data"]["sources"][1]["language"] = "de"
    config["language_sfts"] = {"fr": "somewhere"}
    with pytest.raises(LtsftError, match="language_sfts: 'fr' is not a source language"):
        load_config(write_config(tmp_path, config))
    config["language_sfts"] = {}
    from ltsft_dist.training_data import read_sources as read

    config["data"]["sources"][1]["train_file"] = str(tmp_path / "missing.tsv")
    with pytest.raises(LtsftError, match=r"missing.tsv: training file not found \(language 'de'\)"):
        read(load_config(write_config(tmp_path, config)))
    config["data"]["sources"][1]["train_file"] = str(tsv)

    with pytest.raises(LtsftError, match=r"no labelled examples for language\(s\) \['de'\]; the file has \['en'\]"):
        read(load_config(write_config(tmp_path, config)))


def test_held_out_loss_does_not_depend_on_the_world_size():
    """Rank shards of the held-out set, with the padding rows weighted 0, add up to the 1-process loss."""
    from scenarios import mlm_examples, tiny_model

    from ltsft_dist.tasks.mlm import fixed_masks

    examples = fixed_masks(mlm_examples(n=13))
    model = tiny_model("language")
    single = HeldOut({"x": examples}, 4, 0, 1).loss(model)["x"]
    totals = []
    for rank in range(3):
        h = HeldOut({"x": examples}, 4, rank, 1)
        h.world = 3  # shard as rank `rank` of 3, without a process group
        batches = list(h._batches(examples))
        assert len(batches) == 2  # ceil(13 / (3 * 4)): every rank runs the same number of forward passes
        for batch, weight in batches:
            count = int((batch["labels"] != -100).sum()) * weight
            if count:
                totals.append((model(**batch).loss.item() * count, count))
    assert sum(t for t, _ in totals) / sum(c for _, c in totals) == pytest.approx(single, rel=1e-6)


def test_relative_paths_are_taken_from_the_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    (folder / "lang_de").mkdir(parents=True)
    for name in ("en.txt", "de.tsv", "ds.json"):
        (folder / name).write_text("x\n")
    single = {"kind": "language", "model": {"tiny": TINY}, "density": 0.1, "data": {"train_file": "en.txt"},
              "deepspeed": "ds.json"}
    multi = base_config(tmp_path / "o", task="nli", model={"tiny": TINY}, language_sfts={"de": "lang_de"},
                        data={"sources": [{"language": "de", "train_file": "de.tsv"},
                                          {"language": "en", "train_file": "elsewhere.tsv"}]})
    monkeypatch.chdir(tmp_path)  # not the config's folder
    seen = []
    for config in (single, multi):
        (folder / "run.yaml").write_text(yaml.safe_dump(config))
        seen.append(load_config(folder / "run.yaml"))
    assert seen[0].data.train_file == str(folder / "en.txt")
    assert seen[0].deepspeed_path() == folder / "ds.json"
    assert seen[1].deepspeed_path() == PACKAGE_DS_CONFIGS / "zero2.json"  # a name: the packaged config
    assert [s.train_file for s in seen[1].data.sources] == [str(folder / "de.tsv"), "elsewhere.tsv"]  # kept as given
    assert seen[1].language_sfts == {"de": str(folder / "lang_de")}
