"""Save and load moefy models: safetensors weights, tokenizer, config.json with `moefy` and
`auto_map` (so transformers loads the folder with trust_remote_code=True), and moefy.json with
the method, per-layer neuron-to-expert assignment, router metrics and versions.

Writes are atomic: everything goes into a temporary folder beside the target, then one rename.
An existing target is replaced only with overwrite=True."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
import transformers

from . import __version__
from .convert import MoEModel
from .errors import ModelLoadError, OutputExists
from .modeling_moefy import PREFIX, base_class, moefy_class
from .models import check_vocabulary

RECORD = "moefy.json"
REMOTE_CODE = ("modeling_moefy.py", "moe_layer.py", "sparse_ffn.py")


def check_target(path: str | os.PathLike, overwrite: bool):
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExists(f"{path} already exists; pass --overwrite (overwrite=True) to replace it")


def save(m: MoEModel, folder: str | os.PathLike, overwrite: bool = False) -> Path:
    target = Path(folder)
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        m.model.save_pretrained(tmp, safe_serialization=True)
        m.tokenizer.save_pretrained(tmp)
        here = Path(__file__).parent
        for name in REMOTE_CODE:
            shutil.copyfile(here / name, tmp / name)
        base = type(m.model).__name__.removeprefix(PREFIX)
        _edit_json(tmp / "config.json", architectures=[PREFIX + base],
                   auto_map={_auto_name(m): f"modeling_moefy.{PREFIX}{base}"})
        record = {**m.record, "assignment": _assignment(m), "versions": versions()}
        (tmp / RECORD).write_text(json.dumps(record, indent=1))
        replace_path(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


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


def write_json(path: str | os.PathLike, obj, overwrite: bool = True):
    """Write JSON atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    check_target(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        json.dump(obj, f, indent=1)
    os.replace(f.name, path)


def versions() -> dict:
    import platform

    return {"moefy": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def _auto_name(m: MoEModel) -> str:
    return "AutoModelForCausalLM" if m.family.causal else "AutoModel"


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
