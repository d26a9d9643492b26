"""``ltsft inspect | compose | convert``: look at, combine and convert SFT artifacts without writing Python."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ltsft_dist.composable_format import SFT_FILE_NAME, load_composable_sft, save_composable_sft
from ltsft_dist.errors import LtsftError
from ltsft_dist.sft import KINDS, SparseFineTuning, compose

FORMATS = ("native", "composable-sft")
_SFT_HELP = "SFT directory (native or composable-sft), a pytorch_diff.bin file, or a hub id owner/name"


def register(subparsers) -> None:
    inspect = subparsers.add_parser(
        "inspect", help="show an SFT's metadata, K and densities", description="Show an SFT's metadata and densities."
    )
    inspect.add_argument("sft", metavar="SFT", help=_SFT_HELP)
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON instead of tables")
    inspect.set_defaults(func=inspect_command)

    comp = subparsers.add_parser(
        "compose", help="sum SFTs into one", description="Sum SFTs (e.g. a task and a language SFT) into one."
    )
    comp.add_argument("sfts", metavar="SFT", nargs="+", help=_SFT_HELP + " (two or more)")
    comp.add_argument("-o", "--output", required=True, help="directory to write the composed SFT to (native format)")
    comp.set_defaults(func=compose_command)

    conv = subparsers.add_parser(
        "convert",
        help="convert between the native and the composable-sft format",
        description="Convert an SFT between formats, exactly; the input format is detected.",
    )
    conv.add_argument("input", metavar="IN", help=_SFT_HELP)
    conv.add_argument("output", metavar="OUT", help="directory to write the converted SFT to")
    conv.add_argument("--to", required=True, choices=FORMATS, help="output format")
    conv.add_argument("--kind", choices=KINDS, help="set the SFT kind (composable-sft files do not record it)")
    conv.add_argument(
        "--language", dest="languages", action="append", help="set the language code(s); repeat for several"
    )
    conv.add_argument("--base-model", help="set the base model name or path recorded in the metadata")
    conv.set_defaults(func=convert_command)


def load_sft(location: str) -> SparseFineTuning:
    """Either format, from a directory, a composable-sft file or the hub."""
    path = Path(location)
    if path.is_file() and path.name.endswith(".bin"):
        return load_composable_sft(path)
    return SparseFineTuning.from_pretrained(location)


def inspect_command(args: argparse.Namespace) -> int:
    summary = load_sft(args.sft).summary()
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def compose_command(args: argparse.Namespace) -> int:
    if len(args.sfts) < 2:
        raise LtsftError("compose needs at least two SFTs")
    composed, report = compose(*(load_sft(location) for location in args.sfts))
    composed.save_pretrained(args.output)
    print(report)
    print(f"wrote {args.output} (nnz {composed.nnz})")
    return 0


def convert_command(args: argparse.Namespace) -> int:
    sft = load_sft(args.input)
    overrides = {"kind": args.kind, "languages": args.languages, "base_model": args.base_model}
    overrides = {key: value for key, value in overrides.items() if value is not None}
    sft.metadata = dataclasses.replace(sft.metadata, **overrides)
    if args.to == "native":
        sft.save_pretrained(args.output)
    else:
        save_composable_sft(sft, args.output)
    where = Path(args.output) / SFT_FILE_NAME if args.to == "composable-sft" else Path(args.output)
    print(f"wrote {where} ({args.to}, nnz {sft.nnz}, {len(sft.heads)} heads)")
    return 0


def format_summary(summary: dict) -> str:
    lines = [
        f"kind:        {summary['kind']}",
        f"languages:   {', '.join(summary['languages']) or '-'}",
        f"base model:  {summary['base_model'] or '-'}",
        f"K:           {summary['k']}  (nnz {summary['nnz']}, density {summary['density']:.4%})",
        f"heads:       {', '.join(summary['heads']) or '-'}",
        "",
        *_table("module type", summary["module_types"]),
        "",
        *_table("layer", summary["layers"]),
    ]
    return "\n".join(lines)


def _table(title: str, rows: dict[str, dict]) -> list[str]:
    width = max([len(title), *map(len, rows)])
    lines = [f"{title:<{width}}  {'nnz':>10}  {'numel':>12}  density"]
    for key, row in rows.items():
        lines.append(f"{key:<{width}}  {row['nnz']:>10}  {row['numel']:>12}  {row['density']:.4%}")
    return lines
