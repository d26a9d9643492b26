"""Hub ids and local directories, one rule everywhere; under a launcher rank 0 downloads first.

A base model, tokenizer or SFT is named by a local directory or a Hugging Face hub id (`xlm-roberta-base`,
`owner/name`); `resolve` turns either into a local directory (a hub id: its snapshot in the HF cache). When every
rank of a job needs the same repository, rank 0 fetches it alone while the others wait, and they then read it from
the cache without the network (`local_files_only`): one download instead of W at once, and no reliance on file
locks that shared filesystems often lack. A failure on rank 0 is sent to every rank, so all stop with one message
saying what went wrong (network, access, not found) and what fixes it. Rank 0 downloads in a thread and tells the
waiting ranks every HEARTBEAT_S that it still runs, so a download may take longer than the collective timeout. The
cache must be on a filesystem every node sees (HF_HOME / HF_HUB_CACHE), as the run directory must.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Callable, TypeVar

from ltsft_dist import comm
from ltsft_dist.errors import LtsftError

T = TypeVar("T")

# What loading a model and its tokenizer needs; not the TF/Flax/ONNX copies many model repositories also hold.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
TOKENIZER_FILES = ["*.json", "*.model", "*.txt", "*.tiktoken"]
PYTORCH_BIN_FILES = ["pytorch_model*.bin"]  # older repositories without safetensors


def hub_id_or_dir(name_or_path, what: str, kind: str) -> Path | str:
    """A local directory as a Path, or the text of a hub id; anything else (a missing path, a file) is an error
    naming `what` (e.g. "--base") and `kind` (e.g. "a model directory")."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    bad = path.exists() or text.startswith((".", "/", "~")) or not text.strip()
    if not bad:
        try:
            validate_repo_id(text)
        except HFValidationError:
            bad = True
    if bad:
        raise LtsftError(f"{_named(what, text)}: not {kind} (and not a hub id of the form owner/name or name); "
                         "check the path")
    return text


def resolve(name_or_path, what: str = "", kind: str = "a model directory", *, collective: bool = True,
            **snapshot_kwargs) -> Path:
    """The local directory of `name_or_path`: itself, or a hub id's snapshot (`snapshot_kwargs` go to
    `huggingface_hub.snapshot_download`; by default the files of a PyTorch model and its tokenizer).

    `collective`: every rank of the job calls this together (rank 0 downloads first); False when only this
    process asks (e.g. rank 0 building the tokenizer for all). A local directory involves no other rank."""
    found = hub_id_or_dir(name_or_path, what, kind)
    if isinstance(found, Path):
        return found
    a_model = "allow_patterns" not in snapshot_kwargs
    snapshot_kwargs.setdefault("allow_patterns", MODEL_FILES)

    def fetch(local_only: bool) -> Path:
        directory = Path(_snapshot(found, local_only, snapshot_kwargs))
        if a_model and not _has_weights(directory):
            directory = Path(_snapshot(found, local_only, {**snapshot_kwargs, "allow_patterns": PYTORCH_BIN_FILES}))
        return directory

    describe = (f"{_named(what, repr(found))} is not a local directory, and downloading it from the Hugging Face "
                "hub failed")
    return rank_zero_first(fetch, describe) if collective else _plain(fetch, describe)


def _named(what: str, text: str) -> str:
    return f"{what} {text}" if what else text


def _snapshot(repo_id: str, local_only: bool, kwargs: dict) -> str:
    import huggingface_hub

    return huggingface_hub.snapshot_download(repo_id, **{**kwargs, **({"local_files_only": True} if local_only else {})})


def _has_weights(directory: Path) -> bool:
    return any(directory.glob("*.safetensors")) or any(directory.glob("pytorch_model*.bin"))


@contextlib.contextmanager
def datasets_offline():
    """`datasets` in offline mode for the calls inside (its switch is read from HF_HUB_OFFLINE at import): it
    loads a hub dataset's prepared copy from HF_DATASETS_CACHE and asks the hub nothing."""
    import datasets.config

    saved = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = saved


def rank_zero_first(fetch: Callable[[bool], T], describe: str) -> T:
    """`fetch(local_only=False)` on rank 0, then `fetch(local_only=True)` on the others once it has finished.
    Any failure reaches every rank as the same `LtsftError`: "`describe`: why; what to do". Collective; alone
    (no launched group) it is just `fetch(False)`."""
    if comm.world_size() == 1:
        return _plain(fetch, describe)
    result, error = None, None
    if comm.rank() == 0:
        result, error = _fetch_telling_the_others(fetch, describe)
    else:
        state = RUNNING
        while state == RUNNING:  # one collective per heartbeat: each ends well within the process group's timeout
            state = comm.broadcast_object(None)
        error = state[1]
    if error is not None:
        raise LtsftError(error)
    if comm.rank() != 0:
        try:
            result = fetch(True)
        except Exception as err:
            error = (f"{explain(err, describe)} (on rank {comm.rank()}, from the cache rank 0 filled: every node "
                     "must see the same Hugging Face cache; put HF_HOME on the shared filesystem)")
    errors = [e for e in comm.all_gather_object(error) if e is not None]
    if errors:
        raise LtsftError(errors[0])
    return result


HEARTBEAT_S = 30.0  # how often rank 0 tells the waiting ranks that its download still runs
RUNNING = ("running", None)


def _fetch_telling_the_others(fetch: Callable[[bool], T], describe: str) -> tuple[T | None, str | None]:
    """Rank 0's `fetch(False)` in a thread, while this one broadcasts RUNNING every HEARTBEAT_S and then
    ("done", error message or None): a download of any length never meets the collective timeout."""
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = fetch(False)
        except Exception as err:  # the hub and datasets raise many types; every one becomes one message
            outcome["error"] = explain(err, describe)

    worker = threading.Thread(target=run, name="ltsft-hub-fetch", daemon=True)
    worker.start()
    while True:
        worker.join(HEARTBEAT_S)
        if not worker.is_alive():
            comm.broadcast_object(("done", outcome.get("error")))
            return outcome.get("result"), outcome.get("error")
        comm.broadcast_object(RUNNING)


def _plain(fetch: Callable[[bool], T], describe: str) -> T:
    try:
        return fetch(False)
    except Exception as err:
        raise LtsftError(explain(err, describe)) from None


def explain(err: Exception, describe: str) -> str:
    """`describe`, the kind of failure (network, access, not found) with the error itself, and the fix; an
    `LtsftError` (e.g. from the token cache's build) already says what and where, and is passed on as it is."""
    from huggingface_hub import errors as hub_errors

    if isinstance(err, LtsftError):
        return str(err)

    name = type(err).__name__
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, hub_errors.GatedRepoError) or status in (401, 403):
        why = ("access denied to a gated or private repository", "accept its terms on the hub and log in "
               "(`hf auth login` or HF_TOKEN) on the machine that downloads")
    elif isinstance(err, hub_errors.RevisionNotFoundError):
        why = ("no such revision", "check the revision (branch, tag or commit)")
    elif isinstance(err, hub_errors.RepositoryNotFoundError) or name == "DatasetNotFoundError" or status == 404:
        why = ("not found on the hub", "check the id (and log in if it is private)")
    elif isinstance(err, (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled, ConnectionError,
                          TimeoutError)) or name in ("ConnectError", "ConnectTimeout", "ReadTimeout"):
        why = ("the hub cannot be reached and it is not in the local cache", "check the connection, or fill the "
               "cache (HF_HOME) where there is a network and set HF_HUB_OFFLINE=1")
    elif isinstance(err, ValueError) and "config" in str(err).lower():
        why = ("the dataset has no such config or split", "check the language code or config name, and the split")
    else:
        why = ("unexpected error", "check the id, the connection and the cache")
    reason = str(err).strip().splitlines()[0] if str(err).strip() else "no details"
    return f"{describe}: {why[0]} ({name}: {reason}); {why[1]}"
