"""``ltsft demo``: the embedded default, the whole pipeline at toy scale with no network and no GPU."""

from __future__ import annotations

import argparse
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo_pipeline.yaml"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="run the embedded default: the whole pipeline on generated en/de/es data, 2 CPU ranks",
        description="Write the bundled demo data and pipeline config under OUTPUT_DIR, then run `ltsft pipeline` "
                    "on it: a tiny base, language SFTs for en/de/es, a multi-source NLI task SFT on en+de, and "
                    "zero-shot evaluation with and without the target language SFTs. Re-running skips "
                    "finished stages.")
    p.add_argument("--output-dir", default="runs/demo", help="where the data, SFTs, results and logs go "
                                                               "(default: runs/demo)")
    p.add_argument("--ranks", type=int, default=2, help="local ranks per stage (default: 2)")
    p.add_argument("--master-port", type=int, help="rendezvous port for the local ranks (default: a free one)")
    p.add_argument("--dry-run", action="store_true", help="write the data and config, print the plan, run nothing")
    p.set_defaults(func=demo_command)


def write_demo(out: Path) -> Path:
    """The bundled data (generated, parallel across languages) and the pipeline config; returns the config."""
    from ltsft_dist.demo_text import nli_examples, sentences

    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    for lang in ("en", "de", "es"):
        (data / f"text.{lang}.txt").write_text("\n".join(sentences(lang, 2000, seed=1)) + "\n", encoding="utf-8")
        for name, n, seed in ((f"nli.{lang}.tsv", 1200, 2), (f"nli_test.{lang}.tsv", 300, 3)):
            rows = ["language\tgold_label\tsentence1\tsentence2\tpairID"]
            rows += [f"{lang}\t{label}\t{p}\t{h}\t{lang}-{seed}-{i}"
                     for i, (p, h, label) in enumerate(nli_examples(lang, n, seed=seed))]
            (data / name).write_text("\n".join(rows) + "\n", encoding="utf-8")
    config = out / "pipeline.yaml"
    config.write_text(DEMO_CONFIG.read_text())
    return config


def demo_command(args: argparse.Namespace) -> int:
    from ltsft_dist.commands.pipeline import pipeline_command

    config = write_demo(Path(args.output_dir).resolve())
    return pipeline_command(argparse.Namespace(config=str(config), help_config=False, dry_run=args.dry_run, check=False,
                                               stage=None, ranks=args.ranks, master_port=args.master_port))
