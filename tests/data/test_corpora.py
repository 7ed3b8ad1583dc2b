"""Loaders: the real corpora parse cleanly; broken inputs give a DataError naming the file."""

import json
import re
from dataclasses import replace

import pytest

from deepfusion.data import (Document, load_jsonl, load_medquad, load_source, load_tatqa, load_text_dir,
                             split_documents)
from deepfusion.data.corpora import MEDQUAD_SOURCES
from deepfusion.errors import DataError

DOC = """<?xml version="1.0" encoding="UTF-8"?>
<Document id="1" source="X" url="http://x">
<Focus>Thing</Focus>
<QAPairs>
  <QAPair pid="1"><Question qtype="information">What is   Thing ?</Question>
    <Answer>Thing is &lt;rare&gt; &amp;amp; odd.
            
        Second    paragraph.</Answer></QAPair>
  <QAPair pid="2"><Question qtype="symptoms">Symptoms?</Question><Answer>   </Answer></QAPair>
</QAPairs>
</Document>"""
EMPTY_DOC = '<Document id="2"><QAPairs><QAPair><Question>Q?</Question><Answer/></QAPair></QAPairs></Document>'


def medquad_dir(tmp_path, files: dict[str, bytes | str], name="cdc"):
    folder = tmp_path / "medquad" / MEDQUAD_SOURCES[name]
    folder.mkdir(parents=True)
    for fname, content in files.items():
        (folder / fname).write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


def tatqa_item(uid):
    return {
        "table": {"uid": uid, "table": [["", "2019", "2018"], ["Sales", "$  1.5", "1.2"]]},
        "paragraphs": [{"uid": "p2", "order": 2, "text": "Second."}, {"uid": "p1", "order": 1, "text": "First."}],
        "questions": [{"order": 1, "question": "Change?", "answer": -12.6, "scale": "million"},
                      {"order": 2, "question": "Which?", "answer": ["a", "b"], "scale": ""},
                      {"order": 3, "question": "Pct?", "answer": 2.0, "scale": "percent"}],
    }


def test_medquad_fixture_cleans_text_and_skips_empty(tmp_path):
    medquad_dir(tmp_path, {"0001.xml": DOC, "0002.xml": EMPTY_DOC})
    docs = load_medquad(tmp_path, "cdc")
    assert docs == [Document("medquad:cdc", "medical", "0001",
                             "Question: What is Thing ?\nAnswer: Thing is <rare> & odd.\nSecond paragraph.\n\n",
                             (("What is Thing ?", "Thing is <rare> & odd.\nSecond paragraph."),))]


@pytest.mark.parametrize("name", list(MEDQUAD_SOURCES))
def test_medquad_real_sources(shared_data, name):
    docs = load_medquad(shared_data, name)
    assert docs and all(d.text.strip() and d.source == f"medquad:{name}" for d in docs)
    assert not any(e in d.text for d in docs for e in ("&lt;", "&amp;", "&apos;", "&quot;", "  "))
    assert len({d.doc_id for d in docs}) == len(docs)
    if name == "gard":
        assert len(docs) > 100


@pytest.mark.parametrize("files, needle", [
    ({}, "holds no *.xml"),
    ({"bad.xml": "<Document><QAPairs>"}, "bad.xml: not well-formed XML"),
    ({"latin.xml": b"<Document><Focus>caf\xe9</Focus></Document>"}, "latin.xml: not UTF-8"),
])
def test_medquad_broken_inputs_name_the_file(tmp_path, files, needle):
    medquad_dir(tmp_path, files)
    with pytest.raises(DataError) as e:
        load_medquad(tmp_path, "cdc")
    assert needle in str(e.value) and str(tmp_path) in str(e.value)


def test_medquad_missing_folder_and_unknown_name(tmp_path):
    with pytest.raises(DataError, match=r"9_CDC_QA: no such folder.*DEEPFUSION_DATA"):
        load_medquad(tmp_path, "cdc")
    with pytest.raises(DataError, match="use one of cancergov, gard"):
        load_medquad(tmp_path, "nope")


def test_tatqa_fixture_renders_table_paragraphs_answers(tmp_path):
    (tmp_path / "tatqa").mkdir()
    (tmp_path / "tatqa" / "tatqa_dataset_dev.json").write_text(json.dumps([tatqa_item("u1")]))
    [doc] = load_tatqa(tmp_path, 0, 1)
    assert doc == Document("tatqa:0/1", "finance", "u1",
                           " | 2019 | 2018\nSales | $ 1.5 | 1.2\n\nFirst.\nSecond.\n\n"
                           "Question: Change? Answer: -12.6 million\nQuestion: Which? Answer: a, b\n"
                           "Question: Pct? Answer: 2%\n",
                           (("Change?", "-12.6 million"), ("Which?", "a, b"), ("Pct?", "2%")))


def test_medquad_real_file_qa_pairs_are_its_answered_pairs(shared_data, tmp_path):
    # GARD 0002080 has two QAPairs, one of them with its answer removed (MedQuAD's copyright cut)
    raw = (shared_data / "medquad" / "2_GARD_QA" / "0002080.xml").read_text()
    assert raw.count("<QAPair ") == 2 and raw.count("<Answer></Answer>") == 1
    medquad_dir(tmp_path, {"0002080.xml": raw})
    [doc] = load_medquad(tmp_path, "cdc")
    assert len(doc.qa) == 1 and doc.qa[0][0].endswith("?") and doc.qa[0][1].startswith("What are the signs")
    assert "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in doc.qa) == doc.text
    # and over a whole source: every QAPair but those with an empty answer
    raws = [f.read_text() for f in sorted((shared_data / "medquad" / "9_CDC_QA").glob("*.xml"))]
    answered = sum(r.count("<QAPair ") - len(re.findall(r"<Answer>\s*</Answer>|<Answer\s*/>", r)) for r in raws)
    assert sum(len(d.qa) for d in load_medquad(shared_data, "cdc")) == answered > 100


def test_tatqa_real_qa_pairs_are_its_questions(shared_data):
    items = {i["table"]["uid"]: i for i in json.loads((shared_data / "tatqa" / "tatqa_dataset_dev.json").read_text())}
    docs = load_tatqa(shared_data, 0, 1)
    assert all(len(d.qa) == len(items[d.doc_id]["questions"]) for d in docs)
    assert sum(len(d.qa) for d in docs) == 1668 and all(f"Question: {q} Answer: {a}\n" in d.text
                                                        for d in docs for q, a in d.qa)
    # the split hashes source and doc_id alone: QA pairs move no report between private, proxy and test
    with_qa, without = (split_documents(x, 0, 0.2, 0.1) for x in (docs, [replace(d, qa=()) for d in docs]))
    assert all([d.doc_id for d in getattr(with_qa, k)] == [d.doc_id for d in getattr(without, k)]
               for k in ("private", "proxy", "test"))


def test_tatqa_real_groups_partition_reports(shared_data):
    all_ids = [d.doc_id for d in load_tatqa(shared_data, 0, 1)]
    groups = [{d.doc_id for d in load_tatqa(shared_data, g, 3)} for g in range(3)]
    assert len(all_ids) == len(set(all_ids)) == 278
    assert set().union(*groups) == set(all_ids) and sum(map(len, groups)) == 278
    assert all(groups)


@pytest.mark.parametrize("content, needle", [
    ("[{", "bad JSON at line 1"),
    ('{"a": 1}', "top level is dict"),
    ('[{"table": {}}]', "report 0 does not have the TAT-QA structure"),
])
def test_tatqa_broken_inputs_name_the_file(tmp_path, content, needle):
    (tmp_path / "tatqa").mkdir()
    path = tmp_path / "tatqa" / "tatqa_dataset_dev.json"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        load_tatqa(tmp_path, 0, 2)
    assert str(path) in str(e.value) and needle in str(e.value)


def test_tatqa_missing_file_and_bad_group(tmp_path):
    with pytest.raises(DataError, match="tatqa_dataset_dev.json: no such file"):
        load_tatqa(tmp_path, 0, 2)
    with pytest.raises(DataError, match="group 2/2"):
        load_tatqa(tmp_path, 2, 2)


def test_jsonl_and_text_dir(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"text": "one"}\n\n{"body": "x", "text": "three"}\n{"text": ""}\n')
    assert [(d.doc_id, d.text, d.source) for d in load_jsonl(path, "legal")] == [
        ("1", "one", "jsonl:mine.jsonl"), ("3", "three", "jsonl:mine.jsonl")]
    (tmp_path / "notes" / "sub").mkdir(parents=True)
    (tmp_path / "notes" / "a.txt").write_text("alpha")
    (tmp_path / "notes" / "sub" / "b.txt").write_text("beta")
    (tmp_path / "notes" / "empty.txt").write_text("  \n")
    docs = load_text_dir(tmp_path / "notes", "notes")
    assert [(d.doc_id, d.text) for d in docs] == [("a.txt", "alpha"), ("sub/b.txt", "beta")]


@pytest.mark.parametrize("content, needle", [
    ('{"text": "ok"}\n{"text": \n', "mine.jsonl:2: bad JSON"),
    ('{"body": "x"}\n', "mine.jsonl:1: no 'text' field"),
    ('{"text": 3}\n', "mine.jsonl:1: 'text' is int"),
    (b'{"text": "caf\xe9"}\n', "mine.jsonl: not UTF-8"),
    ("\n", "no line has non-empty"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, content, needle):
    path = tmp_path / "mine.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as e:
        load_jsonl(path, "legal")
    assert needle in str(e.value)


def test_text_dir_errors(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        load_text_dir(tmp_path / "nope", "x")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(DataError, match=r"bad.txt: not UTF-8"):
        load_text_dir(tmp_path, "x")


def test_load_source_specs_and_cache(tmp_path, monkeypatch):
    medquad_dir(tmp_path, {"0001.xml": DOC})
    (tmp_path / "tatqa").mkdir()
    (tmp_path / "tatqa" / "tatqa_dataset_dev.json").write_text(json.dumps([tatqa_item("u1"), tatqa_item("u2")]))
    (tmp_path / "mine.jsonl").write_text('{"text": "one"}\n')
    monkeypatch.chdir(tmp_path)
    assert load_source("medquad:cdc", tmp_path)[0].doc_id == "0001"
    assert len(load_source("tatqa:0/1", tmp_path)) == 2 == len(load_source("tatqa", tmp_path))
    assert load_source("jsonl:mine.jsonl", tmp_path)[0].domain == "mine"  # relative to cwd
    assert load_source("jsonl:mine.jsonl", tmp_path, domain="legal")[0].domain == "legal"
    assert load_source("jsonl:mine.jsonl", tmp_path)[0].qa == ()  # users' text carries no QA pairs
    assert load_source("tatqa", tmp_path, domain="fin")[0].qa == load_source("tatqa", tmp_path)[0].qa != ()
    # cached: a second load returns equal Documents without re-reading, and a fresh list each time
    first = load_source("medquad:cdc", tmp_path)
    (tmp_path / "medquad" / "9_CDC_QA" / "0001.xml").write_text("broken")
    second = load_source("medquad:cdc", tmp_path)
    assert first == second and first is not second
    for spec in ("medquad:nope", "tatqa:x", "csv:a.csv", "jsonl:"):
        with pytest.raises(DataError, match=r"use one of medquad:<name>.*medquad names: cancergov"):
            load_source(spec, tmp_path)
