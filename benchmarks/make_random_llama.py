"""A Llama with random weights for the big-model memory benchmark (BENCHMARKS.md, "Big models
layer by layer"): built on the meta device and written one block at a time, so making it never
holds the whole model either. The tokenizer is SmolLM2's (from the built-in GGUF), so the
built-in calibration text works.

    python benchmarks/make_random_llama.py /tmp/llama-1b --hidden 2048 --layers 16 --ffn 5632
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from moefy.pipeline.load import resolve


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    gguf = resolve("smollm2-135m")
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=a.hidden, intermediate_size=a.ffn, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.heads, max_position_embeddings=2048,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    groups = [("model.layers.%d." % i, f"model-{i:05d}.safetensors") for i in range(a.layers)]
    groups.append(("", "model-rest.safetensors"))
    for prefix, fname in groups:
        tensors = {}
        for name, t in model.state_dict().items():
            inside = name.startswith(prefix) if prefix else not name.startswith("model.layers.")
            if not inside:
                continue
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(t.shape)
            else:  # the init transformers uses for Llama: normal(0, initializer_range)
                tensors[name] = torch.randn(t.shape, generator=g) * config.initializer_range
            total += tensors[name].numel() * 4
        save_file(tensors, a.out / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
    (a.out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(a.out)
    tok.save_pretrained(a.out)
    n = sum(t.numel() for t in model.state_dict().values())
    print(f"wrote {a.out}: {n / 1e9:.3f}B parameters, {total / 2**30:.2f} GiB fp32")


if __name__ == "__main__":
    main()
