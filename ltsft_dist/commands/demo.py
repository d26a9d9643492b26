"""``ltsft demo``: the embedded default run, with no network and no GPU."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from ltsft_dist.errors import LtsftError

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo_language.yaml"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="run the embedded default: a language SFT of a tiny model on bundled text, 2 CPU ranks",
        description="Write the bundled demo text and config under OUTPUT_DIR, then run `ltsft train` on it "
                    "under the deepspeed launcher.")
    p.add_argument("--output-dir", default="runs/demo", help="where the data, SFT and logs go (default: runs/demo)")
    p.add_argument("--ranks", type=int, default=2, help="number of local ranks (default: 2)")
    p.add_argument("--master-port", type=int, default=29517, help="rendezvous port for the local ranks")
    p.set_defaults(func=demo_command)


def demo_command(args: argparse.Namespace) -> int:
    from ltsft_dist.demo_text import sentences

    out = Path(args.output_dir).resolve()
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "data" / "en.txt").write_text("\n".join(sentences("en", 2000, seed=1)) + "\n", encoding="utf-8")
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    config["output_dir"] = str(out)
    config["data"]["train_file"] = str(out / "data" / "en.txt")
    config_path = out / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    if launcher is None:
        raise LtsftError("the deepspeed launcher is not installed in this environment: pip install deepspeed")
    command = [launcher, "--num_gpus", str(args.ranks), "--master_port", str(args.master_port),
               "--no_local_rank", "--module", "ltsft_dist.cli", "train", str(config_path)]
    print("running:", " ".join(command), flush=True)
    return subprocess.call(command)
