"""What a run was made from, so it can be reproduced: hashes of the source weights and of the
calibration tokens, the resolved settings, seeds and package versions (moefy_run.json)."""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
from pathlib import Path

import torch

RUN_FILE = "moefy_run.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_CHUNK = 1 << 24  # bytes read per hashing step


def sha256_files(path: str | os.PathLike) -> str:
    """sha256 over a weights file, or over a folder's weight files (name and contents, sorted by
    name; config and tokenizer files are not weights and are left out)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


@torch.no_grad()
def sha256_state_dict(model: torch.nn.Module) -> str:
    """sha256 over an in-memory model's tensors: names, dtypes, shapes and bytes, in state-dict order."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
        if t.device.type != "meta":
            h.update(_bytes(t))
    return h.hexdigest()


def sha256_tokens(ids: torch.Tensor) -> str:
    """Fingerprint of calibration data: sha256 of its token ids (int64, row-major) and shape."""
    h = hashlib.sha256(f"{tuple(ids.shape)}\0".encode())
    h.update(_bytes(ids.to(torch.int64)))
    return h.hexdigest()


def _bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def weights_hash(source: str | os.PathLike | None, model: torch.nn.Module | None = None) -> dict:
    """{"sha256", "of"}: of the source files when `source` names files on disk, else of the state dict."""
    if source and Path(source).exists():
        return {"sha256": sha256_files(source), "of": "files"}
    if model is None:
        raise ValueError("need the source files or the model to hash")
    return {"sha256": sha256_state_dict(model), "of": "state_dict"}


def versions() -> dict:
    import transformers

    from moefy import __version__

    return {"moefy": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def run_info(record: dict, command: str) -> dict:
    """moefy_run.json from a run's record: resolved settings, seeds, versions, hashes."""
    settings = {k: record[k] for k in ("moe", "layerwise", "prune", "expansion", "tuning", "settings") if k in record}
    seeds = {k: v["seed"] for k, v in settings.items() if isinstance(v, dict) and "seed" in v}
    return {"command": command, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": record.get("source"), "source_weights": record.get("source_weights"),
            "calibration": record.get("calibration"), "settings": settings, "seeds": seeds,
            "versions": versions()}
