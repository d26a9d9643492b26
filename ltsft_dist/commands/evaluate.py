"""``ltsft eval`` (zero-shot transfer scores per target language), ``ltsft export`` (SFTs merged into the base) and
``ltsft generate`` (a decoder with its SFTs continuing prompts)."""

from __future__ import annotations

import argparse
import sys

from ltsft_dist.errors import LtsftError


def register(subparsers) -> None:
    from ltsft_dist.evaluation import FILE_FORMATS, EvalOptions
    from ltsft_dist.tasks import task_names
    from ltsft_dist.tasks.qa import QA_METRICS

    defaults = EvalOptions()
    ev = subparsers.add_parser(
        "eval", help="zero-shot evaluation: task SFT with and without each target language's SFT",
        description="For every --data language, score θ⁰ + φ_task + φ_lang (when a --lang-sft of that language is "
                    "given) and TA-only θ⁰ + φ_task; write results.json and results.md to --out. Start it under a "
                    "launcher (deepspeed/torchrun, srun, mpiexec) to split the batches across ranks; alone it is a "
                    "1-rank run. The scores do not depend on the number of ranks.")
    ev.add_argument("config", nargs="?", metavar="CONFIG",
                    help="optional YAML/JSON file holding any of these options under their names with '_' for '-' "
                         "(base, task_sft, lang_sft, data, max_seq_length, ...; lang_sft and data as LANG: PATH "
                         "mappings); flags on the command line take precedence")
    ev.add_argument("--base", metavar="DIR|HUB_ID", help="the base model with its tokenizer: a directory written by "
                                                      "save_pretrained or a hub id, e.g. xlm-roberta-base (required)")
    ev.add_argument("--task-sft", metavar="DIR", help="the task SFT, with its dense task head (required, except for "
                    "a task without a head, e.g. --task clm: then θ⁰ + φ_lang and θ⁰ are scored)")
    ev.add_argument("--task", choices=task_names(evaluated=True),
                    help="the task (default: the task the SFT was trained for, else told by its head parameters)")
    ev.add_argument("--lang-sft", action="append", default=[], metavar="LANG=DIR",
                    help="language SFT of target language LANG (repeatable); its MLM head is not used")
    ev.add_argument("--data", action="append", default=[], metavar="LANG=PATH",
                    help="evaluation file of target language LANG (repeatable, at least one). QA: SQuAD-format "
                         "JSON (e.g. xquad.de.json); NLI: XNLI TSV, AmericasNLI TSV or MultiNLI-style JSONL; NER/POS: "
                         "CoNLL (CoNLL-U, or word ... tag columns as CoNLL-2003/WikiANN); decoders: XCOPA or Belebele "
                         "JSONL, XNLI TSV (xnli_ll), text lines (clm: perplexity)")
    ev.add_argument("--format", dest="format", choices=FILE_FORMATS,
                    help="reader for every --data file (default: from the extension, and the header for TSV)")
    ev.add_argument("--max-seq-length", type=int, metavar="N",
                    help=f"tokens per model input (QA window or NLI pair; default {defaults.max_seq_length})")
    ev.add_argument("--stride", type=int, metavar="N",
                    help=f"QA: context tokens shared by consecutive windows of a long context "
                         f"(default {defaults.stride})")
    ev.add_argument("--max-query-length", type=int, metavar="N",
                    help=f"QA: questions are cut to this many tokens (default {defaults.max_query_length})")
    ev.add_argument("--batch-size", type=int, metavar="N",
                    help=f"model inputs per forward pass on each rank (default {defaults.batch_size})")
    ev.add_argument("--limit", type=int, metavar="N",
                    help="only the first N questions / pairs of each language, for a quick check")
    ev.add_argument("--qa-metric", choices=QA_METRICS,
                    help=f"squad: the SQuAD v1.1 script, XQuAD's official metric; mlqa: MLQA's per-language "
                         f"normalisation (MLQA's languages only); default {defaults.qa_metric}")
    ev.add_argument("--out", metavar="DIR", help="directory for results.json and results.md (required)")
    ev.add_argument("--device", metavar="DEVICE", help="cpu, cuda or cuda:N (default: this rank's GPU when there "
                    "is one, else the CPU)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(func=eval_command)

    ex = subparsers.add_parser(
        "export", help="merge SFTs into the base and write a plain Hugging Face model directory",
        description="Apply the SFTs (composed: their differences summed, heads taken from the task SFT) to the "
                    "base and save the result with the base's tokenizer, so that "
                    "transformers.AutoModelFor...from_pretrained(OUT) loads it without ltsft.")
    ex.add_argument("--base", required=True, metavar="DIR|HUB_ID",
                    help="the base model with its tokenizer: a directory written by save_pretrained or a hub id")
    ex.add_argument("--sft", dest="sfts", action="append", required=True, metavar="DIR",
                    help="SFT to merge (repeatable), e.g. a task SFT and a language SFT")
    ex.add_argument("--task", choices=task_names(), required=True,
                    help="the task whose model head to save, e.g. qa (QuestionAnswering), nli (SequenceClassification, "
                         "3 labels) or mlm (MaskedLM, output embeddings untied as in language SFT training)")
    ex.add_argument("-o", "--output", required=True, metavar="OUT",
                    help="directory to create (written under a temporary name, then renamed)")
    ex.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    ex.add_argument("--device", metavar="DEVICE", help="where the SFTs are applied: cpu, cuda or cuda:N (default: "
                    "the GPU when there is one); the model is always saved from the CPU")
    ex.set_defaults(func=export_command)

    gen = subparsers.add_parser(
        "generate", help="continue prompts with a decoder and its SFTs applied in memory (to try a result)",
        description="Apply the SFTs (composed, as ltsft export merges them) to the decoder base in memory and print "
                    "each prompt's continuation. Greedy unless --temperature is given.")
    gen.add_argument("--base", required=True, metavar="DIR|HUB_ID",
                     help="the decoder base with its tokenizer: a directory written by save_pretrained or a hub id")
    gen.add_argument("--sft", dest="sfts", action="append", required=True, metavar="DIR",
                     help="an SFT to apply (repeatable: e.g. a language SFT and an instruction task SFT)")
    gen.add_argument("--prompt", dest="prompts", action="append", required=True, metavar="TEXT",
                     help="a prompt to continue (repeatable)")
    gen.add_argument("--chat", action="store_true",
                     help="give each prompt as a user turn through the tokenizer's chat template")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt (default 64)")
    gen.add_argument("--temperature", type=float, default=0.0,
                     help="sampling temperature; 0 (the default) generates greedily")
    gen.add_argument("--seed", type=int, default=0, help="the sampling seed (default 0)")
    gen.add_argument("--device", help="where the model runs (default: the accelerator when there is one, else CPU)")
    gen.set_defaults(func=generate_command)


def parse_pairs(values: list[str], flag: str) -> dict[str, str]:
    """LANG=VALUE arguments as a dict; malformed or repeated languages are errors."""
    pairs = {}
    for value in values:
        lang, sep, path = value.partition("=")
        if not sep or not lang.strip() or not path.strip():
            raise LtsftError(f"{flag} {value!r}: expected LANG=PATH, e.g. {flag} de=data/xquad.de.json")
        if lang in pairs:
            raise LtsftError(f"{flag}: language {lang!r} given twice; give each language once")
        pairs[lang.strip()] = path.strip()
    return pairs


def eval_command(args: argparse.Namespace) -> int:
    from ltsft_dist.engine import join_launched_group
    from ltsft_dist.evaluation import EvalConfig, evaluate, load_eval_config, markdown_table, write_results

    config = load_eval_config(args.config) if args.config else EvalConfig()
    for key in ("base", "task_sft", "task", "format", "max_seq_length", "stride", "max_query_length", "batch_size",
                "limit", "qa_metric", "out", "device"):
        if getattr(args, key) is not None:
            setattr(config, key, getattr(args, key))
    config.data = {**config.data, **parse_pairs(args.data, "--data")}
    config.lang_sft = {**config.lang_sft, **parse_pairs(args.lang_sft, "--lang-sft")}
    for key in ("base", "out"):  # (without task_sft, evaluate says which tasks do without one)
        if not getattr(config, key):
            flag = "--" + key.replace("_", "-")
            raise LtsftError(f"missing {flag}: give it on the command line or as {key}: in the eval config")
    config.check()
    join_launched_group()
    results = evaluate(config.base, config.task_sft, config.data, config.lang_sft, config.task, config,
                       show_progress=not args.no_progress)
    if results is not None:
        write_results(results, config.out)
        print(markdown_table(results))
        print(f"wrote {config.out}/results.json and results.md", file=sys.stderr)
    return 0


def export_command(args: argparse.Namespace) -> int:
    from ltsft_dist.export import export_merged

    out = export_merged(args.base, args.sfts, args.task, args.output, overwrite=args.overwrite, device=args.device)
    print(f"wrote {out} (load it with transformers' AutoModelFor...from_pretrained)")
    return 0


def generate_command(args: argparse.Namespace) -> int:
    from ltsft_dist.generate import GenerationOptions, generate

    options = GenerationOptions(args.max_new_tokens, args.chat, args.temperature, args.seed)
    for prompt, text in zip(args.prompts, generate(args.base, args.sfts, args.prompts, options, args.device)):
        print(f"{prompt}{text}" if not args.chat else text)
    return 0
