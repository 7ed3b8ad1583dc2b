"""Fixtures for the whole suite: a private cache, the real corpora, a tiny federation config."""

import json
from dataclasses import dataclass
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


@pytest.fixture(scope="session")
def byo_tokenizers(tmp_path_factory) -> dict[str, Path]:
    """tests/byo.py's three tokenizers (byte-level BPE, Unigram, WordPiece), trained once per session."""
    from tests.byo import three_tokenizers

    return three_tokenizers(tmp_path_factory.mktemp("byo"))


@pytest.fixture
def smoke_config(data_dir):
    """The tiny multi-round federation (configs/smoke-multiround.toml), on the real corpora."""
    from deepfusion.config import default_config_path, load_config

    cfg = load_config(default_config_path("smoke-multiround"))
    cfg.data.dir = str(data_dir)
    return cfg


# ---- shared runs and data: the suite's expensive state, built once (CI's 10-minute budget) ---------------

@dataclass(frozen=True)
class SmokeRun:
    """One finished run: root/recordings holds its recorded device uploads, out its run directory."""

    root: Path
    out: Path
    recordings: Path

    def summary(self) -> dict:
        return json.loads((self.out / "summary.json").read_text())


@pytest.fixture(scope="session")
def smoke_deepfusion(tmp_path_factory) -> SmokeRun:
    """The paper pipeline on configs/smoke.toml (data.dir = the real corpora), its Phase 0 recorded: out is
    root/runs/deepfusion/s0 (the pipeline bench's layout), root/recordings the recording. Shared by
    tests/recipes/test_deepfusion.py, tests/baselines/test_fedmkt.py, tests/benchmarks/test_recheck.py and
    tests/engines/test_flower_oneshot.py (the local engine's reference, on this process's threads as Flower's
    simulation): read it, replay its recording (`smoke_deepfusion_flags` for the CLI), copy it before changing
    anything."""
    from deepfusion.config import default_config_path, load_config
    from deepfusion.engines.local import run

    if not (SHARED_DATA / "medquad").is_dir():
        pytest.skip(f"real corpora not found at {SHARED_DATA} (see shared/data/DATA.md)")
    root = tmp_path_factory.mktemp("smoke-deepfusion")
    cfg = load_config(default_config_path("smoke"))
    cfg.data.dir = str(SHARED_DATA)  # in the summary's config (a recheck reads it) and in the recording's key
    out = root / "runs" / "deepfusion" / "s0"
    run(cfg, out, progress=False, replay=root / "recordings")
    return SmokeRun(root, out, root / "recordings")


@dataclass(frozen=True)
class MultiroundRun:
    """One finished `deepfusion run` of configs/smoke-multiround.toml: out is its run directory, digests each
    device's packet sha256 per round as the server step received them."""

    out: Path
    digests: dict[str, list[str]]

    def summary(self) -> dict:
        return json.loads((self.out / "summary.json").read_text())


def smoke_multiround_args(out: Path) -> list[str]:
    """The command line of `smoke_multiround`'s run (tests/test_cli_runs.py's run_args(out) with 2 rounds)."""
    from deepfusion.config import default_config_path

    return ["run", "--config", str(default_config_path("smoke-multiround")), "--data-dir", str(SHARED_DATA),
            "--rounds", "2", "--no-progress", "--out", str(out)]


@pytest.fixture(scope="session")
def smoke_multiround(tmp_path_factory) -> MultiroundRun:
    """The multi-round federation on configs/smoke-multiround.toml through the command line (2 rounds, the real
    corpora), run once: shared by tests/engines/test_local.py, tests/test_cli_runs.py and the Flower tests that
    compare with the local engine (test_flower_simulation, test_flower_deployment). Read it; copy it before
    changing anything: at the session's end every file in it (but the lock file a refused run opens) must be
    as the run left it."""
    import hashlib

    import deepfusion.engines.local as local
    from deepfusion.cli import main

    if not (SHARED_DATA / "medquad").is_dir():
        pytest.skip(f"real corpora not found at {SHARED_DATA} (see shared/data/DATA.md)")
    out = tmp_path_factory.mktemp("smoke-multiround") / "run"
    digests: dict[str, list[str]] = {}
    server_round = local.server_round

    def recording(server, payloads, r):
        for device, packet in payloads.items():
            digests.setdefault(device, []).append(hashlib.sha256(packet).hexdigest())
        return server_round(server, payloads, r)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(local, "server_round", recording)
        assert main(smoke_multiround_args(out)) == 0
    files = _files_of(out)
    yield MultiroundRun(out, digests)
    assert _files_of(out) == files, f"a test changed the shared smoke-multiround run in {out}: work on a copy"


def _files_of(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def smoke_deepfusion_flags(smoke: SmokeRun) -> list[str]:
    """`deepfusion run` flags that replay `smoke_deepfusion`'s Phase 0 for configs/smoke.toml (or a copy that
    changes only the server's side): the same data.dir, hence the same recording key."""
    return ["--set", f"data.dir={SHARED_DATA}", "--replay", str(smoke.recordings)]


_PREPARED: dict[str, object] = {}  # shared_prepare_data's memo, for the whole session


@pytest.fixture
def shared_prepare_data(monkeypatch):
    """The local engine's prepare_data memoised across the tests that ask for it: runs on the same data config,
    devices and data directory tokenise the corpora once per session (about half a smoke run's time). Each run
    gets its own deep copy, so no run sees another's changes. Only for tests about what runs do with their data:
    the data pipeline itself is tested in tests/data and runs in every test that does not ask for this."""
    import copy

    import deepfusion.engines.local as local
    from deepfusion.config import to_dict

    real = local.prepare_data

    def prepare_data(cfg, data_dir=None, *args, **kwargs):
        raw = to_dict(cfg)
        key = json.dumps([raw["data"], raw["devices"], str(data_dir), args, kwargs], sort_keys=True, default=str)
        if key not in _PREPARED:
            _PREPARED[key] = real(cfg, data_dir, *args, **kwargs)
        return copy.deepcopy(_PREPARED[key])

    monkeypatch.setattr(local, "prepare_data", prepare_data)
