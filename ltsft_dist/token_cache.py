"""Language-SFT text, tokenised once into an on-disk cache that every rank memory-maps and reads rows of.

Why a flat token array and not HF `datasets` Arrow with `map(num_proc=...)`: what a language SFT trains on is
fixed-length rows of token ids, so the cache is one `[rows × max_len]` array of uint16 (uint32 for vocabularies
past 65 535) plus one length per row: 2 bytes a token, no offsets or schema, and a rank reads its micro-batch with
one fancy index into a `numpy.memmap` (only those pages are read). A fast tokenizer already batches in Rust, so
worker processes would mostly hold more copies of it and compete for the same cores; one streaming pass in chunks
of lines keeps the memory at one chunk whatever the corpus size.

One directory per fingerprint of (text source, tokenizer, max_len, packing, held-out split), so a second run or
another stage with the same inputs reuses it: `train.ids`/`train.len`, `held.ids`/`held.len` and `meta.json`
(shapes, dtype, token accounting). Held-out lines are drawn per line from the seed before packing, so no block
mixes held-out and training text. Rank 0 writes it into a temp directory beside its final place and renames it
there (atomic: a concurrent builder, e.g. another job, either wins or finds the finished cache and drops its own);
the other ranks wait (`hub.rank_zero_first`) and then map it. The cache directory must be one every rank sees.

Packing (`Layout.packed`): the lines' tokens (each followed by `separator`, if any) form one stream cut into
blocks framed by the tokenizer's special tokens. The final partial block is `pad`ded (masked LM: a shorter last
row) or `overlap`s the block before it (causal LM: it takes the stream's last full block of tokens, so every row
stays full); either way every token is used. Line by line (not packed), lines longer than a row are cut and the
cut tokens are counted as dropped.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ltsft_dist.errors import LtsftError

FORMAT_VERSION = 1  # part of every fingerprint: a changed layout never reads an old cache
HELD_BLOCK = 65536  # lines per seeded held-out draw
CHUNK_LINES, CHUNK_CHARS = 4096, 1 << 20  # lines tokenised at once (whichever limit comes first; a fast
# tokenizer's Encoding objects take ~100 bytes a token, so 1 MB of text peaks at ~30 MB)
PARTS = ("train", "held")


# --- text sources --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextSource:
    """Non-blank lines of a text file or of a HF dataset's text column, read lazily, with an identity for the
    cache key. `part` ("train"/"held", with `fraction` and `seed`) is one side of a held-out split; `cache_dir`
    (set by `training_data` from `data.cache_dir`) is where the task's encoding caches its rows."""

    where: str  # the file or dataset, for messages
    identity: tuple  # what the text is (path, size, mtime; or the dataset's fingerprint)
    read: Callable[[], Iterator[str]] = field(compare=False, repr=False)
    part: str | None = None
    fraction: float = 0.0
    seed: int = 0
    cache_dir: str | None = field(default=None, compare=False)  # where its token cache goes (None: in memory)

    def __iter__(self) -> Iterator[str]:
        """The lines of this part (of the whole text without a split)."""
        if self.part is None:
            return self.read()
        return (line for line, held in zip(self.read(), held_flags(self.fraction, self.seed))
                if held == (self.part == "held"))

    def split(self, fraction: float, seed: int) -> tuple[TextSource, TextSource]:
        """(train, held): each line held out with probability `fraction`, drawn from `seed` and its line number."""
        return tuple(replace(self, part=part, fraction=fraction, seed=seed) for part in PARTS)


def held_flags(fraction: float, seed: int) -> Iterator[bool]:
    """Whether line 0, 1, ... is held out: a seeded draw per block of lines, the same however the text is read."""
    for block in itertools.count():
        yield from (np.random.default_rng([seed, block]).random(HELD_BLOCK) < fraction).tolist()


def text_file(path: str | Path) -> TextSource:
    """A UTF-8 file of one text per line (blank lines skipped); missing, blank or undecodable files are errors
    that name the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise LtsftError(f"{path}: file not found (check the path in the data configuration)")

    def read() -> Iterator[str]:
        with path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise LtsftError(f"{path}:{number}: not valid UTF-8 ({err.reason}); re-encode the file as "
                                     "UTF-8") from None
                line = (line.removeprefix("\ufeff") if number == 1 else line).strip()
                if line:
                    yield line

    stat = path.stat()
    source = TextSource(str(path), ("file", str(path.resolve()), stat.st_size, stat.st_mtime_ns), read)
    if next(iter(source), None) is None:
        raise LtsftError(f"{path}: the file is empty; point the configuration at a file with data")
    return source


def dataset_text(dataset, column: str, where: str) -> TextSource:
    """The non-blank values of a (memory-mapped, Arrow) HF dataset's text column, read in batches."""
    if column not in dataset.column_names:
        raise LtsftError(f"{where}: no column {column!r} (has {dataset.column_names}); pass the text column name")

    def read() -> Iterator[str]:
        for batch in dataset.select_columns([column]).iter(batch_size=1000):
            for value in batch[column]:
                if value is not None and str(value).strip():
                    yield str(value).strip()

    source = TextSource(where, ("hf", where, column, getattr(dataset, "_fingerprint", None) or len(dataset)), read)
    if next(iter(source), None) is None:
        raise LtsftError(f"{where}: column {column!r} holds no text")
    return source


# --- lines to rows -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """How lines become rows of `max_len` tokens (see the module docstring)."""

    max_len: int
    packed: bool = True
    separator: int | None = None  # a token after every line (causal LM: end of sequence)
    last_block: str = "pad"  # packed: the final partial block is "pad"ded or "overlap"s the one before


@dataclass
class TokenCount:
    """Where the text's tokens went. `tokens` counts the text's tokens and separators; `used + dropped ==
    tokens`; `repeated`: tokens in a row twice (the overlapping last block)."""

    lines: int = 0
    empty: int = 0  # lines without tokens, left out
    truncated: int = 0  # lines cut to a row (line by line)
    tokens: int = 0
    used: int = 0
    dropped: int = 0
    repeated: int = 0
    rows: int = 0

    def report(self) -> dict[str, int]:
        return {"rows": self.rows, "lines": self.lines, "empty": self.empty, "truncated": self.truncated,
                "tokens": self.tokens, "tokens_used": self.used, "tokens_dropped": self.dropped,
                "tokens_repeated": self.repeated}


@dataclass
class Rows:
    """Fixed-length rows of token ids (padded after `lengths[i]`): in memory, or a cache's memory maps."""

    ids: np.ndarray  # [rows, max_len]
    lengths: np.ndarray  # [rows]
    count: TokenCount = field(default_factory=TokenCount)

    def __len__(self) -> int:
        return len(self.ids)


def special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after one sequence ([CLS] … [SEP], <s> … </s>)."""
    body, full = tokenizer("a", add_special_tokens=False)["input_ids"], tokenizer("a")["input_ids"]
    for i in range(len(full) - len(body) + 1):
        if body and full[i:i + len(body)] == body:
            return full[:i], full[i + len(body):]
    raise LtsftError("cannot find the tokenizer's special-token template; use a tokenizer with a post-processor")


def token_dtype(tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if len(tokenizer) <= 65536 else np.uint32)


class Packer:
    """Token lists in, framed rows out, chunk by chunk: only a partial block is carried between chunks."""

    def __init__(self, tokenizer, layout: Layout):
        if tokenizer.pad_token_id is None:
            raise LtsftError("the tokenizer has no pad token; set one (e.g. tokenizer.pad_token = ...)")
        self.prefix, self.suffix = special_frame(tokenizer)
        self.room = layout.max_len - len(self.prefix) - len(self.suffix)
        if self.room <= 0:
            raise LtsftError(f"max_len={layout.max_len} leaves no room for text after the special tokens; raise it")
        self.layout, self.pad, self.dtype = layout, tokenizer.pad_token_id, token_dtype(tokenizer)
        self.carry = np.zeros(0, dtype=np.int64)  # packed: the stream's tokens not yet in a row
        self.tail = np.zeros(0, dtype=np.int64)  # packed: the last `room` tokens already in a row
        self.count = TokenCount()

    def _frame(self, bodies: list[np.ndarray] | np.ndarray) -> Rows:
        """Rows of prefix + body + suffix, padded; `bodies` as a 2-D array are full blocks (framed at once)."""
        ids = np.full((len(bodies), self.layout.max_len), self.pad, dtype=self.dtype)
        p, s = len(self.prefix), len(self.suffix)
        if isinstance(bodies, np.ndarray):
            ids[:, :p], ids[:, p:p + self.room], ids[:, p + self.room:] = self.prefix, bodies, self.suffix
            lengths = np.full(len(bodies), self.layout.max_len, dtype=np.int32)
        else:
            lengths = np.zeros(len(bodies), dtype=np.int32)
            for r, body in enumerate(bodies):
                n = len(body)
                ids[r, :p], ids[r, p:p + n], ids[r, p + n:p + n + s] = self.prefix, body, self.suffix
                lengths[r] = p + n + s
        self.count.rows += len(bodies)
        return Rows(ids, lengths)

    def add(self, token_lists: list[list[int]]) -> Rows:
        kept = [t for t in token_lists if t]
        self.count.lines += len(token_lists)
        self.count.empty += len(token_lists) - len(kept)
        end = [] if self.layout.separator is None else [self.layout.separator]
        if not self.layout.packed:
            self.count.tokens += sum(len(t) for t in kept)
            cut = [len(t) - self.room for t in kept if len(t) > self.room]
            self.count.truncated += len(cut)
            self.count.dropped += sum(cut)
            self.count.used = self.count.tokens - self.count.dropped
            return self._frame([np.asarray(t[:self.room]) for t in kept])
        total = sum(len(t) for t in kept) + len(end) * len(kept)
        fresh = np.fromiter(itertools.chain.from_iterable(t + end for t in kept), dtype=np.int64, count=total)
        stream = np.concatenate([self.carry, fresh])
        self.count.tokens += total
        self.count.used += total
        full = len(stream) // self.room * self.room
        self.carry = stream[full:].copy()  # copies: a view would keep the whole chunk's stream alive
        if full:
            self.tail = stream[full - self.room:full].copy()
        return self._frame(stream[:full].reshape(-1, self.room))

    def finish(self) -> Rows:
        """The final partial block (see `Layout.last_block`)."""
        carry, self.carry = self.carry, self.carry[:0]
        if not self.layout.packed or not len(carry):
            return self._frame([])
        if self.layout.last_block == "pad":
            return self._frame([carry])
        if not len(self.tail):  # less than one block of text: nothing to overlap
            self.count.used -= len(carry)
            self.count.dropped += len(carry)
            return self._frame([])
        self.count.repeated += self.room - len(carry)
        return self._frame([np.concatenate([self.tail[len(carry):], carry])])


def chunks(lines: Iterable[str]) -> Iterator[list[str]]:
    """Consecutive lines, at most CHUNK_LINES and about CHUNK_CHARS characters at a time."""
    chunk, size = [], 0
    for line in lines:
        chunk.append(line)
        size += len(line)
        if len(chunk) >= CHUNK_LINES or size >= CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def tokenize(tokenizer, lines: list[str]) -> list[list[int]]:
    """The lines' ids without special tokens. A fast tokenizer's Rust backend is called directly when nothing
    (truncation, padding) is set on it: the same ids as `tokenizer(lines)`, about twice as fast."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        return [e.ids for e in backend.encode_batch(lines, add_special_tokens=False)]
    return tokenizer(lines, add_special_tokens=False, return_attention_mask=False)["input_ids"]


def pack_lines(tokenizer, lines: Iterable[str], layout: Layout) -> Rows:
    """Rows in memory (small texts: tests, a tiny base's pretraining text), by the same packing as the cache."""
    packer = Packer(tokenizer, layout)
    parts = [packer.add(tokenize(tokenizer, chunk)) for chunk in chunks(lines)] + [packer.finish()]
    return Rows(np.concatenate([p.ids for p in parts]), np.concatenate([p.lengths for p in parts]), packer.count)


# --- the cache -----------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    text += json.dumps([type(tokenizer).__name__, tokenizer.all_special_tokens, len(tokenizer)])
    return hashlib.sha256(text.encode()).hexdigest()


def cache_key(source: TextSource, tokenizer, layout: Layout) -> str:
    parts = [FORMAT_VERSION, list(source.identity), source.fraction, source.seed, tokenizer_fingerprint(tokenizer),
             asdict(layout)]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


def build(source: TextSource, tokenizer, layout: Layout, directory: Path) -> None:
    """Tokenise `source` (both parts of its split) into `directory`, streaming; atomic (see the module docstring)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    temp = directory.parent / f".{directory.name}.{uuid.uuid4().hex}.tmp"
    temp.mkdir()
    try:
        packers = {part: Packer(tokenizer, layout) for part in PARTS}
        files = {part: (open(temp / f"{part}.ids", "wb"), open(temp / f"{part}.len", "wb")) for part in PARTS}
        whole = replace(source, part=None)
        flags = held_flags(source.fraction, source.seed)

        def write(part: str, rows: Rows) -> None:
            files[part][0].write(rows.ids.tobytes())
            files[part][1].write(rows.lengths.tobytes())

        try:
            for chunk in chunks(whole):
                ids = tokenize(tokenizer, chunk)
                held = list(itertools.islice(flags, len(ids)))
                for part in PARTS:
                    write(part, packers[part].add([t for t, h in zip(ids, held) if h == (part == "held")]))
            for part in PARTS:
                write(part, packers[part].finish())
        finally:
            for f in itertools.chain.from_iterable(files.values()):
                f.flush()
                os.fsync(f.fileno())
                f.close()
        meta = {"version": FORMAT_VERSION, "where": source.where, "layout": asdict(layout),
                "dtype": token_dtype(tokenizer).name, "fraction": source.fraction, "seed": source.seed,
                "parts": {part: asdict(packers[part].count) for part in PARTS}}
        (temp / "meta.json").write_text(json.dumps(meta, indent=1))  # last: a directory with it is complete
        try:
            os.rename(temp, directory)
        except OSError:
            if not (directory / "meta.json").is_file():  # not lost to a concurrent builder of the same cache
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def open_rows(directory: Path, part: str) -> Rows:
    """A part of a finished cache, memory-mapped read-only."""
    meta = json.loads((directory / "meta.json").read_text())
    count = TokenCount(**meta["parts"][part])
    shape = (count.rows, meta["layout"]["max_len"])
    if not count.rows:
        return Rows(np.zeros(shape, dtype=meta["dtype"]), np.zeros(0, dtype=np.int32), count)
    return Rows(np.memmap(directory / f"{part}.ids", dtype=meta["dtype"], mode="r", shape=shape),
                np.memmap(directory / f"{part}.len", dtype=np.int32, mode="r", shape=(count.rows,)), count)


def cached_rows(source: TextSource, tokenizer, layout: Layout, cache_dir: str | Path) -> Rows:
    """The rows of `source` (its part, with a split) from the cache under `cache_dir`, built first if missing.
    Collective under a launcher: rank 0 builds, the others wait and then map it."""
    from ltsft_dist.hub import rank_zero_first

    directory = Path(cache_dir) / cache_key(source, tokenizer, layout)

    def fetch(local_only: bool) -> Rows:
        if not (directory / "meta.json").is_file():
            if local_only:
                raise LtsftError(f"{directory}: the token cache rank 0 wrote is not visible here; put data.cache_dir "
                                 "on a filesystem every node mounts")
            build(source, tokenizer, layout, directory)
        return open_rows(directory, source.part or "train")

    return rank_zero_first(fetch, f"{source.where}: tokenising into the cache {directory} failed")


# --- rows as model inputs ------------------------------------------------------------------------------------


class Column:
    """One model input over `Rows` that indexes like a [rows × max_len] tensor: `column[idx]` reads only the rows
    asked for and returns a tensor (`make(ids, lengths)`)."""

    def __init__(self, rows: Rows, make: Callable[[np.ndarray, np.ndarray], torch.Tensor]):
        self.rows, self.make = rows, make

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.rows.ids.shape)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, torch.Tensor):
            index = index.numpy()
        return self.make(np.asarray(self.rows.ids[index]), np.asarray(self.rows.lengths[index]))


def input_ids(ids: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(ids.astype(np.int64))


def attention_mask(ids: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((np.arange(ids.shape[-1]) < lengths[..., None]).astype(np.int64))


def columns(rows: Rows, dense: bool, **extra: Callable) -> dict[str, torch.Tensor | Column]:
    """input_ids, attention_mask (and `extra` inputs made from the rows): tensors (`dense`) or lazy `Column`s."""
    makers = {"input_ids": input_ids, "attention_mask": attention_mask, **extra}
    if dense:
        return {name: make(np.asarray(rows.ids), np.asarray(rows.lengths)) for name, make in makers.items()}
    return {name: Column(rows, make) for name, make in makers.items()}
