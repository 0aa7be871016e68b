"""Router recall on held-out calibration tokens for a few MLP-router training variants.

Layers 2, 15 and 27 of SmolLM2-135M, coactivation split into 96 experts, 50% active FFN; recall =
share of the oracle's experts (largest true output norms) that the router picks.

    python benchmarks/router_variants.py
"""

from __future__ import annotations

import time

import torch

from moefy.pipeline import load as models
from moefy.arch import family_for
from moefy.config import DataConfig, MoEConfig
from moefy.pipeline.calibrate import calibrate
from moefy.pipeline.group import split_neurons
from moefy.modeling.moe_layer import MoEFFN
from moefy.pipeline.route import router_spec, train_mlp_router

VARIANTS = [("norm", 128, 400), ("log-norm", 128, 400), ("log-norm", 256, 1000), ("norm", 128, 1500)]


def main():
    loaded = models.load("smollm2-135m")
    stats = calibrate(loaded.model, loaded.tokenizer, MoEConfig(num_experts=96, shared=0.0),
                      DataConfig(tokens=16384))
    family = family_for(loaded.model.config)
    blocks = family.block_list(loaded.model)
    for i in (2, 15, 27):
        ffn = family.dense_ffn(blocks[i], loaded.model.config)
        split = split_neurons("coactivation", ffn, stats[i], 96, 0.0, i)
        for loss, hidden, steps in VARIANTS:
            cfg = MoEConfig(router_loss=loss, router_hidden=hidden, router_steps=steps)
            torch.manual_seed(0)
            moe = MoEFFN.from_dense(ffn, split.shared, split.experts, router_spec("mlp", cfg))
            moe.set_selection(moe.top_k_for_share(0.5), None)
            start = time.time()
            m = train_mlp_router(moe, stats[i].inputs, loss=loss, steps=steps, lr=cfg.router_lr, seed=0)
            print(f"layer {i} loss {loss} hidden {hidden} steps {steps}: k={moe.top_k} "
                  f"recall {m['router_recall']:.3f} ({time.time() - start:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
