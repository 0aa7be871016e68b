"""Save and load moefy models: safetensors weights, tokenizer, config.json with `moefy` and
`auto_map` (so transformers loads the folder with trust_remote_code=True), and moefy.json with
the method, per-layer neuron-to-expert assignment, router metrics and versions.

Writes are atomic: everything goes into a temporary folder beside the target, then one rename.
An existing target is replaced only with overwrite=True."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
import transformers

from moefy.model import MoEModel
from moefy.errors import ModelLoadError, OutputExists, OutOfSpace
from moefy.modeling.modeling_moefy import PREFIX, base_class, moefy_class
from moefy.pipeline.load import check_vocabulary
from moefy.provenance import RUN_FILE, run_info, versions

RECORD = "moefy.json"
MODELING = Path(__file__).with_name("modeling")
REMOTE_CODE = tuple(sorted(p.name for p in MODELING.glob("*.py") if p.name != "__init__.py"))
"""The runtime modules copied into every saved folder: they import torch, transformers and each other only."""


def check_target(path: str | os.PathLike, overwrite: bool):
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExists(f"{path} already exists; pass --overwrite (overwrite=True) to replace it")


def save(m: MoEModel, folder: str | os.PathLike, overwrite: bool = False, command: str = "convert") -> Path:
    """Write the model folder (atomically, after checking free space), with moefy.json and
    moefy_run.json (provenance.run_info: settings, seeds, versions, hashes)."""
    size = sum(t.numel() * t.element_size() for t in m.model.state_dict().values())
    with staging(folder, overwrite, size) as tmp:
        m.model.save_pretrained(tmp, safe_serialization=True)
        finish_folder(tmp, m.tokenizer, type(m.model).__name__, m.family.causal,
                      {**m.record, "assignment": _assignment(m)}, command)
    return Path(folder)


@contextlib.contextmanager
def staging(target: str | os.PathLike, overwrite: bool, size: int):
    """A temporary folder beside `target` to write into; renamed to `target` when the block ends
    without error, removed otherwise. Refuses an existing target without overwrite, and a disk
    with less free space than `size` bytes plus a margin."""
    target = Path(target)
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(target.parent, size)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        replace_path(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def check_free_space(folder: str | os.PathLike, size: int, margin: float = 1.05):
    """Refuse to start writing `size` bytes into `folder` when its disk has less free (+5%, +64 MB
    for tokenizer, config and temporaries)."""
    need = int(size * margin) + (64 << 20)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise OutOfSpace(f"writing here needs about {need / 2**30:.2f} GiB but {folder} has only "
                         f"{free / 2**30:.2f} GiB free; free some space or choose another --out")


def finish_folder(tmp: Path, tokenizer, model_class: str, causal: bool, record: dict, command: str):
    """Everything of a moefy folder but the weights and config.json's body: tokenizer, remote code,
    the Moefy class in config.json, moefy.json and moefy_run.json."""
    tokenizer.save_pretrained(tmp)
    for name in REMOTE_CODE:
        shutil.copyfile(MODELING / name, tmp / name)
    base = model_class.removeprefix(PREFIX)
    auto = "AutoModelForCausalLM" if causal else "AutoModel"
    _edit_json(tmp / "config.json", architectures=[PREFIX + base], auto_map={auto: f"modeling_moefy.{PREFIX}{base}"})
    (tmp / RECORD).write_text(json.dumps({**record, "versions": versions()}, indent=1))
    (tmp / RUN_FILE).write_text(json.dumps(run_info(record, command), indent=1))


def load(folder: str | os.PathLike) -> MoEModel:
    folder = Path(folder)
    for name in ("config.json", RECORD):
        if not (folder / name).is_file():
            raise ModelLoadError(f"{folder} is not a moefy model folder: {name} is missing")
    try:
        config = transformers.AutoConfig.from_pretrained(folder)
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the config of {folder}: {exc}") from exc
    if not getattr(config, "moefy", None) or not config.architectures:
        raise ModelLoadError(f"{folder}/config.json has no moefy section; was it saved by moefy?")
    try:
        cls = moefy_class(base_class(config.architectures[0]))
        model = cls.from_pretrained(folder, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001  (truncated or corrupted weights: one clear message)
        raise ModelLoadError(f"cannot load {folder}: {type(exc).__name__}: {exc}".splitlines()[0]
                             + "; the folder is damaged or incomplete: restore it or convert again") from exc
    check_vocabulary(model, tokenizer, folder)
    return MoEModel(model.eval().requires_grad_(False), tokenizer, record)


def write_json(path: str | os.PathLike, obj, overwrite: bool = True, run: dict | None = None):
    """Write JSON atomically (temporary file in the same folder, then rename); with `run` (a
    provenance.run_info dict), also <name>.moefy_run.json beside it."""
    path = Path(path)
    check_target(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, content in ((path, obj), (run_path(path), run)):
        if content is None:
            continue
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{target.name}.", delete=False) as f:
            json.dump(content, f, indent=1)
        os.replace(f.name, target)


def run_path(json_path: Path) -> Path:
    """Where the moefy_run record of a JSON output goes: x.json -> x.moefy_run.json."""
    return json_path.with_name(f"{json_path.stem}.{RUN_FILE}")


def _assignment(m: MoEModel) -> list[dict]:
    return [{"shared": layer.shared_neurons.tolist(), "experts": layer.expert_neurons.tolist()}
            for layer in m.layers]


def _edit_json(path: Path, **updates):
    path.write_text(json.dumps({**json.loads(path.read_text()), **updates}, indent=2))


def replace_path(tmp: Path, target: Path):
    """Put tmp at target; an old target is moved aside first and removed only after the swap."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError:
        os.replace(old, target)
        raise
    shutil.rmtree(old) if old.is_dir() else old.unlink()
