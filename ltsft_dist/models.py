"""Building the model an SFT is trained on: from the hub/a directory, or tiny and random for offline runs."""

from __future__ import annotations

import logging

import torch
from transformers import (AutoModelForMaskedLM, AutoModelForSequenceClassification, BertConfig,
                          XLMRobertaConfig)

from ltsft_dist.config import ModelConfig
from ltsft_dist.errors import LtsftError

TINY_CONFIGS = {"bert": BertConfig, "xlm-roberta": XLMRobertaConfig}


def build_model(cfg: ModelConfig, kind: str, num_labels: int | None = None, vocab_size: int | None = None,
                seed: int = 0) -> torch.nn.Module:
    auto = AutoModelForMaskedLM if kind == "language" else AutoModelForSequenceClassification
    extra = {"num_labels": num_labels} if num_labels else {}
    if cfg.tiny is not None:
        if cfg.architecture not in TINY_CONFIGS:
            raise LtsftError(f"model.architecture: {cfg.architecture!r} is not one of {', '.join(TINY_CONFIGS)}")
        values = dict(cfg.tiny)
        if vocab_size is not None:
            values.setdefault("vocab_size", vocab_size)
        torch.manual_seed(seed)
        model = auto.from_config(TINY_CONFIGS[cfg.architecture](**values, **extra))
    else:
        try:
            model = auto.from_pretrained(cfg.name_or_path, **extra)
        except OSError as err:
            raise LtsftError(f"model.name_or_path: cannot load {cfg.name_or_path!r} ({err}). Offline? Point it at "
                             "a local directory, or set HF_HUB_OFFLINE=1 with the model in the cache.") from None
    if kind == "language":
        untie_output_embeddings(model)
    return model


def untie_output_embeddings(model: torch.nn.Module) -> None:
    """Language SFTs decouple the output embedding from the input one (and then freeze it)."""
    out = model.get_output_embeddings()
    if out is not None and out.weight is model.get_input_embeddings().weight:
        out.weight = torch.nn.Parameter(out.weight.detach().clone())
    model.config.tie_word_embeddings = False


def load_task_model(base_dir: str, task: str) -> torch.nn.Module:
    """The base model (a `save_pretrained` directory) with the head of `task` (qa | nli | mlm) on it.

    Weights the checkpoint lacks (a fresh task head, an MLM checkpoint's pooler) are initialised under a fixed
    seed, so every rank and every later load gets the same values; task heads are then overwritten by the SFT's.
    Missing *body* weights are reported: an SFT stores only differences to them, so their values at training time
    are lost. The MLM model gets untied output embeddings, as language SFTs were trained on."""
    from transformers import AutoModelForQuestionAnswering
    from transformers.utils import logging as hf_logging

    from ltsft_dist.tasks.nli import LABELS

    auto, extra = {"qa": (AutoModelForQuestionAnswering, {}),
                   "nli": (AutoModelForSequenceClassification, {"num_labels": len(LABELS)}),
                   "mlm": (AutoModelForMaskedLM, {})}[task]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report calls the expected fresh head "missing"; ours is below
    try:
        with torch.random.fork_rng(devices=[]):  # the caller's random state is left alone
            torch.manual_seed(0)
            model, info = auto.from_pretrained(base_dir, output_loading_info=True, **extra)
    except (OSError, ValueError) as err:
        raise LtsftError(f"--base {base_dir}: cannot load it as a {task} model ({err}); pass a directory written "
                         "by save_pretrained (config.json and weights)") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    random_body = sorted(k for k in info["missing_keys"] if k.startswith(model.base_model_prefix + "."))
    if random_body:
        logging.getLogger(__name__).warning(
            "%s has no %s (initialised randomly with seed 0): an SFT that changed them only stores the difference, "
            "so its results depend on how they were initialised in training", base_dir, ", ".join(random_body))
    if task == "mlm":
        untie_output_embeddings(model)
    return model.eval()
