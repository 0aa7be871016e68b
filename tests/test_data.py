import json

import pytest

from moefy.data import blocks, documents, split, wiki_documents
from moefy.errors import DataError


def test_wiki_sample_is_clean_and_split_by_document():
    docs = wiki_documents()
    assert len(docs) > 50
    assert not any(d.lower().startswith("#redirect") for d in docs)
    assert "[[" not in docs[0] and "{{" not in docs[0]
    calib, held = documents("wiki-sample"), documents("wiki-sample:heldout")
    assert calib == documents("wiki-sample:calib")
    assert set(calib).isdisjoint(held)
    assert len(calib) + len(held) == len(docs)
    assert 0.15 < len(held) / len(docs) < 0.25


def test_pydoc_split():
    calib, held = documents("pydoc"), documents("pydoc:heldout")
    assert calib and held and set(calib).isdisjoint(held)


def test_text_and_jsonl_files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\nline two\n\nsecond doc\n")
    assert documents(str(txt)) == ["first doc\nline two", "second doc"]
    jl = tmp_path / "a.jsonl"
    jl.write_text(json.dumps({"text": "hello"}) + "\n\n" + json.dumps({"text": "world", "id": 3}) + "\n")
    assert documents(str(jl)) == ["hello", "world"]


@pytest.mark.parametrize("content,match", [
    (b"", "no text"), (b"\x00\x01\x02binary", "binary"), (b"\xff\xfe\xfa", "UTF-8"),
])
def test_bad_files(tmp_path, content, match):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    with pytest.raises(DataError, match=match):
        documents(str(f))


def test_bad_jsonl_names_the_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"content": "no text field"}\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        documents(str(f))


def test_unknown_source_and_split():
    with pytest.raises(DataError, match="wiki-sample"):
        documents("no-such-thing")
    with pytest.raises(DataError, match="split"):
        split(["a"], "train")


def test_blocks_shape_and_token_budget(tokenizer):
    b = blocks("pydoc", tokenizer, seq_len=64, max_tokens=1000)
    assert b.shape == (15, 64)
    assert int(b.max()) < len(tokenizer)
    with pytest.raises(DataError, match="fewer than"):
        blocks("pydoc", tokenizer, seq_len=64, max_tokens=1000, min_tokens=10**6)
