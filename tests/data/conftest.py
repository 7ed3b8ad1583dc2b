"""Shared fixtures: the real corpora beside the repo, when present."""

from pathlib import Path

import pytest

# /work/main/tests/data/conftest.py → /work/shared/data
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "medquad").is_dir() or not (SHARED_DATA / "tatqa").is_dir():
        pytest.skip(f"real corpora not found at {SHARED_DATA} (see shared/data/DATA.md)")
    return SHARED_DATA
