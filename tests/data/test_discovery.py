"""Data-dir resolution order, and the download path against a loopback HTTP server (never the internet)."""

import functools
import hashlib
import http.server
import io
import socket
import threading
import zipfile

import pytest

from deepfusion.data import Upstream, download_upstream, resolve_data_dir
from deepfusion.errors import DataError
from deepfusion.data import discovery
from deepfusion.data.discovery import UPSTREAM, content_sha256

JSON = b'[{"table": {"uid": "u1", "table": []}, "paragraphs": [], "questions": []}]'


def make_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("Repo-abc/1_CancerGov_QA/", "")
        zf.writestr("Repo-abc/1_CancerGov_QA/0001.xml", "<Document/>")
        zf.writestr("Repo-abc/LICENSE.txt", "CC BY 4.0")
        zf.writestr("Repo-abc/unwanted/big.bin", "x" * 100)
        zf.writestr("Repo-abc/1_CancerGov_QA/../../escape.txt", "no")
    return buf.getvalue()


@pytest.fixture
def server(tmp_path):
    """Serve a tiny zip and json from 127.0.0.1 on a free port."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "repo.zip").write_bytes(make_zip())
    (root / "dev.json").write_bytes(JSON)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def sources(url, zip_sha=None, json_sha=None):
    if zip_sha is None:  # content checksum of exactly the wanted members: not unwanted/, not ../
        want = {"1_CancerGov_QA/0001.xml": b"<Document/>", "LICENSE.txt": b"CC BY 4.0"}
        zip_sha = hashlib.sha256("".join(f"{p}\t{hashlib.sha256(b).hexdigest()}\n"
                                         for p, b in sorted(want.items())).encode()).hexdigest()
    return [
        Upstream("medquad", f"{url}/repo.zip", zip_sha, kind="zip", dest="medquad",
                 prefix="Repo-abc/", members=("1_CancerGov_QA", "LICENSE.txt")),
        Upstream("tatqa", f"{url}/dev.json", json_sha or hashlib.sha256(JSON).hexdigest(),
                 dest="tatqa/tatqa_dataset_dev.json"),
    ]


def test_download_verifies_and_extracts(server, tmp_path):
    dest = tmp_path / "cache" / "data"
    assert download_upstream(dest, sources(server), timeout=5) == dest.resolve()
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
        "medquad/1_CancerGov_QA/0001.xml", "medquad/LICENSE.txt", "tatqa/tatqa_dataset_dev.json"]
    assert (dest / "tatqa" / "tatqa_dataset_dev.json").read_bytes() == JSON
    assert [p.name for p in dest.parent.iterdir()] == ["data"]  # no temp dirs left


@pytest.mark.parametrize("bad", ["zip", "json"])
def test_checksum_mismatch_leaves_nothing(server, tmp_path, bad):
    dest = tmp_path / "cache" / "data"
    srcs = sources(server, **{f"{bad}_sha": "0" * 64})
    with pytest.raises(DataError, match=f"expected {'0' * 64}") as e:
        download_upstream(dest, srcs, timeout=5)
    assert "got sha256" in str(e.value) and srcs[bad == "json"].url in str(e.value)
    assert list((tmp_path / "cache").iterdir()) == []


def test_unreachable_url_says_how_to_supply_data(tmp_path):
    with socket.socket() as s:  # bind then close: nothing listens on this loopback port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError) as e:
        download_upstream(tmp_path / "data", sources(f"http://127.0.0.1:{port}"), timeout=2)
    msg = str(e.value)
    assert "DEEPFUSION_DATA" in msg and "--data-dir" in msg and "medquad/ and tatqa/" in msg
    assert all(src.url in msg for src in sources(f"http://127.0.0.1:{port}"))
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No env, no shared data beside cwd or the repo, an empty user cache."""
    monkeypatch.delenv("DEEPFUSION_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(discovery, "REPO_SHARED_DATA", tmp_path / "no-repo")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return tmp_path


def data_dir(path, sub="medquad"):
    (path / sub).mkdir(parents=True)
    return path


def test_resolution_order(isolated, monkeypatch):
    cache = data_dir(isolated / "xdg" / "deepfusion" / "data")
    assert resolve_data_dir(download=False) == cache.resolve()
    shared = data_dir(isolated / "shared" / "data", "tatqa")  # ../shared/data from cwd
    assert resolve_data_dir(download=False) == shared.resolve()
    env = data_dir(isolated / "env")
    monkeypatch.setenv("DEEPFUSION_DATA", str(env))
    assert resolve_data_dir(download=False) == env.resolve()
    flag = data_dir(isolated / "flag")
    assert resolve_data_dir(str(flag), download=False) == flag.resolve()


def test_repo_relative_shared_data(isolated, monkeypatch):
    repo_shared = data_dir(isolated / "repo-shared")
    monkeypatch.setattr(discovery, "REPO_SHARED_DATA", repo_shared)
    assert resolve_data_dir(download=False) == repo_shared.resolve()


def test_named_missing_dirs_do_not_fall_through(isolated, monkeypatch):
    data_dir(isolated / "xdg" / "deepfusion" / "data")
    with pytest.raises(DataError, match=r"--data-dir points at .*nope"):
        resolve_data_dir(isolated / "nope")
    monkeypatch.setenv("DEEPFUSION_DATA", str(isolated / "gone"))
    with pytest.raises(DataError, match=r"DEEPFUSION_DATA points at .*gone"):
        resolve_data_dir()


def test_nothing_found_without_download(isolated):
    with pytest.raises(DataError, match="found no data directory.*DEEPFUSION_DATA"):
        resolve_data_dir(download=False)


def test_downloads_into_user_cache(isolated, server, monkeypatch):
    monkeypatch.setattr(discovery, "UPSTREAM", sources(server))
    got = resolve_data_dir()
    assert got == (isolated / "xdg" / "deepfusion" / "data").resolve()
    assert (got / "tatqa" / "tatqa_dataset_dev.json").read_bytes() == JSON
    assert resolve_data_dir(download=False) == got  # found in the cache next time


def test_pinned_medquad_checksum_matches_shared_copy(shared_data):
    [medquad] = [s for s in UPSTREAM if s.name == "medquad"]
    assert content_sha256(shared_data / "medquad") == medquad.sha256
    for src in UPSTREAM:
        if src.kind == "file":
            assert hashlib.sha256((shared_data / src.dest).read_bytes()).hexdigest() == src.sha256
