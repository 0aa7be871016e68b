"""Settings for each pipeline stage: frozen dataclasses, each field with its unit."""

from __future__ import annotations

from dataclasses import asdict, dataclass


from moefy.errors import ConfigError
from moefy.modeling.routers import ROUTERS
from moefy.pipeline.group import GROUPINGS


def check_strength(lam: float):
    """A ridge strength of the down refit (relative to the mean Gram diagonal) must be positive."""
    if not lam > 0:
        raise ConfigError(f"the down refit's ridge strength must be positive, got {lam}; try 1.0")


@dataclass(frozen=True)
class DataConfig:
    source: str = "wiki-sample"      # calibration text: built-in name[:split], .txt or .jsonl
    seq_len: int = 256               # tokens per block
    tokens: int = 16384              # calibration tokens (rounded down to whole blocks)
    batch_size: int = 8              # blocks per forward pass

    def validate(self):
        if self.seq_len < 8:
            raise ConfigError(f"seq_len must be at least 8, got {self.seq_len}")
        if self.tokens < self.seq_len:
            raise ConfigError(f"tokens ({self.tokens}) must be at least one block of seq_len ({self.seq_len})")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {self.batch_size}")


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int | None = 384    # expert slots per FFN, shared slots included; FFN width / this = neurons per expert
    expert_size: int | None = None   # neurons per expert slot instead of num_experts (fits any FFN width; presets use it)
    active: float | None = 0.5       # target FFN compute share per token, router and shared experts counted, in (0, 1]
    tau: float | None = None         # dynamic-k threshold in [0, 1); replaces the fixed top-k from `active`
    method: str = "coactivation"     # neuron grouping, see grouping.GROUPINGS
    shared: float = 0.1              # share of expert slots that become always-on shared neurons, [0, 1)
    budget: str = "uniform"          # per-layer top-k for `active`: "uniform" (same share everywhere) or "sensitivity" (budget.py)
    router: str = "mlp"              # router kind, see moe_layer.ROUTERS
    router_hidden: int = 128         # hidden width of the mlp router
    router_input: str = "own"        # what each router reads: "own" (its layer's FFN input) or "previous" (the previous layer's: Pre-gated MoE)
    router_loss: str = "log-norm"    # mlp router target: "log-norm" (MSE on log(1 + expert output norm)), "norm" (D2DMoE) or "bce" (MoEfication)
    router_steps: int = 400          # Adam steps per layer for trained routers
    router_lr: float = 3e-3          # Adam learning rate for trained routers
    router_channels: float | None = None  # sketch router: share of each token's input channels (largest |x|) it reads, (0, 1]; None: 0.8 x active (0.6 x without reuse)
    router_reuse: bool = True        # sketch router: the selected neurons complete its partial sums (their gate and up cost 1 - its products of them)
    router_approx: float | None = None  # sketch router: share of the routed budget for sketched experts (down rows x sketched activations), [0, 1); None: 0.3 with a fixed top-k, else 0
    router_threshold: bool | None = None  # sketch router: select by per-layer score thresholds fitted on calibration text (the top-k's mean counts) instead of the same top-k per token; None: on with a fixed top-k
    router_sparsity: float = 0.0     # sketch router: share of each neuron's gate and up weights its sketch leaves out (Wanda scores), [0, 1)
    refit_down: float | None = None  # ridge strength of the down-row refit after the routers (refit.py), relative to the mean Gram diagonal, > 0; None: no refit
    marker_share: float = 0.25       # a neuron is "active" on a token when in that token's top share by |h|
    seed: int = 0                    # seeds grouping and router training

    def validate(self, ffn_width: int | None = None):
        if self.method not in GROUPINGS:
            raise ConfigError(f"unknown method {self.method!r}; choose from {', '.join(GROUPINGS)}")
        if self.router not in ROUTERS:
            raise ConfigError(f"unknown router {self.router!r}; choose from {', '.join(ROUTERS)}")
        if self.budget not in ("uniform", "sensitivity"):
            raise ConfigError(f"unknown budget {self.budget!r}; choose uniform or sensitivity")
        if self.router_input not in ("own", "previous"):
            raise ConfigError(f"unknown router input {self.router_input!r}; choose own or previous")
        if self.router_input == "previous" and (self.router != "mlp" or self.budget != "uniform"):
            raise ConfigError("--router-input previous needs a trained router and a uniform budget "
                              "(--router mlp --budget uniform)")
        if self.router_loss not in ("log-norm", "norm", "bce"):
            raise ConfigError(f"unknown router loss {self.router_loss!r}; choose log-norm, norm or bce")
        if self.router_channels is not None and not 0 < self.router_channels <= 1:
            raise ConfigError(f"router channels must be in (0, 1], got {self.router_channels}")
        if self.router_approx is not None and not 0 <= self.router_approx < 1:
            raise ConfigError(f"router approx share must be in [0, 1), got {self.router_approx}")
        if not 0 <= self.router_sparsity < 1:
            raise ConfigError(f"router sparsity must be in [0, 1), got {self.router_sparsity}; try 0.6 at 25% active, 0.33 at 50%")
        if self.router_sparsity and self.router != "sketch":
            raise ConfigError("--router-sparsity prunes a sketch router's view of the weights; use it with --router sketch")
        if self.router_approx and (self.router not in ("sketch", "quant") or self.tau is not None):
            raise ConfigError("--router-approx needs the sketch router and a fixed top-k (--router sketch, no --tau)")
        if self.router_threshold and (self.router not in ("sketch", "quant") or self.tau is not None):
            raise ConfigError("--router-threshold needs the sketch router and a fixed top-k (--router sketch, no --tau)")
        if self.refit_down is not None:
            check_strength(self.refit_down)
        if self.refit_down is not None and self.router_input != "own":
            raise ConfigError("--refit-down needs routers that read their own layer's input (--router-input own)")
        if (self.num_experts is None) == (self.expert_size is None):
            raise ConfigError("give the number of experts (--experts) or their size in neurons (--expert-size), not both")
        if self.num_experts is not None and self.num_experts < 2:
            raise ConfigError(f"experts must be at least 2, got {self.num_experts}")
        if self.expert_size is not None and self.expert_size < 1:
            raise ConfigError(f"expert size must be at least 1 neuron, got {self.expert_size}")
        if self.active is None and self.tau is None:
            raise ConfigError("give an active share or a tau")
        if self.active is not None and not 0 < self.active <= 1:
            raise ConfigError(f"active share must be in (0, 1], got {self.active}")
        if self.tau is not None and not 0 <= self.tau < 1:
            raise ConfigError(f"tau must be in [0, 1), got {self.tau}")
        if not 0 <= self.shared < 1:
            raise ConfigError(f"shared share must be in [0, 1), got {self.shared}")
        if not 0 < self.marker_share <= 1:
            raise ConfigError(f"marker share must be in (0, 1], got {self.marker_share}")
        if ffn_width is not None:
            self._check_width(ffn_width)

    def _check_width(self, ffn_width: int):
        if self.expert_size is not None:
            if ffn_width % self.expert_size or ffn_width // self.expert_size < 2:
                raise ConfigError(f"expert size ({self.expert_size} neurons) must divide the FFN width ({ffn_width}) "
                                  "into at least 2 experts; try --expert-size 1")
            return
        if self.num_experts > ffn_width:
            raise ConfigError(f"experts ({self.num_experts}) cannot exceed the FFN width ({ffn_width})")
        if ffn_width % self.num_experts:
            ok = [e for e in (8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768) if ffn_width % e == 0]
            raise ConfigError(f"experts ({self.num_experts}) must divide the FFN width ({ffn_width}); "
                              f"try one of {ok}, or give --expert-size (neurons per expert) instead")

    def experts_for(self, ffn_width: int) -> int:
        """Expert slots of an FFN of `ffn_width` neurons (num_experts, or the width / expert_size)."""
        return ffn_width // self.expert_size if self.expert_size is not None else self.num_experts

    def to_dict(self) -> dict:
        return asdict(self)
