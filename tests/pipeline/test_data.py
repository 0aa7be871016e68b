import json

import pytest

from moefy.pipeline.data import blocks, documents, split, wiki_documents
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


@pytest.mark.parametrize("line, message", [
    ('{"text": 1}', '"text" must be a string, got a number'),
    ('{"text": null}', '"text" must be a string, got null'),
    ('{"text": ["a", "b"]}', '"text" must be a string, got a list'),
    ('{"text": {"body": "a"}}', '"text" must be a string, got an object'),
    ('["text", "a"]', "a JSON object with a \"text\" field, got a list"),
    ('"just a string"', "a JSON object with a \"text\" field, got a string"),
    ('{"text": "unterminated', "not valid JSON"),
    ("[" * 100_000, "not valid JSON"),
])
def test_jsonl_fields_are_checked_where_read(tmp_path, line, message):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "a first document"}\n' + line + "\n")
    with pytest.raises(DataError, match="bad.jsonl:2") as err:
        documents(str(f))
    assert message in str(err.value)


def test_jsonl_line_over_the_limit(tmp_path, monkeypatch):
    from moefy.pipeline import data

    monkeypatch.setattr(data, "MAX_LINE_CHARS", 100)
    f = tmp_path / "huge.jsonl"
    f.write_text('{"text": "' + "a" * 200 + '"}\n')
    with pytest.raises(DataError, match="huge.jsonl:1: the line has 212 characters"):
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


def test_a_mixture_gives_each_source_an_equal_share_in_alternating_blocks(tokenizer, tmp_path):
    wiki = blocks("wiki-sample", tokenizer, seq_len=64, max_tokens=640)
    py = blocks("pydoc", tokenizer, seq_len=64, max_tokens=640)
    mixed = blocks("wiki-sample+pydoc", tokenizer, seq_len=64, max_tokens=1280)
    assert mixed.shape == (20, 64)
    assert mixed[0::2].equal(wiki) and mixed[1::2].equal(py)  # a first N blocks are balanced too
    assert blocks("wiki-sample+pydoc", tokenizer, seq_len=64, max_tokens=640).shape == (10, 64)
    # held-out mixtures keep each source's split; documents come in turn
    docs = documents("wiki-sample:heldout+pydoc:heldout")
    assert docs[:2] == [documents("wiki-sample:heldout")[0], documents("pydoc:heldout")[0]]
    assert set(docs) == set(documents("wiki-sample:heldout")) | set(documents("pydoc:heldout"))
    # a short source gives what it has; the other keeps its own share
    short = tmp_path / "short.txt"
    short.write_text("a few words of text " * 20)
    mix = blocks(f"{short}+pydoc", tokenizer, seq_len=64, max_tokens=640)
    own = blocks(str(short), tokenizer, seq_len=64)
    assert mix[0].equal(own[0]) and len(own) < 5 and mix.shape[0] == len(own) + 5
    with pytest.raises(DataError, match="fewer than"):
        blocks(f"{short}+{short}", tokenizer, seq_len=64, min_tokens=64 * 100)


def test_mixture_errors_name_the_bad_part_and_a_plus_in_a_file_name_is_a_file(tmp_path):
    with pytest.raises(DataError, match="no-such-thing"):
        documents("wiki-sample+no-such-thing")
    with pytest.raises(DataError, match="empty source"):
        documents("wiki-sample++pydoc")
    odd = tmp_path / "c++notes.txt"
    odd.write_text("one doc\n\nanother doc\n")
    assert documents(str(odd)) == ["one doc", "another doc"]
