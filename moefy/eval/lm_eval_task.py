"""lm-evaluation-harness tasks over moefy's text sources, for scoring saved folders offline.

A saved folder loads in lm-eval's HF backend as it does in transformers (the MoE code travels in
the folder): `lm_eval --model hf --model_args pretrained=FOLDER,trust_remote_code=True`. Its
standard perplexity tasks (wikitext, ...) download data from the hub; `write_task` instead puts
the documents of any moefy text source into a local JSONL file beside a task YAML, so
`--include_path FOLDER --tasks NAME` scores them with no network. The task is lm-eval's own
`loglikelihood_rolling` kind (as wikitext): word and byte perplexity, bits per byte.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from pathlib import Path

from moefy.pipeline.data import documents
from moefy.errors import ConfigError
from moefy.io import check_target, replace_path

METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def task_name(spec: str) -> str:
    """A task name lm-eval accepts, from a data spec: "wiki-sample:heldout" -> moefy_wiki_sample_heldout."""
    return "moefy_" + re.sub(r"[^0-9a-zA-Z]+", "_", Path(spec).stem if Path(spec).suffix else spec).strip("_").lower()


def task_yaml(name: str, data_file: Path, source: str) -> str:
    """The task config; values are JSON strings, which YAML reads as they are."""
    q = json.dumps
    return "\n".join([
        f"task: {name}",
        "dataset_path: json",  # the datasets library's local JSON loader
        f"dataset_kwargs:\n  data_files:\n    test: {q(str(data_file))}",
        "test_split: test",
        "output_type: loglikelihood_rolling",
        'doc_to_text: ""',
        'doc_to_target: "{{text}}"',
        "should_decontaminate: true",
        'doc_to_decontamination_query: "{{text}}"',
        "metric_list:", *[f"  - metric: {m}" for m in METRICS],
        f"metadata:\n  version: 1.0\n  source: {q(source)}", ""])


def write_task(spec: str, folder: str | Path, name: str | None = None, overwrite: bool = False) -> tuple[Path, str]:
    """Write `folder`/NAME.yaml and NAME.jsonl (one {"text": document} per line) for the documents
    of `spec` (see data.documents). Atomic: a temporary folder beside the target, then a rename.
    Returns (the folder, the task name)."""
    target = Path(folder).absolute()
    check_target(target, overwrite)
    docs = documents(spec)
    name = name or task_name(spec)
    if not re.fullmatch(r"[A-Za-z_][0-9A-Za-z_]*", name):
        raise ConfigError(f"task name {name!r} must be letters, digits and underscores")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
        (tmp / f"{name}.yaml").write_text(task_yaml(name, target / f"{name}.jsonl", spec))
        replace_path(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target, name
