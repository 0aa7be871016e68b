"""Storage of a layer-by-layer conversion: block weights held in memory or streamed from the
model file (accelerate), and the resumable work folder with its manifest and hidden states."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moefy.arch import family_for
from moefy.errors import ModelLoadError, OutputExists, ResumeMismatch

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class InMemory:
    """Blocks of a model already in memory: nothing to read or release."""

    loading = "in memory"

    def load(self, block: torch.nn.Module, prefix: str):
        pass

    def release(self, block: torch.nn.Module):
        pass


class Streamed:
    """A safetensors checkpoint read one module at a time into a model built on the meta device."""

    loading = "streamed"

    def __init__(self, folder: Path, dtype: torch.dtype):
        self.folder, self.dtype = folder, dtype
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            self.files = {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            with safe_open(folder / "model.safetensors", "pt") as f:
                self.files = dict.fromkeys(f.keys(), folder / "model.safetensors")

    @staticmethod
    def usable(folder: Path) -> bool:
        return (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()

    def skeleton(self, config, auto) -> torch.nn.Module:
        """The model on the meta device with its non-block weights read (and tied)."""
        from accelerate import init_empty_weights

        with init_empty_weights():
            model = auto.from_config(config)
        family = family_for(config)
        blocks = family.blocks_path(model) + "."
        self.load(model, "", skip=blocks)
        model.tie_weights()
        missing = [n for n, t in tensors_of(model) if t.is_meta and not n.startswith(blocks)]
        if missing:
            raise ModelLoadError(f"{self.folder}: the checkpoint has no {missing[0]} (and {len(missing) - 1} more)")
        model.config.dtype = self.dtype
        return model.eval().requires_grad_(False)

    def load(self, module: torch.nn.Module, prefix: str, skip: str | None = None):
        from accelerate.utils import set_module_tensor_to_device

        handles = {}
        try:
            for name, t in tensors_of(module):
                key = prefix + name
                if (skip and key.startswith(skip)) or key not in self.files:
                    continue
                f = handles.get(self.files[key]) or handles.setdefault(
                    self.files[key], safe_open(self.files[key], "pt").__enter__())
                value = f.get_tensor(key)
                dtype = self.dtype if value.is_floating_point() else None
                # fresh memory, not the file's offsets (see modeling_moefy.own_memory)
                set_module_tensor_to_device(module, name, "cpu", value=value.to(dtype).clone() if dtype else value.clone(),
                                            dtype=dtype)
        finally:
            for f in handles.values():
                f.__exit__(None, None, None)
        if prefix and any(t.is_meta for _, t in tensors_of(module)):
            raise ModelLoadError(f"{self.folder}: the checkpoint lacks weights of {prefix.rstrip('.')}")

    def release(self, block: torch.nn.Module):
        block.to("meta")


def tensors_of(module: torch.nn.Module):
    """Parameters and persistent buffers by name (what a checkpoint stores)."""
    yield from module.named_parameters()
    for name, b in module.named_buffers():
        owner, _, leaf = name.rpartition(".")
        if leaf not in module.get_submodule(owner)._non_persistent_buffers_set:
            yield name, b


class WorkFolder:
    """`<out>.partial/`: manifest.json, layer-XXXXX.safetensors per finished block (its full
    state, keys as in the model), hidden-XXXXX/ (the hidden states entering block XXXXX, one
    file per batch). Every file is complete before the manifest names it."""

    def __init__(self, path: Path, fingerprint: dict, resume: bool, overwrite: bool):
        self.path, self.fingerprint = path, fingerprint
        self.done, self.layers = 0, []  # finished blocks; their manifest entries
        if path.exists() and resume:
            self._resume()
        elif path.exists() and not overwrite:
            raise OutputExists(f"{path} holds an unfinished conversion; pass --resume to continue it "
                               "(or --overwrite to start again)")
        else:
            if path.exists():
                shutil.rmtree(path)
            path.mkdir(parents=True)
            self._write_manifest()

    def _resume(self):
        try:
            manifest = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise ResumeMismatch(f"cannot resume from {self.path}: its manifest is unreadable ({exc}); "
                                 "delete it or pass --overwrite") from exc
        old = manifest.get("fingerprint", {})
        changed = [k for k in sorted(set(old) | set(self.fingerprint)) if old.get(k) != self.fingerprint.get(k)]
        if changed:
            raise ResumeMismatch(f"cannot resume from {self.path}: it was started with a different "
                                 f"{', '.join(changed)}; use the same model, settings and data, or pass --overwrite")
        self.done, self.layers = manifest["done"], manifest["layers"]
        log.info("resuming after %d finished layers", self.done)

    def _write_manifest(self):
        tmp = self.path / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "done": self.done, "layers": self.layers}, indent=1))
        os.replace(tmp, self.path / MANIFEST)

    def layer_file(self, i: int) -> Path:
        return self.path / f"layer-{i:05d}.safetensors"

    def hidden_file(self, i: int, j: int) -> Path:
        return self.path / f"hidden-{i:05d}" / f"{j:05d}.safetensors"

    def store_hidden(self, i: int, j: int, h: torch.Tensor) -> Path:
        path = self.hidden_file(i, j)
        path.parent.mkdir(exist_ok=True)
        save_file({"h": h.contiguous()}, path, metadata={"format": "pt"})
        return path

    def finish_layer(self, i: int, tensors: dict[str, torch.Tensor], entry: dict):
        tmp = self.path / f".layer-{i:05d}.tmp"
        save_file({k: t.contiguous() for k, t in tensors.items()}, tmp, metadata={"format": "pt"})
        os.replace(tmp, self.layer_file(i))
        self.done, self.layers = i + 1, self.layers + [entry]
        self._write_manifest()
        shutil.rmtree(self.path / f"hidden-{i:05d}", ignore_errors=True)
