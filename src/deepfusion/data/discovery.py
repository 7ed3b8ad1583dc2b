"""Find the data directory, or download the pinned upstream corpora into the user cache."""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from deepfusion.data.corpora import MEDQUAD_SOURCES
from deepfusion.errors import DataError


@dataclass(frozen=True)
class Upstream:
    name: str
    url: str
    sha256: str  # file: of its bytes; zip: content_sha256 of what we extract (archives are not byte-stable)
    kind: str = "file"  # "file" | "zip"
    dest: str = ""  # where it goes under the data dir
    prefix: str = ""  # zip: the archive's top folder, stripped on extraction
    members: tuple[str, ...] = ()  # zip: the files/folders under prefix to extract


_MEDQUAD_COMMIT = "577bd37b96c02d1833b2c9eed2de9f96964e96cb"  # abachaa/MedQuAD HEAD, 2023-10-17
_TATQA_COMMIT = "870accc41953dcde885aabeb963d94aabdc0fbc3"  # NExTplusplus/TAT-QA HEAD, 2024-12-09
_TATQA_RAW = f"https://raw.githubusercontent.com/NExTplusplus/TAT-QA/{_TATQA_COMMIT}"

# Checksums computed from the shared copy of the upstream files (/work/shared/data), which we
# checked to be byte-identical to those files at the pinned commits.
UPSTREAM: list[Upstream] = [
    Upstream(
        name="medquad",
        url=f"https://github.com/abachaa/MedQuAD/archive/{_MEDQUAD_COMMIT}.zip",
        sha256="869730d8b9e931341526f99a6db994d76771e06c8a72f7fc119890e14302f992",
        kind="zip",
        dest="medquad",
        prefix=f"MedQuAD-{_MEDQUAD_COMMIT}/",
        members=(*MEDQUAD_SOURCES.values(), "LICENSE.txt", "readme.txt"),  # CC BY 4.0: keep the licence
    ),
    Upstream(
        name="tatqa",
        url=f"{_TATQA_RAW}/dataset_raw/tatqa_dataset_dev.json",
        sha256="8da095a819af6db3c14877c6df2d4d29960e41d1a63dd1fa853507bd2a616af5",
        dest="tatqa/tatqa_dataset_dev.json",
    ),
    Upstream(
        name="tatqa-license",
        url=f"{_TATQA_RAW}/LICENSE",
        sha256="46e27ffbc49c3fd44a9595c2213f8a5f4319a81b53238e49ce1eec39e7e25662",
        dest="tatqa/LICENSE",
    ),
]

# The package lives in <repo>/src/deepfusion/data/, so the shared data beside the repo is here.
REPO_SHARED_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def content_sha256(root: Path) -> str:
    """sha256 over the sorted (relative path, file sha256) list of every file under root."""
    root = Path(root)
    entries = sorted((p.relative_to(root).as_posix(), _file_sha256(p)) for p in root.rglob("*") if p.is_file())
    return hashlib.sha256("".join(f"{rel}\t{sha}\n" for rel, sha in entries).encode()).hexdigest()


def user_cache_dir() -> Path:
    """~/.cache/deepfusion/data, or under $XDG_CACHE_HOME when set."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "deepfusion" / "data"


def is_data_dir(path: Path) -> bool:
    return (path / "medquad").is_dir() or (path / "tatqa").is_dir()


def _explicit(path: Path, what: str) -> Path:
    # A path the user named must work: silently falling through would load other data.
    if not is_data_dir(path):
        raise DataError(f"{what} points at {path}, which holds neither medquad/ nor tatqa/; "
                        "the loaders read those folders; fix the path (layout as in shared/data/DATA.md)")
    return path.resolve()


def resolve_data_dir(flag: str | Path | None = None, *, download: bool = True) -> Path:
    """The flag, $DEEPFUSION_DATA, ../shared/data from cwd or from the repo, the user cache, else download."""
    if flag:
        return _explicit(Path(flag).expanduser(), "--data-dir")
    if os.environ.get("DEEPFUSION_DATA"):
        return _explicit(Path(os.environ["DEEPFUSION_DATA"]).expanduser(), "DEEPFUSION_DATA")
    cache = user_cache_dir()
    for candidate in (Path.cwd().parent / "shared" / "data", REPO_SHARED_DATA, cache):
        if is_data_dir(candidate):
            return candidate.resolve()
    if not download:
        raise DataError(f"found no data directory (tried ../shared/data, {REPO_SHARED_DATA}, {cache}); "
                        f"the corpora are needed to build devices; {_supply_hint(UPSTREAM)}")
    return download_upstream(cache, sources=UPSTREAM)


def _supply_hint(sources: list[Upstream]) -> str:
    urls = ", ".join(s.url for s in sources)
    return ("set --data-dir or DEEPFUSION_DATA to a directory with medquad/ and tatqa/ laid out as in "
            f"shared/data/DATA.md, fetched from {urls}")


def _download(src: Upstream, to: Path, timeout: float) -> None:
    try:
        with urllib.request.urlopen(src.url, timeout=timeout) as r, open(to, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
    # HTTP errors, refused connections, DNS failures, timeouts and cut transfers alike
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise DataError(f"got no {src.name} from {src.url} ({reason}); we are probably offline") from None


def _extract(src: Upstream, archive: Path, to: Path) -> None:
    """Extract the wanted members of a zip, refusing paths that would leave `to`."""
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                rel = PurePosixPath(info.filename[len(src.prefix):])
                if (info.is_dir() or not info.filename.startswith(src.prefix) or not rel.parts
                        or rel.parts[0] not in src.members or ".." in rel.parts):
                    continue
                out = to.joinpath(*rel.parts)
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as fin, open(out, "wb") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)
    except zipfile.BadZipFile as e:
        raise DataError(f"got a broken zip for {src.name} from {src.url} ({e}); the download was cut; "
                        "retry") from None


def _check(src: Upstream, got: str) -> None:
    if got != src.sha256:
        raise DataError(f"got sha256 {got} for {src.name} from {src.url}, expected {src.sha256}; "
                        "the upstream changed or the download was corrupted")


def _fetch(src: Upstream, raw: Path, out: Path, timeout: float) -> None:
    """Download one source to raw, verify it, and put it (extracted, for a zip) at out."""
    _download(src, raw, timeout)
    if src.kind == "zip":
        _extract(src, raw, out)
        _check(src, content_sha256(out))
    else:
        _check(src, _file_sha256(raw))
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(raw, out)


def download_upstream(dest: Path, sources: list[Upstream] = UPSTREAM, timeout: float = 60) -> Path:
    """Download, verify and unpack sources into dest; nothing is left behind on failure."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Stage beside dest (same filesystem), so the final os.replace is atomic.
    work = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-download-"))
    try:
        stage = work / "data"
        for i, src in enumerate(sources):
            try:
                _fetch(src, work / f"download-{i}", stage / src.dest, timeout)
            except DataError as e:
                raise DataError(f"{e}; to use your own copy instead, {_supply_hint(sources)}") from None
        if dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()
        if not dest.exists():
            os.replace(stage, dest)  # the whole data dir appears at once
        else:  # dest holds other things: replace only our top-level folders, each atomically
            for top in sorted({PurePosixPath(s.dest).parts[0] for s in sources}):
                if (dest / top).exists():
                    shutil.rmtree(dest / top)
                os.replace(stage / top, dest / top)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest.resolve()
