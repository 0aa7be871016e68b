"""The link to the compiled CPU kernels (moefy.kernels) when moefy is installed; without them (a saved
folder loaded by plain transformers) the torch paths give the same results up to rounding."""


KERNEL_FUSED_MAX_TOKENS = 16

SKETCH_GEMM_MIN_TOKENS = 32

_KERNELS: object = False

def _kernels():
    global _KERNELS
    if _KERNELS is False:
        try:
            from moefy.kernels import load
        except ImportError:
            _KERNELS = None
        else:
            _KERNELS = load()
    return _KERNELS

# Tokens per call from which a converted model's layers take the dense FFN (MoEFFN._dense_prompt):
# one GEMM over all neurons beats the sparse paths from 4 tokens on, measured on SmolLM2-135M's 30
# FFNs with the balanced preset (benchmarks/prefill_crossover.py, 1 thread, AVX512: sparse 0.81x
# dense time at 1 token, 0.77x at 2, 1.50x at 4, 2.5x at 128). Saved in each layer's spec.
DENSE_PROMPT_FROM = 4
