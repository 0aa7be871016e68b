"""Recovery tuning: distil the MoE model toward its dense self within a CPU budget.

The student is the converted model; the teacher is the same model with every expert active (an
exact copy of the dense model, taken before any update). The loss is the KL divergence from the
teacher's next-token distribution to the student's on calibration text, so the experts and
shared neurons learn to make up for what the router leaves out (issue #4, part 4). The routers
pick the experts without gradient; with `routers` (the default for MLP routers) each also keeps
learning its conversion objective (the experts' output norms) online, on the inputs the tuned
sparse model now produces and the experts as they are now. Training runs MoEFFN's masked path:
the same function as inference, one GEMM per matrix. With `hidden_loss` > 0 a second term matches
every layer's output to the teacher's, token by token (the relative squared error of the
residual stream): a signal at every layer, not only through the logits.

The budget is wall-clock minutes and/or tokens, whichever ends first; the learning rate follows
a cosine over the budget. State is checkpointed into a folder (trainable weights as safetensors,
optimizer state, the data order, a fingerprint of model, settings and data) so a killed run
resumes where its last checkpoint left it.

Precision: by default ("auto") the forward passes of student and teacher run under bf16 autocast
where the device multiplies bf16 natively (a CPU with AVX512-BF16 or AMX, a recent GPU): steps
1.4-1.7x faster on session 12's 2-core machine (BENCHMARKS.md), so more of them in the same minutes. The weights,
gradients and optimizer state stay fp32. Elsewhere it is fp32.

# B blocks per step, L tokens per block, V vocabulary
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from moefy.pipeline import data as data_mod
from moefy.model import MoEModel
from moefy.errors import ConfigError
from moefy.io import replace_path
from moefy.pipeline.route import router_objective, router_targets
from moefy.tuning.params import _ffn_parameter_ids, check_memory, trainable_parameters

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class TuneConfig:
    data: str = "wiki-sample:calib"  # training text (same forms as --calib)
    seq_len: int = 256               # tokens per block
    batch_size: int = 4              # blocks per step
    minutes: float | None = 30.0     # wall-clock budget (None: tokens only)
    tokens: int | None = None        # token budget (None: minutes only)
    lr: float = 3e-4                 # peak AdamW learning rate (3e-4 beat 1e-4 at 20 steps, BENCHMARKS.md)
    warmup: int = 10                 # linear warm-up steps
    train: str = "ffn"               # "ffn": experts + shared neurons; "down": their down rows only;
                                     # "all": also attention and norms
    other_lr: float | None = None    # peak learning rate of attention and norms with train="all"
                                     # (None: lr; at 25% lr 1e-3 on them was worse than not training them)
    routers: bool | None = None      # refit MLP routers online to the tuned experts' output norms
                                     # (None: when every router is a trained mlp; it won in BENCHMARKS.md)
    router_lr: float = 1e-3          # peak learning rate of the routers (same schedule)
    checkpoint_minutes: float = 5.0  # wall-clock between checkpoints
    seed: int = 0                    # data order
    precision: str = "auto"          # "fp32", "bf16" (autocast; fp32 master weights) or "auto" (bf16 where
                                     # the device runs it fast: resolve_precision)
    recompute: bool = False          # gradient checkpointing: keep only each decoder block's input and
                                     # recompute the block in the backward pass (less memory, ~1.3x time)
    hidden_loss: float = 0.0         # weight of the hidden-state term: every layer's output matched to the
                                     # teacher's, token by token (relative squared error, mean over layers)

    def validate(self):
        if self.minutes is None and self.tokens is None:
            raise ConfigError("give a tuning budget: minutes, tokens or both")
        if self.minutes is not None and self.minutes <= 0:
            raise ConfigError(f"minutes must be positive, got {self.minutes}")
        if self.tokens is not None and self.tokens < self.seq_len * self.batch_size:
            raise ConfigError(f"tokens ({self.tokens}) must cover at least one step of "
                              f"{self.batch_size} blocks x {self.seq_len} tokens")
        if self.train not in ("ffn", "down", "all"):
            raise ConfigError(f"unknown --train {self.train!r}; choose ffn, down or all")
        if not 0 < self.lr < 1 or not 0 < self.router_lr < 1:
            raise ConfigError(f"learning rates must be in (0, 1), got {self.lr} and {self.router_lr} (routers)")
        if self.other_lr is not None:
            if self.train != "all":
                raise ConfigError("--other-lr sets the learning rate of attention and norms; it needs --train all")
            if not 0 < self.other_lr < 1:
                raise ConfigError(f"--other-lr must be in (0, 1), got {self.other_lr}")
        if self.batch_size < 1 or self.seq_len < 8:
            raise ConfigError("batch size must be positive and seq_len at least 8")
        if self.checkpoint_minutes <= 0:
            raise ConfigError(f"checkpoint interval must be positive, got {self.checkpoint_minutes}")
        if not 0 <= self.hidden_loss < 1e3:
            raise ConfigError(f"--hidden-loss must be in [0, 1000), got {self.hidden_loss}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown --precision {self.precision!r}; choose {', '.join(PRECISIONS)}")

    def budget_used(self, seconds: float, tokens: int) -> float:
        """Share of the budget spent, in [0, 1]: the larger of time and tokens."""
        used = 0.0
        if self.minutes is not None:
            used = max(used, seconds / (60 * self.minutes))
        if self.tokens is not None:
            used = max(used, tokens / self.tokens)
        return min(used, 1.0)


PRECISIONS = ("auto", "fp32", "bf16")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU features that run bf16 matrix products natively. Without them a CPU emulates bf16, about
200x slower than fp32 on the machines PERF.md measured: "auto" must never pick it there."""


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU lists a native bf16 matrix instruction set (Linux; False elsewhere)."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def resolve_precision(precision: str, device: torch.device) -> str:
    """"fp32" or "bf16" for `precision` on `device`: "auto" is bf16 on a CUDA device that supports
    it and on a CPU with native bf16 products (cpu_has_bf16), fp32 elsewhere. An explicit "bf16"
    is honoured anywhere (slow on a CPU without those products)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"


def _autocast(precision: str, device: torch.device):
    """The forward passes' context: bf16 autocast (the weights stay fp32 and so do the optimizer's
    updates; matrix products run in bf16) or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fingerprint(m: MoEModel, cfg: TuneConfig, blocks: torch.Tensor) -> str:
    """Hash of the starting weights, the tuning settings and the training tokens."""
    h = hashlib.sha256()
    for name, t in sorted(m.model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("minutes", "tokens", "checkpoint_minutes")}
    if settings["precision"] == "fp32":  # checkpoints written before the option resume as they did
        del settings["precision"]
    if settings["other_lr"] is None:
        del settings["other_lr"]
    if not settings["hidden_loss"]:
        del settings["hidden_loss"]
    if not settings["recompute"]:
        del settings["recompute"]
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(blocks.numpy().tobytes())
    return h.hexdigest()[:16]


def tune(m: MoEModel, cfg: TuneConfig = TuneConfig(), checkpoint: str | os.PathLike | None = None,
         resume: bool = False, progress: bool = False, on_step=None) -> dict:
    """Distil `m` (in place) toward its dense self. Returns a record of the run (steps, tokens,
    seconds, loss at start and end). With `checkpoint`, state is saved there every
    cfg.checkpoint_minutes and at the end; `resume` continues from it (the fingerprint must match).
    `on_step(step, loss)` is called after every step (tests use it to interrupt a run)."""
    cfg = _checked(m, cfg)
    blocks = data_mod.blocks(cfg.data, m.tokenizer, cfg.seq_len, min_tokens=cfg.seq_len * cfg.batch_size)
    fp = fingerprint(m, cfg, blocks)
    check_memory(m, cfg)
    teacher = _teacher(m)
    params, opt = _optimizer(m, cfg)
    state = {"step": 0, "tokens": 0, "seconds": 0.0, "losses": [], "router_losses": [], "hidden_losses": []}
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if resume:
        if ckpt is None or not (ckpt / "state.json").is_file():
            raise ConfigError(f"nothing to resume: no checkpoint in {ckpt}")
        _restore(ckpt, fp, params, opt, state)
        log.info("resumed at step %d (%d tokens, %.0f s)", state["step"], state["tokens"], state["seconds"])
    fit = _RouterFit(m.layers) if cfg.routers else None
    m.model.train(False)  # no dropout: the student must match inference
    try:
        with _recomputed(m, cfg.recompute):
            _loop(m, teacher, blocks, cfg, opt, fit, state, progress, on_step,
                  save=None if ckpt is None else lambda: _save(ckpt, fp, cfg, params, opt, state))
    finally:
        if fit is not None:
            fit.remove()
        m.model.requires_grad_(False)
        for layer in m.layers:
            layer.reset_counters()
    if ckpt is not None:
        _save(ckpt, fp, cfg, params, opt, state)
    refit = _refit_score_quantiles(m, blocks)
    m.record["tuning"] = _record(cfg, state, params, fp, refit)
    return m.record["tuning"]


def _checked(m: MoEModel, cfg: TuneConfig) -> TuneConfig:
    """The settings checked against the model, with routers and precision resolved."""
    cfg.validate()
    if m.record.get("kind") == "sparse_expansion":
        raise ConfigError("recovery tuning works on `moefy convert` models, not on pruned folders")
    if not m.family.causal:
        raise ConfigError(f"recovery tuning distils next-token distributions; {m.family.name} is not a causal LM")
    kinds = {layer.spec["router"]["kind"] for layer in m.layers}
    if cfg.routers is None:
        cfg = dataclasses.replace(cfg, routers=kinds == {"mlp"})
    device = next(m.model.parameters()).device
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, device))
    if cfg.routers and kinds != {"mlp"}:
        raise ConfigError(f"refitting routers while tuning needs trained mlp routers; this model has "
                          f"{', '.join(sorted(kinds))} (convert with --router mlp, or tune without --routers)")
    return cfg


@contextlib.contextmanager
def _recomputed(m: MoEModel, on: bool):
    """With `on`, every decoder block runs under activation checkpointing (torch.utils.checkpoint,
    non-reentrant): its inputs are kept, its insides recomputed in the backward pass."""
    if not on:
        yield
        return
    blocks = m.model.get_submodule(m.family.blocks_path(m.model))
    for block in blocks:
        forward = block.forward
        block.forward = lambda *a, _f=forward, **k: torch.utils.checkpoint.checkpoint(_f, *a, use_reentrant=False, **k)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward  # the class's forward again


def _optimizer(m: MoEModel, cfg: TuneConfig):
    """(the trained parameters by name, AdamW with one group each for the FFNs, the other trained
    parameters and the routers, each with its peak learning rate)."""
    params = trainable_parameters(m, cfg.train)
    router_ids = {id(p) for layer in m.layers for p in layer.router.parameters()} if cfg.routers else set()
    routers = {name: p for name, p in m.model.named_parameters() if id(p) in router_ids}
    m.model.requires_grad_(False)
    for p in (*params.values(), *routers.values()):
        p.requires_grad_(True)
    ffn_ids = _ffn_parameter_ids(m)
    other_lr = cfg.lr if cfg.other_lr is None else cfg.other_lr
    groups = [{"params": [p for p in params.values() if id(p) in ffn_ids], "lr": cfg.lr, "peak_lr": cfg.lr}]
    others = [p for p in params.values() if id(p) not in ffn_ids]
    if others:
        groups.append({"params": others, "lr": other_lr, "peak_lr": other_lr})
    if routers:
        groups.append({"params": list(routers.values()), "lr": cfg.router_lr, "peak_lr": cfg.router_lr})
    return {**params, **routers}, torch.optim.AdamW(groups, weight_decay=0.0)


def _loop(m, teacher, blocks, cfg: TuneConfig, opt, fit, state: dict, progress: bool, on_step, save):
    """Steps until the budget is used: cosine schedule after a linear warm-up; `save` (a
    checkpoint) every cfg.checkpoint_minutes."""
    device = next(m.model.parameters()).device
    bar = tqdm(total=100, desc="recovery tuning", unit="%", disable=None if progress else True)
    start, last_ckpt = time.monotonic() - state["seconds"], time.monotonic()
    try:
        while (used := cfg.budget_used(state["seconds"], state["tokens"])) < 1.0:
            batch = _batch(blocks, state["step"], cfg)
            factor = min(1.0, (state["step"] + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * used))
            for g in opt.param_groups:
                g["lr"] = g["peak_lr"] * factor
            with _autocast(cfg.precision, device):
                loss, router_loss, hidden = _step(m.model, teacher, batch, opt, fit, cfg.hidden_loss)
            _account(state, batch, start, loss, router_loss, hidden)
            bar.n = round(100 * cfg.budget_used(state["seconds"], state["tokens"]))
            bar.set_postfix(loss=f"{loss:.4f}", step=state["step"])
            log.info("step %d: KL %.4f%s%s, lr %.2e, %d tokens, %.0f s", state["step"], loss,
                     "" if router_loss is None else f", router loss {router_loss:.4f}",
                     "" if hidden is None else f", hidden {hidden:.4f}", cfg.lr * factor,
                     state["tokens"], state["seconds"])
            if on_step is not None:
                on_step(state["step"], loss)
            if save is not None and time.monotonic() - last_ckpt > 60 * cfg.checkpoint_minutes:
                save()
                last_ckpt = time.monotonic()
    finally:
        bar.close()


def _account(state: dict, batch, start: float, loss, router_loss, hidden):
    state["step"] += 1
    state["tokens"] += batch.numel()
    state["seconds"] = time.monotonic() - start
    state["losses"].append(loss)
    if router_loss is not None:
        state["router_losses"].append(router_loss)
    if hidden is not None:
        state["hidden_losses"].append(hidden)


def _record(cfg: TuneConfig, state: dict, params: dict, fp: str, refit: int) -> dict:
    head, tail = _ends(state["losses"])
    record = {**asdict(cfg), "steps": state["step"], "tokens_seen": state["tokens"], "seconds": round(state["seconds"], 1),
              "trainable_parameters": sum(p.numel() for p in params.values()), "fingerprint": fp,
              "kl_first_10_steps": head, "kl_last_10_steps": tail}
    if refit:
        record["score_quantiles_refit_tokens"] = refit
    if cfg.hidden_loss:
        record["hidden_first_10_steps"], record["hidden_last_10_steps"] = _ends(state["hidden_losses"])
    if cfg.routers:
        record["router_loss_first_10_steps"], record["router_loss_last_10_steps"] = _ends(state["router_losses"])
    return record


def _refit_score_quantiles(m: MoEModel, blocks: torch.Tensor, tokens: int = 1024) -> int:
    """Sketch routers with score thresholds: their quantiles fitted again on the tuned model's own
    layer inputs (the first `tokens` of the tuning data), so that the thresholds keep the budget's
    mean counts with the tuned weights; a pruned sketch's density too (its masks follow the
    weights), and a quantised router's 4-bit copy first (it is a copy of the tuned gate and up).
    Returns the tokens used (0: nothing to refit)."""
    for layer in m.layers:
        if hasattr(layer.router, "quantize_weights"):
            layer.router.quantize_weights()
    if not any(getattr(layer.router, "grid", None) or getattr(layer.router, "sparsity", 0) for layer in m.layers):
        return 0
    take = blocks[:max(1, math.ceil(tokens / blocks.shape[1]))]
    with torch.no_grad():
        for layer, x in zip(m.layers, m.layer_inputs(take)):
            if getattr(layer.router, "sparsity", 0):  # the masks follow the tuned weights
                layer.fit_sketch_sparsity(x, tokens, norms=False)
            if getattr(layer.router, "grid", None):
                layer.fit_score_quantiles(x, tokens)
    for layer in m.layers:
        layer.reset_counters()
    return int(take.numel())


def _ends(losses: list[float]) -> tuple[float, float]:
    """Mean of the first and of the last (up to) 10 values, windows that do not overlap when
    there are 2+ values."""
    w = max(1, min(10, len(losses) // 2))
    return sum(losses[:w]) / max(len(losses[:w]), 1), sum(losses[-w:]) / max(len(losses[-w:]), 1)


class _RouterFit:
    """Online refit of the MLP routers during tuning: a forward hook on each MoE layer gives its
    router the conversion objective (routing.router_targets: the experts' output norms, computed
    without gradient) on the input the student's forward just fed that layer, so the router
    follows both the tuned experts and the inputs the sparse model produces. The router reads a
    detached input: its loss trains the router only, and the distillation loss never reaches it."""

    def __init__(self, layers):
        self.losses = []
        self.handles = [layer.register_forward_hook(self._hook) for layer in layers]

    def _hook(self, layer, args, _output):
        if not torch.is_grad_enabled():
            return
        x = args[0].detach().reshape(-1, args[0].shape[-1])
        kind, objective = router_objective(layer)
        targets = router_targets(layer, x, kind)
        self.losses.append(objective(layer.router.logits(layer._router_in(x).detach()), targets))

    def take(self) -> torch.Tensor | None:
        """The mean router loss over the layers of the last forward (None if none ran)."""
        losses, self.losses = self.losses, []
        return torch.stack(losses).mean() if losses else None

    def remove(self):
        for h in self.handles:
            h.remove()


def _teacher(m: MoEModel):
    """A frozen copy of the model in dense mode: exactly the dense model, whatever the student
    becomes. A model whose weights already changed (tuned before, or its down rows refitted) is
    no longer the dense model with every expert active: its source model is loaded instead."""
    if not m.all_experts_is_dense:
        return m.source_model()
    teacher = copy.deepcopy(m.model).eval().requires_grad_(False)
    for module in teacher.modules():
        if hasattr(module, "all_experts"):
            module.all_experts = True
    return teacher


def _batch(blocks, step: int, cfg: TuneConfig) -> torch.Tensor:
    """Step `step`'s blocks: consecutive slices of a shuffled pass over the data, a new order
    (seeded by cfg.seed and the epoch) each pass; a function of the step alone, so a resumed run
    sees the same batches."""
    epoch, i = divmod(step * cfg.batch_size, len(blocks))
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(cfg.seed + epoch))
    return blocks[order[i:i + cfg.batch_size]]


def _step(student, teacher, batch, opt, fit=None, hidden_loss: float = 0.0):
    """One optimizer step; returns the KL, the mean router loss (with a router fit, else None) and
    the hidden-state term (with hidden_loss > 0, else None). The optimised loss is KL + router loss
    + hidden_loss x hidden-state term."""
    states = hidden_loss > 0
    with torch.no_grad():
        t = teacher(input_ids=batch, output_hidden_states=states)
        target = F.log_softmax(t.logits.float(), -1).flatten(0, 1)  # [B*L, V]
    s = student(input_ids=batch, output_hidden_states=states)
    loss = F.kl_div(F.log_softmax(s.logits.float(), -1).flatten(0, 1), target, log_target=True, reduction="batchmean")
    router_loss = fit.take() if fit is not None else None
    hidden = hidden_state_error(s.hidden_states, t.hidden_states) if states else None
    total = loss
    if router_loss is not None:
        total = total + router_loss
    if hidden is not None:
        total = total + hidden_loss * hidden
    opt.zero_grad(set_to_none=True)
    total.backward()
    opt.step()
    as_float = lambda v: None if v is None else float(v.detach())  # noqa: E731
    return float(loss.detach()), as_float(router_loss), as_float(hidden)


def hidden_state_error(student, teacher) -> torch.Tensor:
    """Mean over layers and tokens of |h_s - h_t|^2 / |h_t|^2, the residual stream after every
    layer (the embeddings, identical in both, are skipped). Token by token, so that the few tokens
    with very large hidden states (a Llama's first position) do not outweigh the rest."""
    errors = []
    for hs, ht in zip(student[1:], teacher[1:]):
        hs, ht = hs.float(), ht.float()
        errors.append(((hs - ht).pow(2).sum(-1) / ht.pow(2).sum(-1).clamp_min(1e-12)).mean())
    return torch.stack(errors).mean()


# -- checkpoints --------------------------------------------------------------------------------

LOSS_HISTORIES = ("losses", "router_losses", "hidden_losses")  # per step, kept in checkpoints


def _save(folder: Path, fp: str, cfg: TuneConfig, params, opt, state):
    """Atomic: a temporary folder beside the checkpoint, then one rename."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file({k: p.detach().contiguous() for k, p in params.items()}, tmp / "weights.safetensors")
        torch.save({"optimizer": opt.state_dict(), **{k: state[k] for k in LOSS_HISTORIES}}, tmp / "state.pt")
        meta = {"fingerprint": fp, "config": asdict(cfg), **{k: state[k] for k in ("step", "tokens", "seconds")}}
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
        replace_path(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _restore(folder: Path, fp: str, params, opt, state):
    meta = json.loads((folder / "state.json").read_text())
    if meta["fingerprint"] != fp:
        raise ConfigError(f"the checkpoint in {folder} was made from another model, data or settings "
                          f"(fingerprint {meta['fingerprint']}, now {fp}); delete it or start without --resume")
    weights = load_file(folder / "weights.safetensors")
    if set(weights) != set(params):
        raise ConfigError(f"the checkpoint in {folder} trains other parameters; delete it or start without --resume")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    saved = torch.load(folder / "state.pt", weights_only=True)
    opt.load_state_dict(saved["optimizer"])
    state.update({k: meta[k] for k in ("step", "tokens", "seconds")},
                 **{k: list(saved.get(k, ())) for k in LOSS_HISTORIES})  # hidden_losses: none before the option
