"""Reading files with errors that name the file, the line and the fix, shared by the task readers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ltsft_dist.errors import LtsftError


def read_text(path: str | Path) -> tuple[Path, str]:
    """The whole file as UTF-8 text; missing, undecodable or blank files are errors."""
    path = Path(path)
    if not path.is_file():
        raise LtsftError(f"{path}: file not found (check the path in the data configuration)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise LtsftError(f"{path}:{line}: not valid UTF-8 ({err.reason}); re-encode the file as UTF-8") from None
    if not text.strip():
        raise LtsftError(f"{path}: the file is empty; point the configuration at a file with data")
    return path, text


def read_tsv(path: str | Path, required: tuple[str, ...]) -> tuple[Path, list[tuple[int, dict[str, str]]]]:
    """Rows of a tab-separated file with a header, as (line number, {column: value}).

    Quotes are literal (csv.QUOTE_NONE), as in the XNLI and AmericasNLI releases: their sentences contain
    unbalanced quote characters that a quoting reader would merge across lines."""
    path, text = read_text(path)
    lines = [line.removesuffix("\r") for line in text.split("\n")]  # not splitlines(): \x85, \u2028 occur in text
    reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader)
    missing = [name for name in required if name not in header]
    if missing:
        raise LtsftError(f"{path}:1: missing column(s) {missing} in the header {header}; the first line must "
                         f"name the tab-separated columns, including {list(required)}")
    rows = []
    for number, fields in enumerate(reader, 2):
        if not "".join(fields).strip():
            continue
        if len(fields) != len(header):
            raise LtsftError(f"{path}:{number}: {len(fields)} tab-separated fields, the header has {len(header)}; "
                             "fix the line (a tab inside a sentence, or a truncated row)")
        rows.append((number, dict(zip(header, fields))))
    if not rows:
        raise LtsftError(f"{path}: a header but no rows; the file needs at least one example")
    return path, rows


def read_json(path: str | Path):
    path, text = read_text(path)
    try:
        return path, json.loads(text)
    except json.JSONDecodeError as err:
        raise LtsftError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno}); "
                         "fix the file or re-download it") from None


def read_jsonl(path: str | Path) -> tuple[Path, list[tuple[int, dict]]]:
    """One JSON object per line, as (line number, object); blank lines are skipped."""
    path, text = read_text(path)
    records = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise LtsftError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno}); each line must "
                             "be one JSON object") from None
        if not isinstance(record, dict):
            raise LtsftError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append((number, record))
    return path, records


def require_keys(record: dict, keys: tuple[str, ...], where: str, fix: str) -> None:
    missing = [key for key in keys if key not in record]
    if missing:
        raise LtsftError(f"{where}: missing {missing}; {fix}")


def load_hf_dataset(path: str, config: str | None, split: str):
    """`datasets.load_dataset`, rank 0 first (the other ranks then load its prepared copy from the cache, offline),
    failing alike on every rank with one message that says why; returns the dataset and a name for it in later
    messages."""
    import datasets

    from ltsft_dist.hub import datasets_offline, rank_zero_first

    def fetch(local_only: bool):
        if not local_only:
            return datasets.load_dataset(path, config, split=split)
        with datasets_offline():
            return datasets.load_dataset(path, config, split=split)

    source = f"load_dataset({path!r}, {config!r}, split={split!r})"
    return rank_zero_first(fetch, f"{source} failed"), source
