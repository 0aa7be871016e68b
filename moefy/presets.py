"""Presets: named recipes. A preset holds the settings of every stage (experts, routers, budget,
refit, calibration text, recovery tuning) that a benchmark found best, so a user names one instead
of a dozen flags. Expert size is in neurons, so a preset fits any FFN width and any family.

`moefy convert --model M` uses DEFAULT; `--preset NAME` another, or `--preset my.json` a file of
the same shape ({"summary": ..., "moe": {...}, "data": {...}, "tune": {...}}); single flags override
a preset's settings. `moefy presets` lists them with what they measured (BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from moefy.config import DataConfig, MoEConfig
from moefy.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str                                 # one line: what it is for
    moe: dict = field(default_factory=dict)      # MoEConfig fields
    data: dict = field(default_factory=dict)     # DataConfig fields (calibration text)
    tune: dict = field(default_factory=dict)     # TuneConfig fields for `moefy tune`
    measured: str = ""                           # what it gave on SmolLM2-135M (BENCHMARKS.md)

    def moe_config(self, **overrides) -> MoEConfig:
        """The preset's MoEConfig with `overrides` (None values are ignored). A given num_experts
        replaces the preset's expert size (the two are alternatives), a given tau its active share,
        and another router kind the preset's router_* settings (they belong to its router)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        own = dict(self.moe)
        if given.get("router", own.get("router")) != own.get("router"):  # another router kind: its own defaults
            own = {k: v for k, v in own.items() if not k.startswith("router_")}
        settings = {**own, **given}
        if "num_experts" in given:
            settings["expert_size"] = None
        if given.get("tau") is not None:
            settings["active"] = None
        return _make(MoEConfig, settings, self.name)

    def data_config(self, **overrides) -> DataConfig:
        return _make(DataConfig, {**self.data, **{k: v for k, v in overrides.items() if v is not None}}, self.name)

    def settings(self) -> dict:
        return {"moe": dict(self.moe), "data": dict(self.data), "tune": dict(self.tune)}


def _make(cls, settings: dict, name: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(f"preset {name!r}: unknown {cls.__name__} settings {unknown}; known: {sorted(known)}")
    return cls(**settings)


# The recommended recipe: one-neuron experts ranked by a 4-bit copy of gate and up (a tenth of the
# FFN's bytes), score thresholds, the next-ranked neurons through their estimates (approx), the
# down rows refitted by ridge regression; 40% of the FFN's weight bytes read per token.
BALANCED = Preset(
    name="balanced",
    summary="one-neuron experts ranked by a 4-bit copy of gate/up, thresholds, down refit; 40% of FFN bytes",
    moe=dict(num_experts=None, expert_size=1, shared=0.0, active=0.4, router="quant", router_approx=0.16,
             refit_down=1.0),
    tune=dict(lr=3e-4, minutes=30.0),
    measured="1.07x dense perplexity on wiki-sample:heldout, 1.09x on pydoc:heldout, 40% of the FFN bytes read; "
             "decode 1.33x-1.42x dense (three runs), prefill at dense speed (0.96x-1.07x at 128 and 1,024 tokens), "
             "memory 1.06x (SmolLM2-135M, 1 thread, AVX512; BENCHMARKS.md)",
)

HALF = dataclasses.replace(
    BALANCED, name="half", summary="the balanced recipe at 50% of the FFN's bytes: closest to dense",
    moe={**BALANCED.moe, "active": 0.5},
    measured="1.04x dense perplexity on wiki-sample:heldout and on pydoc:heldout, 48% of the FFN bytes read; "
             "decode 1.18x dense, prefill 1.03x / 1.00x dense time, memory 1.06x",
)

FAST = dataclasses.replace(
    BALANCED, name="fast", summary="the balanced recipe at 30% of the FFN's bytes",
    moe={**BALANCED.moe, "active": 0.3},
    measured="1.19x dense perplexity on wiki-sample:heldout, 1.22x on pydoc:heldout, 30% of the FFN bytes read; "
             "decode 1.35x dense, prefill 1.02x-1.07x / 0.98x-1.08x dense time, memory 1.06x",
)

# The previous default: the sketch router reads the largest 60% of each token's input channels of
# a pruned copy of gate and up (40% of the FFN's bytes) to rank the neurons.
SKETCH = Preset(
    name="sketch",
    summary="one-neuron experts, pruned sketch router with thresholds, down refit; 50% of FFN FLOPs counted",
    moe=dict(num_experts=None, expert_size=1, shared=0.0, active=0.5, router="sketch", router_sparsity=0.33,
             router_approx=0.4, refit_down=1.0),
    tune=dict(lr=3e-4, minutes=30.0),
    measured="1.10x dense perplexity on wiki-sample:heldout, 1.12x on pydoc; 68% of the FFN bytes read (the "
             "router 40%); decode 1.06x dense, prefill 1.84x slower (batch 1, 1 thread, AVX512)",
)

QUARTER = Preset(
    name="quarter",
    summary="the sketch recipe at 25% of FFN FLOPs counted, calibrated on Wikipedia and pydoc",
    moe=dict(num_experts=None, expert_size=1, shared=0.0, active=0.25, router="sketch", router_sparsity=0.6,
             router_approx=0.2, refit_down=1.0),
    data=dict(source="wiki-sample+pydoc"),
    tune=dict(lr=1e-3, minutes=30.0, data="wiki-sample:calib+pydoc:calib"),
    measured="1.95x dense perplexity on wiki-sample:heldout, 1.81x on pydoc; 1.49x / 1.29x after 30 min of tuning",
)

MOEFICATION = Preset(
    name="moefication",
    summary="MoEfication + CMoE + D2DMoE: 4-neuron experts, 10% shared neurons, co-activation split, MLP router",
    moe=dict(num_experts=None, expert_size=4, shared=0.1, active=0.5, method="coactivation", router="mlp",
             router_loss="log-norm"),
    measured="3.04x dense perplexity on wiki-sample:heldout at 50% counted; at 25% its FFNs take 0.32x dense "
             "time (the fastest path today) but perplexity is 3x-22x dense",
)

# TEAL (Liu et al., ICLR 2025) as moefy's paths run it: training-free activation sparsity. Per
# token, gate and up read only the half of the input channels of largest |x| (from a column-major
# copy of gate and up: one contiguous row per kept channel), and the down projection reads only
# the neurons whose activation, estimated from those channels, contributes most (|h| x ||w_down||
# over a per-layer threshold fitted on calibration text); 10% of the budget recomputes the best
# neurons exactly. Against TEAL itself: the top half of channels per token instead of a magnitude
# threshold (the same mean count), WINA-style scores on the down side, FFNs only (not attention),
# and the column-major copy kept beside the row-major weights (which prompts use).
TEAL = Preset(
    name="teal",
    summary="TEAL-style activation sparsity, training-free: half of each token's input channels, then the "
            "neurons they predict largest; 50% of FFN bytes",
    moe=dict(num_experts=None, expert_size=1, shared=0.0, active=0.5, router="sketch", router_channels=0.5,
             router_approx=0.9),
    measured="1.33x dense perplexity on wiki-sample:heldout, 1.26x on pydoc:heldout, 51% of the FFN bytes read "
             "(the sketch 33%); decode 1.14x dense, memory 1.40x (the column-major copy)",
)

PRESETS = {p.name: p for p in (BALANCED, HALF, FAST, SKETCH, QUARTER, MOEFICATION, TEAL)}
DEFAULT = BALANCED.name


def get(name: str | None) -> Preset:
    """A built-in preset by name (None: the default), or a preset file (.json)."""
    name = DEFAULT if name is None else name
    if name in PRESETS:
        return PRESETS[name]
    if name.endswith(".json"):
        return _from_file(Path(name))
    raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)} or give a .json preset file")


def _from_file(path: Path) -> Preset:
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read the preset file {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ConfigError(f"{path} is not a JSON preset: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a preset file holds one JSON object with moe, data and tune objects")
    for key in ("moe", "data", "tune"):
        if not isinstance(raw.get(key, {}), dict):
            raise ConfigError(f"{path}: {key!r} must be a JSON object of settings")
    unknown = sorted(set(raw) - {"summary", "moe", "data", "tune", "measured"})
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}; a preset has summary, moe, data, tune, measured")
    preset = Preset(name=str(path), summary=str(raw.get("summary", "")), moe=raw.get("moe", {}),
                    data=raw.get("data", {}), tune=raw.get("tune", {}), measured=str(raw.get("measured", "")))
    preset.moe_config().validate()
    preset.data_config().validate()
    return preset


def names() -> list[str]:
    return list(PRESETS)
