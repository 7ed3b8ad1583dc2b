"""Parse the real corpora (MedQuAD XML, TAT-QA JSON) and users' own text into Documents.

Each loader returns one Document per natural unit (a MedQuAD page, a TAT-QA report, a JSONL
line, a .txt file), so splits never cut a document in half.
"""

from __future__ import annotations

import functools
import hashlib
import html
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from pathlib import Path

from deepfusion.errors import DataError


@dataclass(frozen=True)
class Document:
    source: str  # e.g. "medquad:gard"; with doc_id it identifies the document across runs
    domain: str  # e.g. "medical"; proxy balancing and per-domain metrics group by it
    doc_id: str
    text: str
    # (question, answer) pairs as the text states them (MedQuAD, TAT-QA); QA metrics score the answers
    qa: tuple[tuple[str, str], ...] = ()


MEDQUAD_SOURCES: dict[str, str] = {
    "cancergov": "1_CancerGov_QA",
    "gard": "2_GARD_QA",
    "ghr": "3_GHR_QA",
    "mplus": "4_MPlus_Health_Topics_QA",
    "ninds": "6_NINDS_QA",
    "nhlbi": "8_NHLBI_QA_XML",
    "cdc": "9_CDC_QA",
}
TATQA_FILE = Path("tatqa") / "tatqa_dataset_dev.json"
LAYOUT_HINT = "set --data-dir or DEEPFUSION_DATA to a directory laid out as in shared/data/DATA.md"


def clean_text(s: str) -> str:
    """Unescape leftover HTML entities and collapse whitespace, keeping one newline per paragraph."""
    # The XML parser already decoded one level of entities; some answers were escaped twice.
    s = html.unescape(s)
    lines = (" ".join(line.split()) for line in s.splitlines())
    return "\n".join(line for line in lines if line)


def qa_prompt(source: str, question: str) -> str:
    """A question as the source's text puts it, up to where its answer (' ' + answer) begins.

    MedQuAD text reads 'Question: ..\\nAnswer: ..', TAT-QA text 'Question: .. Answer: ..'; scoring an answer
    after the form the model trained on keeps QA metrics about the answer, not about the prompt.
    """
    sep = " " if source.partition(":")[0] == "tatqa" else "\n"
    return f"Question: {question}{sep}Answer:"


# --- MedQuAD ---------------------------------------------------------------------------------

def _read_utf8(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start}); "
                        "the loaders read UTF-8 only; re-save the file as UTF-8") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror}); check the path and permissions") from None
    return raw


def _medquad_qa(path: Path) -> tuple[tuple[str, str], ...]:
    """(question, answer) of every QA pair with a non-empty answer, cleaned."""
    try:
        root = ET.fromstring(_read_utf8(path))
    except ET.ParseError as e:
        raise DataError(f"{path}: not well-formed XML ({e}); "
                        "MedQuAD files are parsed as XML; restore the upstream file") from None
    pairs = []
    for pair in root.iter("QAPair"):
        answer = clean_text(pair.findtext("Answer") or "")
        if answer:  # MedQuAD removed some answers for copyright; those pairs carry no text
            pairs.append((clean_text(pair.findtext("Question") or ""), answer))
    return tuple(pairs)


def _medquad_text(qa: tuple[tuple[str, str], ...]) -> str:
    """'Question: ..\\nAnswer: ..\\n\\n' for every pair."""
    return "".join(f"{qa_prompt('medquad', q)} {a}\n\n" for q, a in qa)


def load_medquad(data_dir: Path, name: str) -> list[Document]:
    """One Document per MedQuAD XML file of source `name` (a key of MEDQUAD_SOURCES)."""
    if name not in MEDQUAD_SOURCES:
        raise DataError(f"got medquad source {name!r}; it is not a MedQuAD folder we know; "
                        f"use one of {', '.join(MEDQUAD_SOURCES)}")
    folder = Path(data_dir) / "medquad" / MEDQUAD_SOURCES[name]
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; medquad:{name} reads its XML files from it; {LAYOUT_HINT}")
    files = sorted(folder.glob("*.xml"))
    if not files:
        raise DataError(f"{folder}: holds no *.xml files; medquad:{name} needs MedQuAD XML; {LAYOUT_HINT}")
    docs = []
    for path in files:
        qa = _medquad_qa(path)
        if qa:
            docs.append(Document(f"medquad:{name}", "medical", path.stem, _medquad_text(qa), qa))
    if not docs:
        raise DataError(f"{folder}: no QA pair has an answer; every file was empty; {LAYOUT_HINT}")
    return docs


# --- TAT-QA ----------------------------------------------------------------------------------

def tatqa_group(uid: str, n_groups: int) -> int:
    """Which of n_groups finance devices a report goes to; stable across runs and machines."""
    return int(hashlib.sha256(uid.encode()).hexdigest(), 16) % n_groups


def _number(x: float | int) -> str:
    return str(int(x)) if float(x).is_integer() else str(round(x, 4))


def _tatqa_answer(q: dict) -> str:
    """Render span lists, counts and computed numbers alike, with their scale ('million', '%')."""
    a = q["answer"]
    if isinstance(a, list):
        a = ", ".join(_number(x) if isinstance(x, (int, float)) else str(x) for x in a)
    elif isinstance(a, (int, float)):
        a = _number(a)
    scale = q.get("scale") or ""
    if scale == "percent":
        return f"{a}%"
    return f"{a} {scale}" if scale else str(a)


def _tatqa_qa(item: dict) -> tuple[tuple[str, str], ...]:
    """(question, rendered answer) of every question, in the report's order."""
    questions = sorted(item["questions"], key=lambda q: int(q["order"]))
    return tuple((clean_text(q["question"]), _tatqa_answer(q)) for q in questions)


def _tatqa_text(item: dict, qa: tuple[tuple[str, str], ...]) -> str:
    """Table row by row, then paragraphs, then 'Question: .. Answer: ..' lines."""
    rows = [[" ".join(str(c).split()) for c in row] for row in item["table"]["table"]]
    table = "\n".join(" | ".join(r) for r in rows if any(r))
    paras = sorted(item["paragraphs"], key=lambda p: int(p["order"]))
    text = "\n".join(clean_text(p["text"]) for p in paras)
    lines = "\n".join(f"{qa_prompt('tatqa', q)} {a}" for q, a in qa)
    return f"{table}\n\n{text}\n\n{lines}\n"


def load_tatqa(data_dir: Path, group: int, n_groups: int) -> list[Document]:
    """The TAT-QA reports whose hashed table uid falls in `group` of `n_groups`."""
    if not 0 <= group < n_groups:
        raise DataError(f"got tatqa group {group}/{n_groups}; the group must be in 0..n_groups-1; "
                        "use e.g. tatqa:0/2 and tatqa:1/2")
    path = Path(data_dir) / TATQA_FILE
    if not path.is_file():
        raise DataError(f"{path}: no such file; tatqa sources read the TAT-QA dev set from it; {LAYOUT_HINT}")
    try:
        items = json.loads(_read_utf8(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: bad JSON at line {e.lineno} column {e.colno} ({e.msg}); "
                        "restore the upstream tatqa_dataset_dev.json") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: top level is {type(items).__name__}, TAT-QA is a list of reports; "
                        "restore the upstream tatqa_dataset_dev.json")
    docs = []
    for i, item in enumerate(items):
        try:
            uid = item["table"]["uid"]
            if tatqa_group(uid, n_groups) == group:
                qa = _tatqa_qa(item)
                docs.append(Document(f"tatqa:{group}/{n_groups}", "finance", uid, _tatqa_text(item, qa), qa))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(f"{path}: report {i} does not have the TAT-QA structure "
                            f"({type(e).__name__}: {e}); each needs table.uid, table.table, "
                            "paragraphs[].text/order, questions[].question/answer/order") from None
    return docs


# --- users' own data -------------------------------------------------------------------------

def load_jsonl(path: Path, domain: str, text_key: str = "text") -> list[Document]:
    """One Document per non-blank JSONL line holding a non-empty string under text_key."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; a jsonl: source reads one JSON object per line; fix the path")
    lines = _read_utf8(path).decode("utf-8").splitlines()
    docs = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)[text_key]
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: bad JSON ({e.msg}); each line must be one JSON object") from None
        except (KeyError, TypeError, IndexError):
            raise DataError(f"{path}:{n}: no {text_key!r} field; each line must be an object "
                            f"like {{\"{text_key}\": \"...\"}}") from None
        if not isinstance(text, str):
            raise DataError(f"{path}:{n}: {text_key!r} is {type(text).__name__}, expected a string")
        if text.strip():
            # The file name, not the full path, so splits stay the same when the data moves.
            docs.append(Document(f"jsonl:{path.name}", domain, str(n), text))
    if not docs:
        raise DataError(f"{path}: no line has non-empty {text_key!r} text; add documents or fix text_key")
    return docs


def load_text_dir(path: Path, domain: str) -> list[Document]:
    """One Document per non-empty *.txt file under path (recursively)."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such folder; a text: source reads the *.txt files in it; fix the path")
    docs = []
    for f in sorted(path.rglob("*.txt")):
        text = _read_utf8(f).decode("utf-8")
        if text.strip():
            docs.append(Document(f"text:{path.name}", domain, f.relative_to(path).as_posix(), text))
    if not docs:
        raise DataError(f"{path}: holds no non-empty *.txt files; add text files or fix the path")
    return docs


# --- source specs ----------------------------------------------------------------------------

SPEC_FORMS = ("medquad:<name>", "tatqa:<group>/<n_groups>", "tatqa", "jsonl:<path.jsonl>", "text:<dir>")


def load_source(spec: str, data_dir: Path, domain: str | None = None) -> list[Document]:
    """Load a source spec such as 'medquad:gard', 'tatqa:0/2', 'jsonl:x.jsonl', 'text:dir/'.

    domain overrides the source's domain; jsonl/text default to the file or folder name.
    """
    kind, _, arg = spec.partition(":")
    if kind in ("jsonl", "text") and arg:
        arg = str(Path(arg).expanduser().resolve())  # resolve now: the cache must not depend on cwd
    return list(_load_cached(kind, arg, Path(data_dir).resolve(), domain, spec))


@functools.lru_cache(maxsize=64)
def _load_cached(kind: str, arg: str, data_dir: Path, domain: str | None, spec: str) -> tuple[Document, ...]:
    # Cached because a run loads the same source for the device, the proxy and the tests;
    # a tuple of frozen Documents so no caller can change what the next one gets.
    if kind == "medquad" and arg in MEDQUAD_SOURCES:
        docs = load_medquad(data_dir, arg)
    elif kind == "tatqa" and (m := re.fullmatch(r"(\d+)/(\d+)", arg or "0/1")):
        docs = load_tatqa(data_dir, int(m[1]), int(m[2]))
    elif kind == "jsonl" and arg:
        docs = load_jsonl(Path(arg), domain or Path(arg).stem)
    elif kind == "text" and arg:
        docs = load_text_dir(Path(arg), domain or Path(arg).name)
    else:
        raise DataError(f"got source spec {spec!r}; it is not a form we can load; use one of "
                        f"{', '.join(SPEC_FORMS)} (medquad names: {', '.join(MEDQUAD_SOURCES)})")
    if domain and any(d.domain != domain for d in docs):
        docs = [replace(d, domain=domain) for d in docs]
    return tuple(docs)
