"""The link to the compiled CPU kernels (moefy.kernels) when moefy is installed; without them (a saved
folder loaded by plain transformers) the torch paths give the same results up to rounding. The
constants are the measured crossovers the execution paths (paths.py, MoEFFN.forward) choose by."""

# Tokens per call up to which the kernels also run the router and the shared neurons; above it
# torch's GEMM is faster for those dense products. The routed experts always go to the kernels:
# they beat the torch paths at every size measured (benchmarks/kernel_paths.py, BENCHMARKS.md).
KERNEL_FUSED_MAX_TOKENS = 16

# Tokens per call from which a sketch router's layer, on the torch paths (no kernels: no compiler,
# MOEFY_KERNELS=0, a GPU, weights other than fp32, a folder loaded by plain transformers, inputs
# that carry gradients), runs as GEMMs (MoEFFN._masked) instead of a loop over its experts: 2.1x
# the dense time at 64 tokens against 12x for one-neuron experts (benchmarks/kernel_paths.py,
# BENCHMARKS.md). The kernels never take it: they compute the selected neurons alone, at about
# the same speed.
SKETCH_GEMM_MIN_TOKENS = 32

# Tokens per call from which a converted model's layers take the dense FFN (MoEFFN._dense_prompt):
# one GEMM over all neurons beats the sparse paths from 4 tokens on, measured on SmolLM2-135M's 30
# FFNs with the sketch preset's model (benchmarks/prefill_crossover.py, 1 thread, AVX512: sparse
# 0.81x dense time at 1 token, 0.77x at 2, 1.50x at 4, 2.5x at 128). Saved in each layer's spec.
DENSE_PROMPT_FROM = 4

_KERNELS: object = False


def _kernels():
    """The compiled kernels (moefy.kernels.load), or None where they cannot be had."""
    global _KERNELS
    if _KERNELS is False:
        try:
            from moefy.kernels import load
        except ImportError:
            _KERNELS = None
        else:
            _KERNELS = load()
    return _KERNELS
