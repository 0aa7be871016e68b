"""Layer-by-layer conversion: one decoder block's weights and the calibration hidden states in
memory at a time, resumable after a kill.

The model's own modules do all the work. The calibration text is embedded once by the model's
forward, stopped at the first block by a pre-hook that keeps the block's arguments (hidden
states, attention mask, rotary position embeddings: whatever this family and transformers
version pass); then each block runs on the previous block's outputs with those same arguments.
With propagate="dense" the FFN statistics are exactly those profiling.profile collects in one
pass over the whole model (tested bit for bit); with propagate="moe" the next block sees the
outputs of this block with its new MoE FFN, so later routers are trained on the inputs the
sparse model produces (SparseGPT-style sequential calibration).

convert_to_folder streams a safetensors checkpoint: the model is built on the meta device
(accelerate), the non-block weights (embeddings, final norm, head) are read, and each block is
read when its turn comes, converted, written to the work folder and put back on the meta
device. The work folder `<out>.partial/` holds a manifest (fingerprint of the source weights,
settings and calibration tokens; the finished layers' reports), one safetensors file per
finished block and the hidden states entering the next block; `resume=True` continues after
the last finished block, and the finished output takes the per-block files as its shards.

# B blocks of L tokens, b blocks per batch, D hidden, N = B*L calibration tokens
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from moefy import io, provenance
from moefy.pipeline import load as models
from moefy.arch import Family, family_for
from moefy.config import DataConfig, MoEConfig
from moefy.model import MoEModel
from moefy.pipeline.budget import apply_budget
from moefy.pipeline.build import build_layer
from moefy.pipeline.calibrate import calibration_blocks, calibration_record
from moefy.errors import ConfigError, ModelLoadError
from moefy.pipeline.group import NEEDS_COACTIVATION
from moefy.modeling.modeling_moefy import install_moe
from moefy.modeling.compiled import DENSE_PROMPT_FROM
from moefy.modeling.moe_layer import MoEFFN
from moefy.pipeline.blocks import block_inputs, hidden_of, run_layer
from moefy.pipeline.stats import FFNStats
from moefy.pipeline.refit import ffn_inputs, refit_layer
from moefy.pipeline.workfolder import InMemory, Streamed, WorkFolder, tensors_of

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class LayerwiseConfig:
    propagate: str = "dense"   # what block i+1 sees: "dense" (block i as it was) or "moe" (block i with its MoE FFN)
    device: str = "cpu"        # where blocks run: "cpu" or "cuda[:n]"; statistics are reduced there, routers train on the CPU
    dtype: str = "fp32"        # fp32, bf16 or fp16: the dtype the blocks run and are saved in
    offload: bool = False      # keep the hidden states between blocks on disk (the work folder) instead of in RAM

    def validate(self):
        if self.propagate not in ("dense", "moe"):
            raise ConfigError(f"unknown propagate {self.propagate!r}; choose dense or moe")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ConfigError(f"unknown device {self.device!r}; choose cpu or cuda")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {self.device}: no CUDA device is available here; use --device cpu")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def results(self) -> dict:
        """The settings that change the result (offload does not)."""
        return {"propagate": self.propagate, "device": self.device.split(":")[0], "dtype": self.dtype}


# -- running blocks on captured inputs --------------------------------------------------------


# -- where block weights come from ------------------------------------------------------------


# -- the work folder (resume) -----------------------------------------------------------------


# -- the conversion loop ----------------------------------------------------------------------


def fingerprint(record: dict, moe: MoEConfig, data: DataConfig, lw: LayerwiseConfig, calib: torch.Tensor) -> dict:
    from moefy import __version__

    return {"source_weights": record["source_weights"]["sha256"], "calibration_tokens": provenance.sha256_tokens(calib),
            "moe": moe.to_dict(), "data": asdict(data), "layerwise": lw.results(), "moefy": __version__}


@torch.no_grad()
def convert_blocks(model, family: Family, calib: torch.Tensor, moe: MoEConfig, data: DataConfig, lw: LayerwiseConfig,
                   source, work: WorkFolder | None = None, progress: bool = False,
                   on_layer: Callable[[int], None] | None = None) -> list[dict]:
    """Calibrate, build and install each block's MoE FFN in turn; returns one entry per layer
    ({"spec", "report", "assignment"}). With a work folder, each finished block is written there
    (and skipped when the folder already holds it)."""
    blocks, prefix = family.block_list(model), family.blocks_path(model)
    states = block_inputs(model, family, calib, data.batch_size, device="cpu")
    start = work.done if work else 0
    if start:
        states = [(_stored(work, start, j, lw.offload), kw) for j, (_, kw) in enumerate(states)]
    elif work and lw.offload:
        states = [(work.store_hidden(0, j, h), kw) for j, (h, kw) in enumerate(states)]
    entries = list(work.layers) if work else []
    for i in tqdm(range(start, len(blocks)), desc="layers", disable=None if progress else True):
        block = blocks[i]
        source.load(block, f"{prefix}.{i}.")
        block.to(lw.device)
        stats = FFNStats(f"layer {i}", moe.marker_share, moe.method in NEEDS_COACTIVATION, data.tokens)
        store = _storer(work, i + 1, lw.offload)
        dense_out = run_layer(block, family, states, stats, lw.device, store if lw.propagate == "dense" else _drop)
        layer, report = build_layer(i, family.dense_ffn(block, model.config), stats.cpu(), moe)
        kept = stats.inputs if moe.refit_down is not None and stats.keep_inputs >= stats.tokens else None
        del stats
        block.set_submodule(family.ffn, layer.to(lw.device, lw.torch_dtype))
        for path in family.identity:
            block.set_submodule(path, torch.nn.Identity())
        if moe.refit_down is not None:  # on the inputs this block sees (the sparse model's with propagate="moe")
            report.update(refit_layer(layer, refit_inputs(block, layer, states, kept), moe.refit_down))
            del kept
        states = run_layer(block, family, states, None, lw.device, store) if lw.propagate == "moe" else dense_out
        entry = {"spec": layer.spec, "report": report, "assignment": {
            "shared": layer.shared_neurons.tolist(), "experts": layer.expert_neurons.tolist()}}
        entries.append(entry)
        if work:
            block_state = {f"{prefix}.{i}.{k}": v.cpu() for k, v in block.state_dict().items()}
            work.finish_layer(i, block_state, entry)
        block.to("cpu")
        source.release(block)
        if on_layer is not None:
            on_layer(i)
    return entries


def refit_inputs(block, layer, states: list[tuple], kept: torch.Tensor | None) -> torch.Tensor:
    """The down refit's inputs: the FFN inputs profiling kept, when it kept every token's. They are
    the ones the new layer sees: the same states run through the same attention (only the FFN was
    replaced), so the block need not run again up to its FFN (about a third of a conversion's
    time with the refit). Otherwise the block runs again to collect them."""
    if kept is None:
        return ffn_inputs(block, layer, states)
    return kept.to(layer.w_in.device, layer.w_in.dtype)


def _keep(_j, h):
    return h


def _drop(_j, _h):
    return None


def _storer(work: WorkFolder | None, i: int, offload: bool):
    """Outputs of block i-1: written to the work folder (when there is one), kept as the file
    (offload) or as the tensor."""
    if work is None:
        return _keep

    def store(j, h):
        path = work.store_hidden(i, j, h)
        return path if offload else h
    return store


def _stored(work: WorkFolder, i: int, j: int, offload: bool):
    path = work.hidden_file(i, j)
    return path if offload else hidden_of(path)


# -- entry points -----------------------------------------------------------------------------


def convert_layers(model, tokenizer, moe: MoEConfig, data: DataConfig, lw: LayerwiseConfig, *,
                   record: dict, progress: bool = False, work: Path | None = None, resume: bool = False,
                   on_layer: Callable[[int], None] | None = None) -> MoEModel:
    """convert() of a model in memory, one block at a time (see the module docstring); the
    MoE layers are installed in place. With `work`, finished blocks are written there and a
    resumed call continues after them."""
    lw.validate()
    if lw.offload and work is None:
        raise ConfigError("offload keeps the hidden states in the work folder: give a work folder")
    family = family_for(model.config)
    calib = calibration_blocks(model, tokenizer, moe, data)
    wf = WorkFolder(Path(work), fingerprint(record, moe, data, lw, calib), resume, overwrite=True) if work else None
    if wf and wf.done:
        _load_finished(model, family, wf)
    entries = convert_blocks(model.to(lw.torch_dtype), family, calib, moe, data, lw, InMemory(), wf, progress, on_layer)
    layers = [block.get_submodule(family.ffn) for block in family.block_list(model)]
    model.config.moefy = {**_moefy_config(model, family, entries), "layers": [l.spec for l in layers]}
    install_moe(model, model.config.moefy, layers)
    m = MoEModel(model.to("cpu").eval(), tokenizer, _record(record, family, moe, data, lw, calib, entries, "in memory"))
    apply_budget(m, moe)
    m.set_dense_prompt_from(DENSE_PROMPT_FROM)
    return m


def _load_finished(model, family: Family, wf: WorkFolder):
    """Put the blocks a work folder already holds into the model (a resumed in-memory run)."""
    blocks, prefix = family.block_list(model), family.blocks_path(model)
    for i, entry in enumerate(wf.layers):
        blocks[i].set_submodule(family.ffn, MoEFFN(entry["spec"]))
        for path in family.identity:
            blocks[i].set_submodule(path, torch.nn.Identity())
        state = {k.removeprefix(f"{prefix}.{i}."): v.clone() for k, v in load_file(wf.layer_file(i)).items()}
        blocks[i].load_state_dict(state)


def convert_to_folder(name: str, moe: MoEConfig, data: DataConfig, lw: LayerwiseConfig, out: str | os.PathLike, *,
                      overwrite: bool = False, resume: bool = False, progress: bool = False,
                      on_layer: Callable[[int], None] | None = None) -> Path:
    """Convert the model `name` (models.resolve) one block at a time and save it at `out`.
    A safetensors folder is streamed (one block in memory); other sources (GGUF) are loaded
    whole. Finished blocks go to `<out>.partial/`; resume=True continues from there."""
    out = Path(out)
    io.check_target(out, overwrite)
    lw.validate()
    moe.validate()
    data.validate()
    out.parent.mkdir(parents=True, exist_ok=True)
    path = models.resolve(name)
    if path.is_dir() and Streamed.usable(path):
        model, tokenizer, source = _skeleton(path, lw.torch_dtype)
    else:
        loaded = models.load(name, dtype=lw.torch_dtype)
        model, tokenizer, source = loaded.model, loaded.tokenizer, InMemory()
    family = family_for(model.config)
    record = {"source": str(path), "source_weights": provenance.weights_hash(path)}
    calib = calibration_blocks(model, tokenizer, moe, data)
    work_path = out.parent / f"{out.name}.partial"
    # the finished blocks, the rest of the model and two layers of hidden states (fp32)
    size = sum(t.numel() * t.element_size() for _, t in tensors_of(model)) + 2 * calib.numel() * model.config.hidden_size * 4
    io.check_free_space(out.parent, size)
    wf = WorkFolder(work_path, fingerprint(record, moe, data, lw, calib), resume, overwrite)
    entries = convert_blocks(model, family, calib, moe, data, lw, source, wf, progress, on_layer)
    model.config.moefy = _moefy_config(model, family, entries)
    rec = _record(record, family, moe, data, lw, calib, entries, source.loading)
    _budget_specs(model.config.moefy["layers"], rec, moe)
    for spec in model.config.moefy["layers"]:
        spec["dense_prompt_from"] = DENSE_PROMPT_FROM
    _write_folder(model, tokenizer, family, wf, rec, out, overwrite)
    shutil.rmtree(work_path)
    return out


def _skeleton(path: Path, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    if getattr(config, "moefy", None):
        raise ModelLoadError(f"{path} is already a moefy model; load it with moefy.load()")
    family = family_for(config)
    model = Streamed(path, dtype).skeleton(config, AutoModelForCausalLM if family.causal else AutoModel)
    return model, AutoTokenizer.from_pretrained(path), Streamed(path, dtype)


def _moefy_config(model, family: Family, entries: list[dict]) -> dict:
    return {"blocks": family.blocks_path(model), "ffn": family.ffn, "identity": list(family.identity),
            "layers": [e["spec"] for e in entries]}


def _record(record: dict, family: Family, moe: MoEConfig, data: DataConfig, lw: LayerwiseConfig,
            calib: torch.Tensor, entries: list[dict], loading: str) -> dict:
    return {**record, "calibration": calibration_record(data, calib), "family": family.name, "moe": moe.to_dict(),
            "layerwise": {**asdict(lw), "loading": loading}, "layers": [e["report"] for e in entries],
            "assignment": [e["assignment"] for e in entries]}


def _budget_specs(specs: list[dict], record: dict, moe: MoEConfig):
    """budget="sensitivity" for layers that are no longer in memory: the allocation needs only
    their specs (FLOPs) and error curves, so it runs on meta-device copies."""
    if moe.budget != "sensitivity" or moe.active is None:
        return
    with torch.device("meta"):
        layers = torch.nn.ModuleList(MoEFFN(s) for s in specs)
    m = MoEModel(layers, None, record)
    apply_budget(m, moe)
    for spec, layer in zip(specs, layers):
        spec.update(top_k=layer.top_k, tau=layer.tau)


def _write_folder(model, tokenizer, family: Family, wf: WorkFolder, record: dict, out: Path, overwrite: bool):
    """The moefy folder from the work folder's per-block files (hard-linked as shards, so the
    work folder stays intact until the output is in place) and the model's other weights."""
    prefix = family.blocks_path(model) + "."
    rest, seen = {}, set()
    for name, t in model.state_dict().items():  # tied weights once (the first name, as save_pretrained)
        if not name.startswith(prefix) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            rest[name] = t.contiguous()
    layer_files = [wf.layer_file(i) for i in range(wf.done)]
    size = sum(f.stat().st_size for f in layer_files) + sum(t.numel() * t.element_size() for t in rest.values())
    with io.staging(out, overwrite, size) as tmp:
        weight_map = dict.fromkeys(rest, "model-rest.safetensors")
        save_file(rest, tmp / "model-rest.safetensors", metadata={"format": "pt"})
        for i, f in enumerate(layer_files):
            shard = f"model-layer-{i:05d}.safetensors"
            _link(f, tmp / shard)
            with safe_open(f, "pt") as fh:
                weight_map.update(dict.fromkeys(fh.keys(), shard))
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        model.config.save_pretrained(tmp)
        if family.causal and getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        io.finish_folder(tmp, tokenizer, type(model).__name__, family.causal, record, "convert --layerwise")


def _link(src: Path, dst: Path):
    try:
        os.link(src, dst)
    except OSError:  # no hard links on this file system
        shutil.copyfile(src, dst)
