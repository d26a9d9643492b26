"""A base may be a hub id or a directory in every stage (train, eval, export, pipeline), offline from a Hugging Face
cache populated here; under a launcher rank 0 downloads first and every rank fails alike, with one message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
import torch
import yaml
from distributed import run_ranks
from huggingface_hub import errors as hub_errors
from pipelines import tiny_pipeline

from ltsft_dist import hub
from ltsft_dist.config import ModelConfig
from ltsft_dist.demo_text import sentences
from ltsft_dist.errors import LtsftError
from ltsft_dist.launch_env import free_port
from ltsft_dist.models import save_tiny_base

HUB_ID = "ltsft-test/tiny-xlmr"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TINY_XLMR = {"vocab_size": 500, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 64, "pad_token_id": 0}


def populate_cache(cache: Path, repo_id: str = HUB_ID) -> Path:
    """The layout `snapshot_download` leaves: models--org--name/refs/main naming a commit whose snapshot holds a
    tiny XLM-R-shaped model and its tokenizer (save_pretrained). Returns the snapshot directory."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    texts = [t for lang in ("en", "de", "es") for t in sentences(lang, 300, seed=1)]
    save_tiny_base(snapshot, ModelConfig(tiny=TINY_XLMR, architecture="xlm-roberta"), texts, seed=0)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def populate_dataset_cache(cache: Path, repo_id: str, config: str, split: str, rows: dict) -> None:
    """The layout `datasets.load_dataset(repo_id, config, split=split)` prepares in HF_DATASETS_CACHE
    (owner___name/config/version/hash: the split's Arrow stream and dataset_info.json), which it reads offline."""
    import datasets
    import pyarrow as pa

    name = repo_id.split("/")[-1]
    dataset = datasets.Dataset.from_dict(rows)
    target = cache / repo_id.replace("/", "___") / config / "0.0.0" / ("0" * 16)
    target.mkdir(parents=True)
    with pa.OSFile(str(target / f"{name}-{split}.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, dataset.data.schema) as writer:
        writer.write_table(dataset.data.table)
    splits = datasets.SplitDict({split: datasets.SplitInfo(split, num_examples=len(dataset), dataset_name=name)})
    datasets.DatasetInfo(features=dataset.features, config_name=config, dataset_name=name,
                         splits=splits).write_to_directory(str(target))


WIKI_ID, WIKI_CONFIG = "ltsft-test/tiny-wiki", "20231101.de"  # shaped like wikimedia/wikipedia


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("hf_home")
    populate_cache(home / "hub")
    text = sentences("de", 600, seed=1)
    populate_dataset_cache(home / "datasets", WIKI_ID, WIKI_CONFIG, "train",
                           {"id": [str(i) for i in range(len(text))], "url": [""] * len(text),
                            "title": [f"t{i}" for i in range(len(text))], "text": text})
    return home


@pytest.fixture
def offline(hf_home, monkeypatch) -> Path:
    """HF_HOME at the populated cache and HF_HUB_OFFLINE=1, in this process and in the processes it starts."""
    for key, value in {"HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"), "HF_HUB_OFFLINE": "1",
                       "HF_DATASETS_CACHE": str(hf_home / "datasets")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return hf_home


def snapshot(home: Path) -> Path:
    return home / "hub" / ("models--" + HUB_ID.replace("/", "--")) / "snapshots" / COMMIT


# ---------------------------------------------------------------------------------------------- the rule


def test_a_directory_is_itself_and_a_hub_id_its_cached_snapshot(offline, tmp_path):
    assert hub.resolve(tmp_path, "--base") == tmp_path
    found = hub.resolve(HUB_ID, "--base")
    assert found == snapshot(offline) and (found / "config.json").is_file() and (found / "model.safetensors").is_file()
    assert hub.hub_id_or_dir("xlm-roberta-base", "--base", "a model directory") == "xlm-roberta-base"


@pytest.mark.parametrize("remote, fetched", [
    ({"config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack",
      "onnx/model.onnx", "tokenizer.json", "sentencepiece.bpe.model"},
     {"config.json", "model.safetensors", "tokenizer.json", "sentencepiece.bpe.model"}),
    ({"config.json", "pytorch_model.bin", "tf_model.h5", "training_args.bin", "vocab.txt"},
     {"config.json", "pytorch_model.bin", "vocab.txt"}),
])
def test_a_model_download_takes_the_pytorch_weights_and_tokenizer_only(monkeypatch, tmp_path, remote, fetched):
    """Model repositories often hold TF/Flax/ONNX copies too; the PyTorch .bin only when there is no safetensors."""
    import fnmatch

    def fake_snapshot(repo_id, allow_patterns, **kwargs):
        directory = tmp_path / "snapshot"
        for name in remote:
            if any(fnmatch.fnmatch(name, pattern) for pattern in allow_patterns):
                (directory / name).parent.mkdir(parents=True, exist_ok=True)
                (directory / name).write_text(name)
        return str(directory)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    found = hub.resolve("owner/model", "--base")
    assert {str(p.relative_to(found)) for p in found.rglob("*") if p.is_file()} == fetched


@pytest.mark.parametrize("name", ["/no/such/dir", "./relative", "~/missing", "a/b/c", "two words"])
def test_a_name_that_is_neither_a_directory_nor_a_hub_id_is_refused(name):
    with pytest.raises(LtsftError, match=r"--base .*: not a model directory \(and not a hub id"):
        hub.resolve(name, "--base")


def test_a_file_is_not_a_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(LtsftError, match="not an SFT directory"):
        hub.resolve(tmp_path / "config.json", kind="an SFT directory")


def test_a_repository_missing_offline_says_the_hub_is_unreachable_and_not_cached(offline):
    with pytest.raises(LtsftError) as err:
        hub.resolve("ltsft-test/not-there", "--base")
    message = str(err.value)
    assert message.startswith("--base 'ltsft-test/not-there' is not a local directory, and downloading it from the "
                              "Hugging Face hub failed: the hub cannot be reached and it is not in the local cache")
    assert "HF_HUB_OFFLINE" in message


def _http_error(cls, status: int):
    request = httpx2.Request("GET", "https://huggingface.co/api/models/o/n")
    return cls(f"{status} for url", response=httpx2.Response(status, request=request))


@pytest.mark.parametrize("err, kind", [
    (_http_error(hub_errors.RepositoryNotFoundError, 404), "not found on the hub"),
    (_http_error(hub_errors.GatedRepoError, 403), "access denied to a gated or private repository"),
    (_http_error(hub_errors.HfHubHTTPError, 401), "access denied to a gated or private repository"),
    (_http_error(hub_errors.RevisionNotFoundError, 404), "no such revision"),
    (hub_errors.LocalEntryNotFoundError("cannot find"), "the hub cannot be reached and it is not in the local cache"),
    (ValueError("BuilderConfig 'xx' not found"), "the dataset has no such config or split"),
    (RuntimeError("disk on fire"), "unexpected error"),
])
def test_each_kind_of_failure_is_named_with_its_fix(err, kind):
    message = hub.explain(err, "X failed")
    assert message.startswith(f"X failed: {kind} ({type(err).__name__}: ")
    assert ("check the language code" in message) == ("config" in kind)  # only where a language code is the cause


# ---------------------------------------------------------------------------------------------- rank 0 first


def _fetch_on_ranks(empty_cache: str):
    """On every rank: a cached model (recording how each rank called the hub) and a cached dataset (when each
    rank read it), a missing model and a missing dataset (rank 0's failure on every rank), and a cache rank 1
    cannot see."""
    import time

    import datasets

    from ltsft_dist import comm
    from ltsft_dist.config import SourceConfig
    from ltsft_dist.tasks._io import load_hf_dataset
    from ltsft_dist.training_data import read_source

    calls = []
    real = huggingface_hub.snapshot_download

    def spy(repo_id, **kwargs):
        calls.append(kwargs.get("local_files_only", False))
        return real(repo_id, **kwargs)

    huggingface_hub.snapshot_download = spy
    found = str(hub.resolve(HUB_ID, "--base"))
    loads, load = [], datasets.load_dataset
    datasets.config.HF_HUB_OFFLINE = False  # as online: rank 0 asks the hub (here refused: HF_HUB_OFFLINE=1 for it)

    def timed_load(*args, **kwargs):
        start, offline = time.time(), datasets.config.HF_HUB_OFFLINE
        dataset = load(*args, **kwargs)
        loads.append((start, time.time(), offline))
        return dataset

    datasets.load_dataset = timed_load
    text = list(read_source(SourceConfig(language="de", hf_dataset=WIKI_ID, hf_config=WIKI_CONFIG), "mlm").records)
    read = (loads[0], text)
    messages = {}
    attempts = {"model": lambda: hub.resolve("ltsft-test/missing", "--base"),
                "dataset": lambda: load_hf_dataset("ltsft-test/missing-data", "xx", "train")}
    for name, attempt in attempts.items():
        try:
            attempt()
            messages[name] = None
        except LtsftError as err:
            messages[name] = str(err)
    if comm.rank() == 1:  # a node whose HF_HOME is not the one rank 0 filled
        huggingface_hub.constants.HF_HUB_CACHE = empty_cache
    try:
        hub.resolve(HUB_ID, "--base")
        messages["unshared"] = None
    except LtsftError as err:
        messages["unshared"] = str(err)
    return found, calls, read, messages


@pytest.mark.slow
@pytest.mark.multirank
def test_rank_0_downloads_first_and_its_failure_reaches_every_rank_as_one_message(offline, tmp_path):
    (tmp_path / "empty").mkdir()
    ranks = run_ranks(_fetch_on_ranks, 2, str(tmp_path / "empty"), timeout=600)
    (found0, calls0, read0, messages0), (found1, calls1, read1, messages1) = ranks
    assert found0 == found1 == str(snapshot(offline))
    assert calls0[0] is False and calls1[0] is True  # rank 0 may use the hub; rank 1 reads the cache only
    assert read1[1] == read0[1] == sentences("de", 600, seed=1)
    assert read1[0][0] >= read0[0][1]  # rank 1 loaded the dataset only once rank 0 had it,
    assert (read0[0][2], read1[0][2]) == (False, True)  # from the cache alone
    assert messages0 == messages1  # the same message on both ranks, for every failure
    assert messages0["model"].startswith("--base 'ltsft-test/missing' is not a local directory, and downloading it "
                                         "from the Hugging Face hub failed: the hub cannot be reached")
    assert messages0["dataset"].startswith("load_dataset('ltsft-test/missing-data', 'xx', split='train') failed: "
                                           "the hub cannot be reached")
    assert "check the language code" not in messages0["dataset"]
    assert "(on rank 1, from the cache rank 0 filled" in messages0["unshared"] and "HF_HOME" in messages0["unshared"]


def _slow_download(seconds: float, heartbeat: float):
    """Rank 0's fetch outlasts the process group's timeout; the others return what they read afterwards."""
    import time

    hub.HEARTBEAT_S = heartbeat
    marker = []

    def fetch(local_only: bool):
        if not local_only:
            time.sleep(seconds)
        marker.append(local_only)
        return local_only

    return hub.rank_zero_first(fetch, "slow"), marker


@pytest.mark.slow
@pytest.mark.multirank
def test_a_download_longer_than_the_collective_timeout_keeps_the_others_waiting(monkeypatch):
    monkeypatch.setenv("LTSFT_DIST_TIMEOUT_S", "6")
    assert run_ranks(_slow_download, 2, 15.0, 0.5, timeout=300) == [(False, [False]), (True, [True])]


# ---------------------------------------------------------------------------------------------- every stage


def _ltsft(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID")}
    env.update(OMP_NUM_THREADS="1", LTSFT_DIST_TIMEOUT_S="120", MASTER_PORT=str(free_port()))
    result = subprocess.run([sys.executable, "-m", "ltsft_dist.cli", *args], capture_output=True, text=True,
                            timeout=900, env=env, cwd=cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _nli_files(directory: Path) -> dict[str, Path]:
    """XNLI-format TSVs of the tests' parallel NLI pairs: English training pairs, English and German test pairs."""
    from ltsft_dist.demo_text import nli_examples

    files = {"train": ("nli.en.tsv", "en", 1200, 2), "test.en": ("nli_test.en.tsv", "en", 300, 3),
             "test.de": ("nli_test.de.tsv", "de", 300, 3), "train.de": ("nli.de.tsv", "de", 1200, 2)}
    (directory / "data").mkdir(parents=True, exist_ok=True)
    for name, lang, n, seed in files.values():
        rows = ["language\tgold_label\tsentence1\tsentence2\tpairID"]
        rows += [f"{lang}\t{label}\t{p}\t{h}\t{lang}-{seed}-{i}"
                 for i, (p, h, label) in enumerate(nli_examples(lang, n, seed=seed))]
        (directory / "data" / name).write_text("\n".join(rows) + "\n", encoding="utf-8")
    return {key: directory / "data" / name for key, (name, *_) in files.items()}


@pytest.mark.slow
def test_train_eval_and_export_take_a_hub_id_as_the_base(offline, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ltsft_dist.evaluation import EvalOptions, evaluate
    from ltsft_dist.export import PROVENANCE, export_merged
    from ltsft_dist.sft import SparseFineTuning

    files = _nli_files(tmp_path)
    out = tmp_path / "task"
    config = {"kind": "task", "task": "nli", "output_dir": str(out), "languages": ["en"], "density": 0.05,
              "model": {"name_or_path": HUB_ID}, "data": {"train_file": str(files["train"]), "max_seq_length": 40},
              "phase1": {"steps": 3, "lr": 1e-3}, "phase2": {"steps": 3, "lr": 1e-3},
              "batch_size": 8, "micro_batch_size": 8, "deepspeed": "zero2.json", "log_every": 2}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    _ltsft("train", str(tmp_path / "run.yaml"))
    sft = SparseFineTuning.from_pretrained(out / "sft")
    assert sft.metadata.base_model == HUB_ID and sft.nnz > 0
    assert AutoTokenizer.from_pretrained(out / "tokenizer").get_vocab() == \
        AutoTokenizer.from_pretrained(snapshot(offline)).get_vocab()  # the hub base's tokenizer, not a new one

    data = {"en": str(files["test.en"]), "de": str(files["test.de"])}
    options = EvalOptions(max_seq_length=40, limit=24, batch_size=8)
    by_id = evaluate(HUB_ID, str(out / "sft"), data, task="nli", options=options, show_progress=False)
    by_dir = evaluate(str(snapshot(offline)), str(out / "sft"), data, task="nli", options=options,
                      show_progress=False)
    assert by_id["base"] == HUB_ID  # the base fingerprint matched: the SFT was trained on this base
    assert by_id["languages"] == by_dir["languages"] and by_id["languages"]["en"]["task-only"]["examples"] == 24

    merged = export_merged(HUB_ID, [str(out / "sft")], "nli", tmp_path / "merged")
    again = export_merged(str(snapshot(offline)), [str(out / "sft")], "nli", tmp_path / "merged-dir")
    assert json.loads((merged / PROVENANCE).read_text())["base"] == HUB_ID
    a, b = (AutoModelForSequenceClassification.from_pretrained(d).state_dict() for d in (merged, again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (merged / "tokenizer.json").is_file()


@pytest.mark.slow
@pytest.mark.multirank
def test_a_pipeline_on_a_hub_base_runs_every_stage_offline(offline, tmp_path):
    """At W=2, a hub base and one language's text from a hub dataset, as in the paper's configs."""
    from ltsft_dist.export import export_merged
    from ltsft_dist.pipeline import load_pipeline, plan

    config = tiny_pipeline(tmp_path, base={"name_or_path": HUB_ID}, ranks=2)
    _nli_files(tmp_path)
    data = yaml.safe_load(config.read_text())
    data["languages"] = {"de": {"hf_dataset": WIKI_ID, "hf_config": WIKI_CONFIG, "split": "train"}}
    data["language_sft"]["eligibility"] = {}  # the paper's: the hub base's output embedding is its own matrix
    data["task_sft"].update(task="nli", eligibility={})
    data["task_sft"]["data"] = {"sources": [{"language": "de", "train_file": "data/nli.de.tsv"}], "max_seq_length": 40}
    data["evaluation"]["max_seq_length"] = 40
    data["evaluation"]["data"] = {"de": "data/nli_test.de.tsv"}
    data["evaluation"]["limit"] = 16
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    stages = {s.name: s for s in plan(load_pipeline(config))}
    assert list(stages) == ["lang:de", "task", "eval"] and stages["eval"].config["base"] == HUB_ID
    assert stages["lang:de"].config["data"]["sources"][0]["hf_dataset"] == WIKI_ID  # text from the hub cache too
    result = _ltsft("pipeline", str(config), "--master-port", str(free_port()))
    assert all(s.done for s in stages.values()), result.stdout[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["base"] == HUB_ID and results["languages"]["de"]["task+lang"]["examples"] == 16
    merged = export_merged(HUB_ID, [str(stages["task"].directory / "sft"), str(stages["lang:de"].directory / "sft")],
                           "nli", tmp_path / "merged")
    assert (merged / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- the paper's pipelines

PAPER_RUN = """
import sys
from ltsft_dist.export import export_merged
from ltsft_dist.pipeline import load_pipeline, mark_done, plan, run_stage_here

config = load_pipeline(sys.argv[1])
stages = plan(config)
for stage in stages:
    stage.directory.mkdir(parents=True, exist_ok=True)
    assert run_stage_here(config, stage, 0) == 0, stage.name
    mark_done(stage)
by_name = {s.name: s for s in stages}
target = sorted(config.evaluation.data)[0]
export_merged(config.base.name_or_path, [str(by_name["task"].directory / "sft"),
                                         str(by_name["lang:" + target].directory / "sft")],
              config.task_sft["task"], sys.argv[2])
"""


def _paper_data(root: Path, home: Path, config: dict) -> None:
    """Tiny stand-ins, in the formats the paper config names, for its hub datasets (in the offline cache) and its
    local files (beside the config)."""
    from ltsft_dist.demo_text import nli_examples

    text = sentences("en", 200, seed=1) + sentences("de", 200, seed=1)
    for source in list(config["languages"].values()) + config["task_sft"]["data"]["sources"]:
        if source.get("train_file"):
            path = root / source["train_file"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(text) + "\n")
            continue
        name, subset, split = source["hf_dataset"], source.get("hf_config"), source["split"]
        where = home / "datasets" / name.replace("/", "___") / (subset or "default")
        if where.exists():
            continue
        if config["task_sft"]["task"] == "nli" and name != "wikimedia/wikipedia":
            pairs = nli_examples("en", 64, seed=2)
            rows = {"premise": [p for p, _, _ in pairs], "hypothesis": [h for _, h, _ in pairs],
                    "label": [label for _, _, label in pairs]}
        elif name != "wikimedia/wikipedia":  # squad-like
            contexts = sentences("en", 64, seed=2)
            words = [c.split()[1] for c in contexts]
            rows = {"id": [f"q{i}" for i in range(64)], "title": ["t"] * 64, "context": contexts,
                    "question": [f"who {c.split()[0]}" for c in contexts],
                    "answers": [{"text": [w], "answer_start": [c.index(w)]} for w, c in zip(words, contexts)]}
        else:
            rows = {"id": [str(i) for i in range(len(text))], "url": [""] * len(text),
                    "title": ["t"] * len(text), "text": text}
        populate_dataset_cache(home / "datasets", name, subset or "default", split, rows)
    for language, path in config["evaluation"]["data"].items():
        path = root / path
        path.parent.mkdir(parents=True, exist_ok=True)
        if config["task_sft"]["task"] == "nli":  # AmericasNLI's test.tsv: all languages in one file
            rows = ["id\tlanguage\tpremise\thypothesis\tlabel"]
            rows += [f"{lang}{i}\t{lang}\t{p}\t{h}\t{label}" for lang in config["evaluation"]["data"]
                     for i, (p, h, label) in enumerate(nli_examples("en", 8, seed=3))]
            path.write_text("\n".join(rows) + "\n")
        else:  # XQuAD's SQuAD-format JSON
            contexts = sentences("en", 8, seed=3)
            paragraphs = [{"context": c, "qas": [{"id": f"{language}{i}", "question": f"who {c.split()[0]}",
                                                  "answers": [{"text": c.split()[1],
                                                               "answer_start": c.index(c.split()[1])}]}]}
                          for i, c in enumerate(contexts)]
            path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["paper_qa_xquad", "paper_nli_americasnli"])
def test_the_paper_pipelines_run_every_stage_on_a_tiny_hub_cached_xlmr(offline, tmp_path, monkeypatch, name):
    """Each paper config as shipped (its stages, languages, hub ids for the base and the data, file formats), with
    only the sizes cut (steps, K, lengths, bf16 off): every stage's plan runs offline from the HF cache, then the
    export. The base's hub id is the config's own: `xlm-roberta-base`, cached here as a tiny XLM-R."""
    import shutil

    from transformers import AutoConfig

    from ltsft_dist.pipeline import load_pipeline, plan

    paper = yaml.safe_load((Path(__file__).resolve().parents[1] / "ltsft_dist" / "configs" / f"{name}.yaml")
                           .read_text())
    home = tmp_path / "hf"
    shutil.copytree(offline, home)
    for key, value in {"HF_HOME": home, "HF_HUB_CACHE": home / "hub", "HF_DATASETS_CACHE": home / "datasets"}.items():
        monkeypatch.setenv(key, str(value))
    populate_cache(home / "hub", paper["base"]["name_or_path"])
    small = {"phase1": {"steps": 2, "lr": 1e-3}, "phase2": {"steps": 2, "lr": 1e-3}, "density": 0.05,
             "batch_size": 8, "micro_batch_size": 8, "deepspeed": "zero2.json", "checkpoint_every": 100}
    for key in ("language_sft", "task_sft"):
        paper[key].pop("k")
        paper[key].update(small)
    paper["language_sft"]["data"].update(max_seq_length=32, eval_every=2)
    paper["task_sft"]["data"].update(max_seq_length=48, **({"doc_stride": 16, "max_query_length": 16}
                                                           if paper["task_sft"]["task"] == "qa" else {}))
    paper["evaluation"].update(max_seq_length=48, batch_size=8, limit=8,
                               **({"stride": 16} if paper["task_sft"]["task"] == "qa" else {}))
    _paper_data(tmp_path, home, paper)
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(paper, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID")}
    done = subprocess.run([sys.executable, "-c", PAPER_RUN, str(config), str(tmp_path / "merged")], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stages = plan(load_pipeline(config))
    assert all(s.done for s in stages) and len(stages) == len(paper["languages"]) + 2
    results = json.loads((stages[-1].directory / "results.json").read_text())
    assert results["base"] == "xlm-roberta-base"
    assert set(results["languages"]) == set(paper["evaluation"]["data"])
    assert all(set(by) == {"task+lang", "task-only"} for by in results["languages"].values())
    assert AutoConfig.from_pretrained(tmp_path / "merged").model_type == "xlm-roberta"
