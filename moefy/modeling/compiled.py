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
