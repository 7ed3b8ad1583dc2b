"""Fixtures for the whole suite: a private cache, the real corpora, a tiny federation config."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Tokenizer caches go to a temp dir, never the user's HOME; no test may reach a model hub."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    mp.setenv("HF_HUB_OFFLINE", "1")
    yield
    mp.undo()


@pytest.fixture
def data_dir() -> Path:
    if not (SHARED_DATA / "medquad").is_dir():
        pytest.skip(f"real corpora not found at {SHARED_DATA} (see shared/data/DATA.md)")
    return SHARED_DATA


@pytest.fixture
def smoke_config(data_dir):
    """The tiny multi-round federation (configs/smoke-multiround.toml), on the real corpora."""
    from deepfusion.config import default_config_path, load_config

    cfg = load_config(default_config_path("smoke-multiround"))
    cfg.data.dir = str(data_dir)
    return cfg
