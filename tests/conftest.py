import inspect
import os
import shutil
import sys
import traceback
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
IN_CI = os.environ.get("CI", "").lower() == "true"


def require_shared_data():
    """Shared data must be there in CI; on a user's clone the test skips with the reason."""
    if SHARED_DATA.is_dir():
        return SHARED_DATA
    if IN_CI:
        pytest.fail(f"CI=true but {SHARED_DATA} is missing")
    pytest.skip(f"needs the shared data set at {SHARED_DATA}")


def mpiexec_available() -> bool:
    return Path(sys.prefix, "bin", "mpiexec").exists() or shutil.which("mpiexec") or shutil.which("mpirun")


class Launches:
    """Multi-rank launches, each run once per test session: its result is kept, and so is its failure, which every
    test that needs the launch then reports without starting the ranks again."""

    def __init__(self):
        self._done = {}

    def __call__(self, launch, *args):
        bound = inspect.signature(launch).bind(*args)
        bound.apply_defaults()
        key = (launch.__module__, launch.__qualname__, tuple(bound.arguments.items()))
        if key not in self._done:
            try:
                self._done[key] = ("ok", launch(*args))
            except Exception:
                self._done[key] = ("failed", traceback.format_exc())
        status, value = self._done[key]
        if status == "failed":
            pytest.fail(f"the launch {launch.__qualname__}{args} failed (once, for every test using it):\n{value}")
        return value


@pytest.fixture(scope="session")
def launches() -> Launches:
    return Launches()


def pytest_collection_modifyitems(items):
    """A test that uses a multi-rank launch (the `launches` fixture, directly or through another fixture) is
    `multirank` and `slow`; the markers are registered in pyproject.toml."""
    for item in items:
        if "launches" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.multirank)
            item.add_marker(pytest.mark.slow)
