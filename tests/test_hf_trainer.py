"""The transformers Trainer integration (`ltsft_dist.integrations.hf`) against `ltsft train`'s recipe.

The same tiny model, data (ltsft `Examples`, fed in `StepOrder`'s order by the Trainer), seed, AdamW, schedule
and clipping on both sides: the masks must be identical and φ equal within float32 rounding.
"""

from __future__ import annotations

import copy
import functools
import re
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from distributed import run_ranks
from scenarios import classification_examples, language_sfts, mlm_examples, task_config, tiny_model
from ltsft_dist.config import PhaseConfig
from ltsft_dist.errors import LtsftError
from ltsft_dist.multisource import MultiSourceOrder, SamplingConfig

PHASE = PhaseConfig(steps=6, lr=3e-3, warmup_steps=2)  # both phases: the Trainer's warm-up applies to each


def _config(stage: int, world_size: int, **overrides):
    cfg = task_config(f"zero{stage}.json", phase1=PHASE, phase2=copy.deepcopy(PHASE), **overrides)
    cfg.micro_batch_size = cfg.batch_size // world_size
    return cfg


class Crash(Exception):
    pass


def _trainer(cfg, output_dir: str, examples=None, accumulation: int = 1, save_steps: int = 0, crash_at: int = 0,
             language_sfts=None):
    """The LTSFTTrainer of `cfg`'s setup (its DeepSpeed file, batch split, optimizer settings, schedule). MLM's
    per-token loss is averaged over the step's tokens on all ranks, as `ltsft train` does (`token_mean_loss` with
    `average_tokens_across_devices`); a classifier's mean loss is only left unscaled without the latter (README)."""
    from transformers import TrainerCallback, TrainingArguments

    from accelerate.state import AcceleratorState

    from ltsft_dist.config import PACKAGE_DS_CONFIGS
    from ltsft_dist.engine import read_ds_config
    from ltsft_dist.integrations.hf import LTSFTArguments, LTSFTTrainer, join_process_group, token_mean_loss

    AcceleratorState._reset_state()  # each case its own DeepSpeed plugin (the process group stays)
    join_process_group()
    ds = read_ds_config(PACKAGE_DS_CONFIGS / cfg.deepspeed)
    bf16 = (ds.get("bf16") or {}).get("enabled") is True
    if bf16:  # TrainingArguments fills "auto" with its bf16=False here: a DeepSpeed bf16=true would mismatch it
        ds["bf16"]["enabled"] = "auto"

    class CrashAt(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if crash_at and state.global_step == crash_at:
                raise Crash(state.global_step)

    args = TrainingArguments(
        output_dir=output_dir, deepspeed=ds,
        per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=cfg.phase1.lr, warmup_steps=cfg.phase1.warmup_steps, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, max_steps=cfg.phase1.steps + cfg.phase2.steps,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, report_to=[],
        logging_steps=1, disable_tqdm=True, average_tokens_across_devices=accumulation > 1,
        accelerator_config={"use_configured_state": True})
    if bf16:  # what TrainingArguments(bf16=True) gives DeepSpeed on a GPU; on a CPU transformers refuses bf16=True
        # unless use_cpu, which turns DeepSpeed off
        args.hf_deepspeed_config.config["bf16"]["enabled"] = True
        args.hf_deepspeed_config._dtype = torch.bfloat16
    ltsft = LTSFTArguments(sft_kind=cfg.kind, density=cfg.density, phase1_steps=cfg.phase1.steps,
                           phase2_steps=cfg.phase2.steps, language_sfts=language_sfts,
                           sampling=cfg.sampling.policy, sampling_temperature=cfg.sampling.temperature)
    return LTSFTTrainer(model=tiny_model(cfg.kind), args=args,
                        train_dataset=classification_examples() if examples is None else examples,
                        compute_loss_func=token_mean_loss if getattr(examples, "mlm", None) else None,
                        ltsft_args=ltsft, callbacks=[CrashAt()])


def _result(sft, stats) -> dict | None:
    return None if sft is None else {"diffs": sft.diffs, "heads": sft.heads, "frozen_drift": stats.frozen_drift}


def _accelerate_run(cfg, world_size: int):
    """The same run as a custom accelerate loop with the `LTSFT` helper, fed ltsft's batches in ltsft's order."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DeepSpeedPlugin

    from ltsft_dist import comm
    from ltsft_dist.data import StepOrder
    from ltsft_dist.engine import ds_config_for
    from ltsft_dist.integrations.hf import LoopArguments, LTSFT, LTSFTArguments, join_process_group

    AcceleratorState._reset_state()
    join_process_group()
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config_for(cfg, world_size)))
    loop = LoopArguments(max_steps=cfg.phase1.steps + cfg.phase2.steps, learning_rate=cfg.phase1.lr,
                         per_device_train_batch_size=cfg.micro_batch_size, warmup_steps=cfg.phase1.warmup_steps,
                         weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, seed=cfg.seed)
    ltsft = LTSFT(tiny_model(cfg.kind), LTSFTArguments(sft_kind=cfg.kind, density=cfg.density,
                                                       phase1_steps=cfg.phase1.steps), loop, accelerator)
    model, optimizer, scheduler = ltsft.prepare(ltsft.tuner.model)
    order = StepOrder(classification_examples(), cfg.batch_size, cfg.micro_batch_size, comm.rank(), world_size,
                      cfg.seed)
    for step in range(ltsft.total_steps):
        batch = {k: v.to(accelerator.device) for k, v in order.batch_at(ltsft.tuner.phase_at(step)[2], 0).items()}
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)
        scheduler.step()
    return _result(ltsft.finish(), ltsft.tuner.stats)


# Multi-source NLI-shaped classification: two source languages of different sizes (so the sampling policy matters)
SOURCES = {"de": (48, 1), "en": (36, 11)}  # language -> (examples, seed)
SAMPLING = SamplingConfig(policy="temperature", temperature=3.0)


def multisource_sources() -> dict:
    return {lang: classification_examples(n=n, seed=seed) for lang, (n, seed) in SOURCES.items()}


def run_multisource(stage: int, world_size: int, directory: str, resume: bool) -> dict:
    """`ltsft train`'s multi-source set-up (`build_multisource`: one language per step, its SFT swapped in) and
    the LTSFTTrainer given the same sources and the language SFTs as LANG=DIR, on the same model and schedule;
    with `resume`, a Trainer run that crashes mid-phase 2, resumed, and resumed after a language SFT changed."""
    from ltsft_dist import comm
    from ltsft_dist.engine import ds_config_for
    from ltsft_dist.multisource import build_multisource
    from ltsft_dist.recipe import LTSFTRecipe

    sfts = {lang: sft for lang, sft in language_sfts().items() if lang in SOURCES}
    if comm.rank() == 0:
        for lang, sft in sfts.items():
            sft.save_pretrained(Path(directory) / f"lang-{lang}")
    comm.barrier()
    cfg = _config(stage, world_size, sampling=copy.deepcopy(SAMPLING))
    model = tiny_model(cfg.kind)
    order, swap = build_multisource(model, multisource_sources(), sfts, cfg, sampling=cfg.sampling,
                                    rank=comm.rank(), world_size=world_size)
    recipe = LTSFTRecipe(model, order.examples, cfg, ds_config_for(cfg, world_size), show_progress=False,
                         order=order, step_hooks=[swap])
    out = {"ltsft": _result(recipe.run(), recipe.stats)}
    given = [f"{lang}={directory}/lang-{lang}" for lang in sorted(sfts)]
    trainer = _trainer(cfg, str(Path(directory) / "hf"), multisource_sources(), language_sfts=given)
    trainer.train()
    out["hf"] = _result(trainer.sft, trainer.tuner.stats)
    if out["hf"] is not None:
        out["hf"]["swapped_steps"] = trainer.tuner.step_hooks[0].steps
        out["hf"]["languages"] = trainer.sft.metadata.languages
    if resume:
        run = str(Path(directory) / "crashed")
        try:
            _trainer(cfg, run, multisource_sources(), save_steps=8, crash_at=9, language_sfts=given).train()
            raise AssertionError("the run did not crash")
        except Crash:
            pass
        trainer = _trainer(cfg, run, multisource_sources(), language_sfts=given)
        trainer.train(resume_from_checkpoint=f"{run}/checkpoint-8")
        out["resumed"] = _result(trainer.sft, trainer.tuner.stats)
        comm.barrier()
        if comm.rank() == 0:  # the same language, other values: a resume would mix two runs
            changed = language_sfts(scale=0.2)["de"]
            changed.save_pretrained(Path(directory) / "lang-de")
        comm.barrier()
        try:
            _trainer(cfg, run, multisource_sources(), language_sfts=given).train(
                resume_from_checkpoint=f"{run}/checkpoint-8")
            out["changed"] = "resumed"
        except LtsftError as err:
            out["changed"] = str(err)
    return out


def run_pairs(stages: list[int], world_size: int, resume_stage: int | None, extra: bool,
              multisource_stage: int | None = None) -> dict:
    """Per stage: `ltsft train`'s recipe, the LTSFTTrainer and the accelerate loop on the same setup; with `extra`,
    a language SFT with accumulation (recipe and Trainer); with `resume_stage`, a Trainer run
    that crashes mid-phase 2 and is resumed from its checkpoint; with `multisource_stage`, a multi-source task SFT
    with per-step language SFTs (recipe and Trainer). Rank 0 returns the SFTs."""
    from ltsft_dist import comm
    from ltsft_dist.engine import ds_config_for
    from ltsft_dist.recipe import LTSFTRecipe

    def run_dir() -> str:
        return comm.broadcast_object(tempfile.mkdtemp(prefix="ltsft-hf-") if comm.rank() == 0 else None)

    cases = [(f"z{stage}", _config(stage, world_size), classification_examples(), 1) for stage in stages]
    if extra:
        language = _config(2, world_size, kind="language", weight_decay=0.05, batch_size=24)
        language.micro_batch_size = language.batch_size // (world_size * 2)
        cases.append(("language-accum-z2", language, mlm_examples(), 2))
        cases.append(("z2-bf16", _config(2, world_size, deepspeed="zero2_bf16.json"), classification_examples(), 1))
    out = {}
    for name, cfg, examples, accumulation in cases:
        recipe = LTSFTRecipe(tiny_model(cfg.kind), examples, cfg, ds_config_for(cfg, world_size), show_progress=False)
        out[f"ltsft-{name}"] = _result(recipe.run(), recipe.stats)
        directory = run_dir()
        trainer = _trainer(cfg, directory, examples, accumulation)
        trainer.train()
        out[f"hf-{name}"] = _result(trainer.sft, trainer.tuner.stats)
        if comm.rank() == 0:
            out[f"hf-{name}"]["saved"] = sorted(p.name for p in (Path(directory) / "sft").iterdir())
            out[f"hf-{name}"]["bf16"] = trainer.accelerator.deepspeed_engine_wrapped.engine.bfloat16_enabled()
            out[f"ltsft-{name}"]["bf16"] = recipe.engine.bfloat16_enabled()
        if name in [f"z{stage}" for stage in stages]:
            out[f"accelerate-{name}"] = _accelerate_run(cfg, world_size)
    if resume_stage is not None:
        cfg = _config(resume_stage, world_size)
        directory = run_dir()
        try:
            _trainer(cfg, directory, save_steps=8, crash_at=9).train()
            raise AssertionError("the run did not crash")
        except Crash:
            pass
        trainer = _trainer(cfg, directory)
        trainer.train(resume_from_checkpoint=f"{directory}/checkpoint-8")
        out[f"resumed-z{resume_stage}"] = _result(trainer.sft, trainer.tuner.stats)
    if multisource_stage is not None:
        for side, result in run_multisource(multisource_stage, world_size, run_dir(), world_size > 1).items():
            out[f"{side}-multisource-z{multisource_stage}"] = result
    return out if comm.rank() == 0 else None


def launch(world_size: int) -> dict:
    stages, resume, multisource = ([0], None, 0) if world_size == 1 else ([2, 3], 2, 2)
    return run_ranks(run_pairs, world_size, stages, world_size, resume, world_size > 1, multisource)[0]


@pytest.fixture(scope="session")
def pairs(launches):
    return functools.partial(launches, launch)


def _assert_same_sft(a: dict, b: dict, atol: float = 2e-6, rtol: float = 0.0) -> None:
    assert a is not None and b is not None
    assert sorted(a["diffs"]) == sorted(b["diffs"])
    for name, (idx, values) in a["diffs"].items():
        other_idx, other_values = b["diffs"][name]
        assert torch.equal(idx, other_idx), f"{name}: masks differ"
        torch.testing.assert_close(values, other_values, rtol=rtol, atol=atol, msg=f"{name}: φ differs")
    assert sorted(a["heads"]) == sorted(b["heads"])
    for name, head in a["heads"].items():
        torch.testing.assert_close(head, b["heads"][name], rtol=rtol, atol=atol, msg=f"{name}: head differs")


@pytest.mark.parametrize("world_size,case", [(1, "z0"), (2, "z2"), (2, "z3"), (2, "language-accum-z2")])
def test_trainer_matches_ltsft_train(world_size, case, pairs):
    result = pairs(world_size)
    ours, theirs = result[f"hf-{case}"], result[f"ltsft-{case}"]
    _assert_same_sft(ours, theirs)
    assert ours["frozen_drift"] == 0
    assert sum(len(idx) for idx, _ in ours["diffs"].values()) > 0
    assert ours["saved"] and any(name.endswith(".safetensors") for name in ours["saved"])


def test_trainer_bf16_matches_ltsft_train(pairs):
    """bf16 from the DeepSpeed config at W=2 ZeRO-2: the same mask, φ within bf16 tolerance (torch's defaults)."""
    result = pairs(2)
    ours, theirs = result["hf-z2-bf16"], result["ltsft-z2-bf16"]
    assert ours["bf16"] and theirs["bf16"]
    _assert_same_sft(ours, theirs, atol=1e-5, rtol=1.6e-2)
    assert ours["frozen_drift"] == 0 and sum(len(idx) for idx, _ in ours["diffs"].values()) > 0


@pytest.mark.parametrize("world_size,stage", [(1, 0), (2, 2), (2, 3)])
def test_accelerate_loop_matches_ltsft_train(world_size, stage, pairs):
    result = pairs(world_size)
    _assert_same_sft(result[f"accelerate-z{stage}"], result[f"ltsft-z{stage}"])
    assert result[f"accelerate-z{stage}"]["frozen_drift"] == 0


@pytest.mark.parametrize("world_size,stage", [(1, 0), (2, 2)])
def test_multisource_trainer_with_language_sfts_matches_ltsft_train(world_size, stage, pairs):
    result = pairs(world_size)
    ours, theirs = result[f"hf-multisource-z{stage}"], result[f"ltsft-multisource-z{stage}"]
    _assert_same_sft(ours, theirs)
    assert ours["frozen_drift"] == 0 and sum(len(idx) for idx, _ in ours["diffs"].values()) > 0
    steps = PHASE.steps * 2
    assert ours["swapped_steps"] == steps  # a language SFT in every step
    assert ours["languages"] == sorted(SOURCES)
    # both languages trained in each phase (each phase restarts the order), so both SFTs were swapped in
    order = MultiSourceOrder(multisource_sources(), 12, 12, 0, 1, seed=task_config().seed,
                             policy=SAMPLING.policy, temperature=SAMPLING.temperature)
    assert {order.language_at(step) for step in range(PHASE.steps)} == set(SOURCES)


def test_multisource_trainer_resumed_mid_phase2_matches_uninterrupted(pairs):
    result = pairs(2)
    _assert_same_sft(result["resumed-multisource-z2"], result["hf-multisource-z2"])
    assert re.search(r"language SFT 'de' changed since .*checkpoint-8.* resuming would mix two runs",
                     result["changed-multisource-z2"])


def test_trainer_resumed_mid_phase2_matches_uninterrupted(pairs):
    result = pairs(2)
    _assert_same_sft(result["resumed-z2"], result["hf-z2"])


# --- misuse: refused before anything is built, naming the argument and the fix ---------------------------------

def _args(**kwargs):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=tempfile.mkdtemp(prefix="ltsft-hf-"), report_to=[], **kwargs)


def _fake_trainer(args, ds: dict, optimizer=None, deepspeed=True):
    return SimpleNamespace(args=SimpleNamespace(optim=args.optim, hf_deepspeed_config=SimpleNamespace(config=ds),
                                                world_size=1),
                           is_deepspeed_enabled=deepspeed, optimizer=optimizer, lr_scheduler=None)


def test_max_steps_shorter_than_phase1_is_refused():
    from ltsft_dist.integrations.hf import LTSFTArguments

    with pytest.raises(LtsftError, match=r"max_steps=5 .*phase1_steps=6.*lower LTSFTArguments.phase1_steps"):
        LTSFTArguments(density=0.1, phase1_steps=6).train_config(_args(max_steps=5), 1)
    with pytest.raises(LtsftError, match=r"max_steps=10 .*phase2_steps=6"):
        LTSFTArguments(density=0.1, phase1_steps=6, phase2_steps=6).train_config(_args(max_steps=10), 1)
    config = LTSFTArguments(density=0.1, phase1_steps=6).train_config(_args(max_steps=10), 1)
    assert (config.phase1.steps, config.phase2.steps) == (6, 4)
    with pytest.raises(LtsftError, match="LTSFTArguments: k: give exactly one of k"):
        LTSFTArguments(phase1_steps=6).train_config(_args(max_steps=10), 1)


def test_language_sft_arguments_are_checked():
    from ltsft_dist.integrations.hf import LTSFT, LoopArguments, LTSFTArguments

    args = LTSFTArguments(density=0.1, phase1_steps=6, language_sfts=["en=runs/en/sft", "de=runs/de/sft"],
                          sampling="uniform")
    config = args.train_config(_args(max_steps=10), 1)
    assert config.language_sfts == {"en": "runs/en/sft", "de": "runs/de/sft"}
    assert config.sampling.policy == "uniform"
    for entry in ("en", "=runs/en", "en="):
        with pytest.raises(LtsftError, match=rf"LTSFTArguments.language_sfts: '{entry}': .*as LANG=DIR"):
            LTSFTArguments(density=0.1, phase1_steps=6, language_sfts=[entry]).train_config(_args(max_steps=10), 1)
    with pytest.raises(LtsftError, match="language_sfts: 'en=b': give each source language once"):
        LTSFTArguments(density=0.1, phase1_steps=6, language_sfts=["en=a", "en=b"]).train_config(
            _args(max_steps=10), 1)
    with pytest.raises(LtsftError, match="language_sfts: .*task SFTs only.*sft_kind=task"):
        LTSFTArguments(sft_kind="language", density=0.1, phase1_steps=6,
                       language_sfts=["en=a"]).train_config(_args(max_steps=10), 1)
    with pytest.raises(LtsftError, match="sampling='often': use one of proportional, uniform, temperature"):
        LTSFTArguments(density=0.1, phase1_steps=6, sampling="often").train_config(_args(max_steps=10), 1)
    with pytest.raises(LtsftError, match="language_sfts: the per-step language swap .* use LTSFTTrainer"):
        LTSFT(torch.nn.Linear(2, 2), args, LoopArguments(max_steps=10, learning_rate=1e-3,
                                                          per_device_train_batch_size=4), accelerator=None)


def test_unsupported_optimizer_is_refused():
    from ltsft_dist.integrations.hf import check_trainer

    with pytest.raises(LtsftError, match=r"TrainingArguments.optim=.*adafactor.*set optim to adamw_torch"):
        check_trainer(_fake_trainer(_args(optim="adafactor"), {}))
    model = torch.nn.Linear(2, 2)
    with pytest.raises(LtsftError, match=r"optimizers=.*SGD is not supported"):
        check_trainer(_fake_trainer(_args(), {}, optimizer=torch.optim.SGD(model.parameters(), lr=0.1)))
    with pytest.raises(LtsftError, match=r"optimizer: ltsft builds AdamW"):
        check_trainer(_fake_trainer(_args(), {"optimizer": {"type": "Adam"}}))
    with pytest.raises(LtsftError, match=r"TrainingArguments.deepspeed is not set"):
        check_trainer(_fake_trainer(_args(), {}, deepspeed=False))
    check_trainer(_fake_trainer(_args(), {"zero_optimization": {"stage": 2}}))  # what is supported passes


def test_offload_the_masking_does_not_handle_is_refused():
    from ltsft_dist.integrations.hf import check_trainer

    for section in ("offload_optimizer", "offload_param"):
        ds = {"zero_optimization": {"stage": 3, section: {"device": "nvme"}}, "zero_force_ds_cpu_optimizer": False}
        with pytest.raises(LtsftError, match=rf"zero_optimization.{section}.device=nvme"):
            check_trainer(_fake_trainer(_args(), ds))
    cpu = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    with pytest.raises(LtsftError, match='zero_force_ds_cpu_optimizer": false'):
        check_trainer(_fake_trainer(_args(), cpu))
    check_trainer(_fake_trainer(_args(), {**cpu, "zero_force_ds_cpu_optimizer": False}))


# --- the examples, offline on a tiny base ------------------------------------------------------------------------

TINY_BASE = dict(vocab_size=200, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=30,
                 max_position_embeddings=64)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["mlm", "xnli"])
def test_example_runs_offline_on_a_tiny_model(script, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from ltsft_dist.config import PACKAGE_DS_CONFIGS, ModelConfig
    from ltsft_dist.demo_text import nli_examples, sentences
    from ltsft_dist.models import save_tiny_base
    from ltsft_dist.sft import SparseFineTuning

    save_tiny_base(tmp_path / "base", ModelConfig(tiny=dict(TINY_BASE)), sentences("en", 300))
    if script == "mlm":
        data = tmp_path / "en.txt"
        data.write_text("\n".join(sentences("en", 300, seed=1)) + "\n")
        extra = ["--sft_kind", "language", "--max_seq_length", "16"]
    else:
        data = tmp_path / "nli.jsonl"
        data.write_text("".join(json.dumps({"premise": p, "hypothesis": h, "label": label}) + "\n"
                                for p, h, label in nli_examples("en", 64)))
        from transformers import AutoModelForSequenceClassification

        from sfts import random_sft

        base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3)
        random_sft(base, density=0.1).save_pretrained(tmp_path / "lang-en")  # swapped in at every step
        extra = ["--sft_kind", "task", "--language_sfts", f"en={tmp_path / 'lang-en'}"]
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    example = Path(__file__).resolve().parents[1] / "examples" / f"run_{script}_ltsft.py"
    subprocess.run([sys.executable, str(example), "--model_name_or_path", str(tmp_path / "base"),
                    "--train_file", str(data), "--output_dir", str(out),
                    "--deepspeed", str(PACKAGE_DS_CONFIGS / "zero0.json"), "--per_device_train_batch_size", "8",
                    "--learning_rate", "1e-3", "--max_steps", "6", "--phase1_steps", "3", "--density", "0.05",
                    "--report_to", "tensorboard", "--logging_steps", "1", "--save_strategy", "no",
                    "--languages", "en", *extra], env=env, check=True, timeout=600, cwd=tmp_path)
    sft = SparseFineTuning.from_pretrained(out / "sft")
    assert sft.metadata.kind == ("language" if script == "mlm" else "task")
    assert sft.metadata.languages == ["en"] and sft.metadata.base_model == str(tmp_path / "base")
    assert sum(len(idx) for idx, _ in sft.diffs.values()) == sft.metadata.k > 0
    if script == "xnli":
        assert any(name.startswith("classifier") for name in sft.heads)  # the dense task head
        assert sft.metadata.training_config["language_sfts"] == {"en": str(tmp_path / "lang-en")}
    else:
        assert not any("LayerNorm" in name for name in sft.diffs)  # language SFTs freeze the norms
    assert list((out / "runs").rglob("events.out.tfevents.*"))  # the Trainer's TensorBoard logs
