"""Building the model an SFT is trained on: from the hub/a directory, or tiny and random for offline runs."""

from __future__ import annotations

import torch
from transformers import BertConfig, GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config, XLMRobertaConfig

from ltsft_dist.config import ModelConfig
from ltsft_dist.errors import LtsftError
from ltsft_dist.tasks import get_task, task_names

TINY_CONFIGS = {"bert": BertConfig, "xlm-roberta": XLMRobertaConfig,
                "llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "gemma": GemmaConfig}
DECODERS = ("llama", "qwen2", "mistral", "gemma")  # causal LMs: the tasks with `Task.decoder` train them


def is_decoder(architecture: str) -> bool:
    return architecture in DECODERS


def language_task(cfg: ModelConfig) -> str:
    """The task a language SFT of this model trains by default: the decoders' (clm) for a tiny decoder, else the
    encoders' (mlm)."""
    decoder = cfg.tiny is not None and is_decoder(cfg.architecture)
    return next(name for name in task_names(kind="language") if get_task(name).decoder == decoder)


def tiny_tokenizer(cfg: ModelConfig, texts: list[str]):
    """The tokenizer of a tiny model, trained on `texts`: WordPiece framed for an encoder or for a decoder."""
    from ltsft_dist.data import train_wordpiece

    return train_wordpiece(texts, vocab_size=int(cfg.tiny.get("vocab_size", 1000)),
                           causal=is_decoder(cfg.architecture))


def build_model(cfg: ModelConfig, task: str, num_labels: int | None = None, vocab_size: int | None = None,
                seed: int = 0, ds_config: dict | None = None,
                tie_output_embeddings: bool = False) -> torch.nn.Module:
    """The task's model class over the base, in `cfg.dtype` (fp32 by default, whatever the checkpoint stores); a
    task head missing from a base checkpoint starts from the seeded initialisation (the same on every rank). With
    a ZeRO-3 `ds_config` (under a process group) a base loaded from a checkpoint goes straight into DeepSpeed's
    partitions (`engine.partitioned_construction`); a tiny model is built whole (it is small, and its random
    initialisation must not depend on the ZeRO stage). `tie_output_embeddings` is a language SFT's
    eligibility.tie_output_embeddings."""
    model = _make_model(cfg, task, num_labels, vocab_size, seed, ds_config)
    get_task(task).prepare_model(model, tie_output_embeddings)
    out = model.get_output_embeddings() if tie_output_embeddings else None
    if out is not None and out.weight is not model.get_input_embeddings().weight:
        raise LtsftError("eligibility.tie_output_embeddings: this base's output embedding is a matrix of its own "
                         "(tie_word_embeddings: false in its config), so there is nothing to keep tied; set it to false")
    if cfg.gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise LtsftError(f"model.gradient_checkpointing: {type(model).__name__} does not support it; set it "
                             "to false")
        enable = getattr(model, "activation_checkpointing_enable", None)  # its name from transformers 5.2x on
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # a cache is for generation, and checkpointing recomputes anyway
    return model


def _make_model(cfg: ModelConfig, task: str, num_labels: int | None, vocab_size: int | None, seed: int,
                ds_config: dict | None) -> torch.nn.Module:
    from ltsft_dist.engine import partitioned_construction

    spec = get_task(task)
    auto = spec.auto_class()
    extra = {"num_labels": num_labels} if num_labels else {}
    if cfg.tiny is not None:
        if cfg.architecture not in TINY_CONFIGS:
            raise LtsftError(f"model.architecture: {cfg.architecture!r} is not one of {', '.join(TINY_CONFIGS)}")
        values = dict(cfg.tiny)
        if vocab_size is not None:
            values.setdefault("vocab_size", vocab_size)
        torch.manual_seed(seed)
        model = auto.from_config(TINY_CONFIGS[cfg.architecture](**values, **extra), dtype=cfg.torch_dtype())
    else:
        from transformers.utils import logging as hf_logging

        from ltsft_dist.hub import resolve

        directory = resolve(cfg.name_or_path, "model.name_or_path")  # a hub id: rank 0 downloads it first
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its load report lists the base's MLM head as unused for task models
        try:
            torch.manual_seed(seed)
            # the dtype explicitly: transformers 5 defaults to the checkpoint's ("auto"), so a half-precision
            # checkpoint would train with half-precision "fp32 masters"
            with partitioned_construction(ds_config):
                model = auto.from_pretrained(directory, dtype=cfg.torch_dtype(), **extra)
        except (OSError, ValueError) as err:
            raise LtsftError(f"model.name_or_path: cannot load {cfg.name_or_path!r} from {directory} ({err}); "
                             "point it at a directory written by save_pretrained or a hub model") from None
        finally:
            hf_logging.set_verbosity(verbosity)
    return model


def untie_output_embeddings(model: torch.nn.Module) -> None:
    """Language SFTs decouple the output embedding from the input one (and then freeze it), unless
    eligibility.tie_output_embeddings keeps them one matrix. Under ZeRO-3 the copy
    is gathered whole, once, and DeepSpeed partitions it with the rest when the engine starts."""
    from ltsft_dist.shards import full_copy

    out = model.get_output_embeddings()
    if out is not None and out.weight is model.get_input_embeddings().weight:
        out.weight = torch.nn.Parameter(full_copy(out.weight))
    model.config.tie_word_embeddings = False


def save_tiny_base(directory, cfg: ModelConfig, texts: list[str], seed: int = 0) -> None:
    """A tiny language model (a masked LM, or a causal LM for a decoder architecture) and a WordPiece tokenizer
    trained on `texts`, saved as a HF directory: the shared base θ⁰ that language and task SFTs of an offline run
    (demo, tests) are trained on and composed over."""
    import shutil
    import tempfile
    from pathlib import Path

    from transformers import AutoTokenizer

    directory = Path(directory)
    tokenizer = tiny_tokenizer(cfg, texts)
    model = build_model(cfg, language_task(cfg), vocab_size=len(tokenizer), seed=seed)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    reloaded = AutoTokenizer.from_pretrained(tmp)
    if reloaded(texts[:16])["input_ids"] != tokenizer(texts[:16])["input_ids"]:
        shutil.rmtree(tmp)
        raise LtsftError(f"model.architecture: transformers loads the tokenizer of a tiny {cfg.architecture} base as "
                         f"{type(reloaded).__name__}, which tokenizes differently; build the tiny base as another "
                         "architecture of its kind (e.g. llama)")
    if directory.exists():
        shutil.rmtree(directory)
    tmp.replace(directory)


def load_task_model(base_dir: str, task: str, num_labels: int | None = None) -> torch.nn.Module:
    """The base model (a `save_pretrained` directory) with the head of `task` on it (`num_labels` outputs, by
    default as many as the task's fixed labels), for evaluation and export. Weights the checkpoint lacks (a fresh
    task head) are initialised under a fixed seed without touching the caller's random state; an SFT's dense
    heads then overwrite them."""
    fixed = get_task(task).fixed_labels
    with torch.random.fork_rng(devices=[]):
        model = build_model(ModelConfig(name_or_path=base_dir), task,
                            num_labels=num_labels or (len(fixed) if fixed else None), seed=0)
    return model.eval()
