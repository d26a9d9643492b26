import os
import sys
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
