"""Text sources for calibration and evaluation, tokenised into fixed-length blocks.

Built-in sources are split by document (every 5th document is held out), never by position
inside one stream, so held-out text is really held out:
  wiki-sample[:calib|:heldout|:all]  Wikipedia excerpt shipped in the gensim wheel, markup stripped
  pydoc[:calib|:heldout|:all]        CPython's language reference topics (pydoc_data)
User files: a .txt file (documents separated by blank lines) or a .jsonl file with a "text" field.
Mixtures: sources joined by "+" (wiki-sample+pydoc, wiki-sample:calib+notes.txt) give each source
an equal share of the tokens, in alternating blocks, so a calibration covers every domain a model
will see (a first N blocks of it are balanced too).
"""

from __future__ import annotations

import bz2
import functools
import importlib.util
import json
from pathlib import Path

import torch

HELDOUT_EVERY = 5
MIN_DOC_CHARS = 200
WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


from moefy.errors import DataError


@functools.lru_cache(maxsize=None)
def wiki_documents() -> tuple[str, ...]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = Path(importlib.util.find_spec("gensim").origin).parent / WIKI_FILE
    docs = []
    with bz2.open(path) as f:
        for title, text, _ in extract_pages(f):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            clean = "\n".join(line.strip() for line in filter_wiki(text).splitlines() if line.strip())
            if len(clean) >= MIN_DOC_CHARS:
                docs.append(f"{title}\n{clean}")
    return tuple(docs)


@functools.lru_cache(maxsize=None)
def pydoc_documents() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    return tuple(topics[k].strip() for k in sorted(topics) if len(topics[k].strip()) >= MIN_DOC_CHARS)


BUILTIN = {"wiki-sample": wiki_documents, "pydoc": pydoc_documents}


def split(docs, part: str) -> list[str]:
    if part == "all":
        return list(docs)
    if part not in ("calib", "heldout"):
        raise DataError(f"unknown split {part!r}; use calib, heldout or all")
    held = part == "heldout"
    return [d for i, d in enumerate(docs) if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == held]


def mixture(spec: str) -> list[str] | None:
    """The sources of a mixture spec ("a+b"), or None for a single source (a file whose own name
    holds "+" is a single source)."""
    if "+" not in spec or Path(spec).expanduser().is_file():
        return None
    parts = [p.strip() for p in spec.split("+")]
    if any(not p for p in parts):
        raise DataError(f"empty source in the mixture {spec!r}; join sources with one '+', e.g. wiki-sample+pydoc")
    return parts


def _alternate(groups: list[list]) -> list:
    """Items of the groups in turn (a1, b1, a2, b2, ...), the longer groups' rest at the end."""
    out = []
    for i in range(max(len(g) for g in groups)):
        out.extend(g[i] for g in groups if i < len(g))
    return out


def documents(spec: str) -> list[str]:
    """The documents a spec names: a built-in source with an optional split, a file, or a mixture
    of them (their documents in turn)."""
    parts = mixture(spec)
    if parts is not None:
        return _alternate([documents(p) for p in parts])
    name, _, part = spec.partition(":")
    if name in BUILTIN:
        return split(BUILTIN[name](), part or "calib")
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataError(f"no text source {spec!r}: use {', '.join(BUILTIN)} (optionally :calib, "
                        ":heldout or :all), a .txt file or a .jsonl file with a \"text\" field")
    raw = path.read_bytes()
    if b"\x00" in raw[:4096]:
        raise DataError(f"{path} looks binary; give a UTF-8 text or JSONL file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc})") from exc
    docs = _jsonl(path, text) if path.suffix == ".jsonl" else [d.strip() for d in text.split("\n\n")]
    docs = [d for d in docs if d]
    if not docs:
        raise DataError(f"{path} holds no text")
    return docs


MAX_LINE_CHARS = 16 << 20  # one JSONL line (a document); longer ones are refused, not parsed


def _jsonl(path, text):
    """The "text" field of every line: a JSON object whose "text" is a string. Anything else
    (null, a number, a list, a nested object, a line over MAX_LINE_CHARS) is refused with the
    file and line."""
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if len(line) > MAX_LINE_CHARS:
            raise DataError(f"{path}:{n}: the line has {len(line):,} characters, over {MAX_LINE_CHARS:,}; "
                            "split the document into several lines")
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise DataError(f"{path}:{n}: not valid JSON ({exc}); each line must be an object with a "
                            "string \"text\" field") from exc
        if not isinstance(row, dict) or "text" not in row:
            raise DataError(f"{path}:{n}: each line must be a JSON object with a \"text\" field, got "
                            f"{_json_kind(row) if not isinstance(row, dict) else 'an object without one'}")
        if not isinstance(row["text"], str):
            raise DataError(f"{path}:{n}: \"text\" must be a string, got {_json_kind(row['text'])}")
        docs.append(row["text"])
    return docs


def blocks(spec: str, tokenizer, seq_len: int, max_tokens: int | None = None,
           min_tokens: int | None = None) -> torch.Tensor:
    """Documents tokenised, joined with EOS and cut into [B, seq_len] blocks (the tail is dropped).
    A mixture gives each source max_tokens / (number of sources), in alternating blocks."""
    parts = mixture(spec)
    if parts is not None:
        return _mixed_blocks(spec, parts, tokenizer, seq_len, max_tokens, min_tokens)
    docs = documents(spec)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if max_tokens and len(ids) >= max_tokens + seq_len:
            break
    n_blocks = len(ids) // seq_len
    if max_tokens:
        n_blocks = min(n_blocks, max(1, max_tokens // seq_len))
    have = n_blocks * seq_len
    if n_blocks == 0 or (min_tokens and have < min_tokens):
        need = max(min_tokens or 0, seq_len)
        if len(ids) >= need:  # the text has enough; the requested count is the problem
            raise DataError(f"{max_tokens} tokens requested from {spec!r}, fewer than the {need} needed; "
                            f"ask for at least {need} tokens")
        raise DataError(f"{spec!r} gives {len(ids)} tokens, fewer than the {need} needed "
                        f"(blocks of {seq_len}); give more text or lower --seq-len / the token count")
    return torch.tensor(ids[:have]).view(n_blocks, seq_len)


def _mixed_blocks(spec, parts, tokenizer, seq_len, max_tokens, min_tokens) -> torch.Tensor:
    """blocks() of a mixture: each source's own blocks (an equal share of max_tokens, at least one
    block), taken in turn. A source with less text than its share gives what it has, and the
    mixture is that much shorter: the shares stay as asked, never tilted toward the longer text."""
    share = None if not max_tokens else max(seq_len, max_tokens // len(parts))
    rows = _alternate([list(blocks(p, tokenizer, seq_len, max_tokens=share)) for p in parts])
    if max_tokens:
        rows = rows[:max(1, max_tokens // seq_len)]
    if min_tokens and len(rows) * seq_len < min_tokens:
        raise DataError(f"{spec!r} gives {len(rows) * seq_len} tokens, fewer than the {min_tokens} needed "
                        f"(blocks of {seq_len}); give more text or lower --seq-len / the token count")
    return torch.stack(rows)


def _json_kind(value) -> str:
    kinds = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "a list", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)
