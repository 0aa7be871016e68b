"""CPU kernels for the MoE FFN's sparse paths (experts.cpp), built on first use.

The C++ source is compiled once per machine with the system compiler (g++ -O3 -march=native
-fopenmp) into a cache folder ($MOEFY_CACHE, default ~/.cache/moefy) keyed by the source, the
flags and the CPU, and called through ctypes on the tensors' memory; torch owns every buffer.
Without a compiler, or with MOEFY_KERNELS=0, `load()` returns None and MoEFFN uses its
torch-only paths (same results up to float rounding).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("experts.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
ACT_CODES = {"silu": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3}

_lib: Kernels | None | bool = False  # False: not tried yet


def load() -> "Kernels | None":
    """The compiled kernels, building them if needed; None when they cannot be had here."""
    global _lib
    if _lib is False:
        _lib = None
        if os.environ.get("MOEFY_KERNELS", "1") != "0":
            try:
                _lib = Kernels(ctypes.CDLL(str(_build())))
            except (OSError, subprocess.CalledProcessError, FileNotFoundError) as exc:
                warnings.warn(f"moefy: CPU kernels unavailable ({str(exc).splitlines()[0]}); "
                              "using the slower torch paths", RuntimeWarning, stacklevel=2)
    return _lib


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    import platform
    return platform.processor() + platform.machine()


def _build() -> Path:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise FileNotFoundError("no C++ compiler (g++) found")
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *FLAGS]).encode() + _cpu_id().encode())
    cache = Path(os.environ.get("MOEFY_CACHE", Path.home() / ".cache" / "moefy")) / "kernels"
    target = cache / f"moefy_kernels-{key.hexdigest()[:16]}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so")
        os.close(fd)
        try:
            subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True)
            os.replace(tmp, target)  # atomic: concurrent builders each install a complete file
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return target


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


class Kernels:
    def __init__(self, lib: ctypes.CDLL):
        i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        self._experts = lib.moefy_experts
        self._experts.argtypes = [i64, i64, i64, ptr, ptr, i64, ptr, ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr, ptr,
                                  c_int, ptr, c_int]
        self._experts.restype = None
        self._mlp_topk = lib.moefy_mlp_topk
        self._mlp_topk.argtypes = [i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, c_int]
        self._mlp_topk.restype = None
        self._mlp_moe = lib.moefy_mlp_moe
        self._mlp_moe.argtypes = [i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr, ptr, i64,
                                  ptr, ptr, ptr, ptr, c_int, ptr, c_int]
        self._mlp_moe.restype = None
        self._topk = lib.moefy_topk
        self._topk.argtypes = [i64, i64, i64, ptr, ptr, c_int]
        self._topk.restype = None
        self._sketch = lib.moefy_sketch
        self._sketch.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, c_int, ptr, ptr, ptr, c_int]
        self._sketch.restype = None
        self._sketch_experts = lib.moefy_sketch_experts
        self._sketch_experts.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, i64, ptr, ptr, ptr, ptr,
                                         ptr, c_int, ptr, c_int, i64, ptr, ptr, ptr]
        self._sketch_experts.restype = None
        self._sketch_moe = lib.moefy_sketch_moe
        self._sketch_moe.argtypes = [i64, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, ptr,
                                     ptr, ptr, ptr, c_int, ptr, c_int, ptr, ptr, c_int]
        self._sketch_moe.restype = None
        self._q4_hidden = lib.moefy_q4_hidden
        self._q4_hidden.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, c_int, ptr, c_int]
        self._q4_hidden.restype = None
        self._q4_moe = lib.moefy_q4_moe
        self._q4_moe.argtypes = [i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, c_int,
                                 ptr, ptr, c_int]
        self._q4_moe.restype = None
        self.weights_key = weights_key

    @staticmethod
    def prepare(layer) -> "LayerArgs | None":
        """The raw arguments for an MoEFFN's weights, or None when the kernels cannot run it
        (not fp32, not contiguous, not on the CPU)."""
        tensors = [p for p in layer.parameters()]
        if any(t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
            return None
        return LayerArgs(layer)

    def experts(self, args: "LayerArgs", x: torch.Tensor, experts: torch.Tensor,
                offsets: torch.Tensor | None = None, shared: bool = True) -> torch.Tensor:
        """The routed experts plus (unless shared=False) the shared neurons, for x [T, D]
        (contiguous fp32); b_out is not added. Token t uses experts[offsets[t]:offsets[t+1]]
        (flat), or without offsets the row experts[t] of a [T, K] tensor."""
        y = torch.empty_like(x)
        K = experts.shape[1] if offsets is None else 0
        tail = args.experts_tail if shared else args.experts_tail_routed
        self._experts(x.shape[0], *args.experts_head, x.data_ptr(), _ptr(offsets), K, experts.data_ptr(),
                      *tail, y.data_ptr(), torch.get_num_threads())
        return y

    def topk(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        """Indices [T, K] of each row's k largest scores (unordered); faster than torch.topk."""
        scores = scores.contiguous()
        idx = torch.empty(scores.shape[0], k, dtype=torch.int64)
        self._topk(scores.shape[0], scores.shape[1], k, scores.data_ptr(), idx.data_ptr(), torch.get_num_threads())
        return idx

    def sketch(self, x: torch.Tensor, idx: torch.Tensor, wt_in: torch.Tensor, wt_up: torch.Tensor | None,
               b_in: torch.Tensor | None, act: str, partials: bool = False):
        """The sketch router's activations [T, I] for x [T, D] from its kept channels idx [T, c]
        (int64), with the routed weights transposed to [D, I] (all contiguous fp32). With
        `partials`: (h, gate sums, up sums or None), the sums before bias and activation."""
        T, c = idx.shape
        I = wt_in.shape[1]
        h = torch.empty(T, I)
        gp = torch.empty(T, I) if partials else None
        upp = torch.empty(T, I) if partials and wt_up is not None else None
        self._sketch(T, x.shape[1], I, c, x.data_ptr(), idx.data_ptr(), wt_in.data_ptr(), _ptr(wt_up),
                     _ptr(b_in), ACT_CODES[act], h.data_ptr(), _ptr(gp), _ptr(upp), torch.get_num_threads())
        return (h, gp, upp) if partials else h

    def q4_hidden(self, x: torch.Tensor, q_in: torch.Tensor, s_in: torch.Tensor, q_up: torch.Tensor | None,
                  s_up: torch.Tensor | None, b_in: torch.Tensor | None, act: str) -> torch.Tensor:
        """Every routed neuron's estimated activation [T, I] for x [T, D] (contiguous fp32) from the
        4-bit copies q_* [I, D / 2] (uint8) with their group scales s_* [I, D / 32] (fp32)."""
        T, D = x.shape
        I = q_in.shape[0]
        h = torch.empty(T, I)
        self._q4_hidden(T, D, I, x.data_ptr(), q_in.data_ptr(), s_in.data_ptr(), _ptr(q_up), _ptr(s_up), _ptr(b_in),
                        ACT_CODES[act], h.data_ptr(), torch.get_num_threads())
        return h

    def q4_moe(self, args: "LayerArgs", router, k: int, sketched: int, norms: torch.Tensor,
               thresholds: tuple[float, float] | None = None):
        """The whole layer for a quantised router (`router`: its q_in, s_in, q_up, s_up) over
        one-neuron experts, bound once: a function of x [T, D] (contiguous fp32, few tokens) that
        runs estimate, scores (|h| x the down rows' `norms`), selection (top `k` exact and the next
        `sketched`, or by `thresholds`), the exact neurons and the sketched ones (no shared neurons,
        no b_out) in one call and returns (y, exact, sketched counts). A decode step calls it 30
        times per token: binding the arguments here saves ~0.1 ms of Python per call."""
        w_in, w_up, b_in, w_out = args.experts_tail[:4]
        thr = None if thresholds is None else torch.tensor(thresholds, dtype=torch.float32)
        counts = torch.zeros(2, dtype=torch.int64)
        weights = (router.q_in.shape[0], k, sketched)
        pointers = (router.q_in.data_ptr(), router.s_in.data_ptr(), _ptr(router.q_up), _ptr(router.s_up),
                    norms.data_ptr(), _ptr(thr), w_in, w_up, b_in, w_out, args.experts_tail[-1])
        call, threads = self._q4_moe, torch.get_num_threads()

        def step(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
            y = torch.empty_like(x)
            counts.zero_()
            call(x.shape[0], x.shape[1], *weights, x.data_ptr(), *pointers, y.data_ptr(), counts.data_ptr(), threads)
            exact, approx = counts.tolist()
            return y, exact, approx
        step.tensors = (router, norms, thr, args)  # what the pointers point into lives as long as the step
        return step

    def sketch_experts(self, args: "LayerArgs", x: torch.Tensor, kept: torch.Tensor, gp: torch.Tensor,
                       upp: torch.Tensor | None, experts: torch.Tensor,
                       offsets: torch.Tensor | None = None, sketched: torch.Tensor | None = None,
                       hidden: torch.Tensor | None = None,
                       sketched_offsets: torch.Tensor | None = None) -> torch.Tensor:
        """The routed experts for x [T, D], completing the sketch's partial sums (`kernels.sketch`
        with partials, on the same x and kept channels [T, c]): each selected neuron adds only the
        channels the sketch did not read. Experts as in `experts`; no shared neurons, no b_out.
        `sketched` [T, KB] (int64) adds those experts with their sketched activations `hidden`
        [T, E*n] through their down rows alone, in the same accumulation; with
        `sketched_offsets` [T + 1] it is flat, token t's being sketched[offsets[t]:offsets[t+1]]."""
        y = torch.empty_like(x)
        D, n = args.experts_head
        K = experts.shape[1] if offsets is None else 0
        if sketched is None:
            KB = 0
        else:
            KB = int(sketched.numel() > 0) if sketched_offsets is not None else sketched.shape[1]
        if KB:
            sketched, hidden = sketched.contiguous(), hidden.reshape(x.shape[0], -1).contiguous()
        w_in, w_up, b_in, w_out = args.experts_tail[:4]
        self._sketch_experts(x.shape[0], D, n, kept.shape[1], x.data_ptr(), kept.data_ptr(), gp.data_ptr(),
                             _ptr(upp), gp.shape[1], _ptr(offsets), K, experts.data_ptr(), w_in, w_up, b_in, w_out,
                             args.experts_tail[-1], y.data_ptr(), torch.get_num_threads(), KB,
                             _ptr(sketched if KB else None), _ptr(hidden if KB else None),
                             _ptr(sketched_offsets if KB else None))
        return y

    def sketch_moe(self, args: "LayerArgs", x: torch.Tensor, k: int, kept: int, wt_in: torch.Tensor,
                   wt_up: torch.Tensor | None, out_norms: torch.Tensor, sketched: int = 0,
                   thresholds: tuple[float, float] | None = None, reuse: bool = True) -> tuple[torch.Tensor, int, int]:
        """The whole layer for a sketch router over one-neuron experts, in one call: kept
        channels, sketch, scores, selection, completion, shared neurons (b_out not added). With
        `reuse` the selected neurons complete the sketch's sums; without (a pruned sketch, whose
        wt_in / wt_up are not the experts' weights) they are computed from every channel.
        Selection: a fixed top-k, with the `sketched` neurons ranked after the k adding their
        sketched activations through their down rows; or with `thresholds` (t_exact, t_sketched)
        the neurons scoring >= t_exact exactly and those in [t_sketched, t_exact) sketched.
        wt_in / wt_up: the routed weights transposed [D, I]. Returns (y, exact neurons, sketched
        neurons), the counts summed over the tokens."""
        y = torch.empty_like(x)
        w_in, w_up, b_in, w_out, S, s_in, s_up, s_b, s_out, act = args.experts_tail
        thr = None if thresholds is None else torch.tensor(thresholds, dtype=torch.float32)
        counts = torch.zeros(2, dtype=torch.int64)
        self._sketch_moe(x.shape[0], x.shape[1], wt_in.shape[1], kept, k, sketched, x.data_ptr(), wt_in.data_ptr(),
                         _ptr(wt_up), b_in, out_norms.data_ptr(), w_in, w_up, w_out, S, s_in, s_up, s_b, s_out, act,
                         y.data_ptr(), torch.get_num_threads(), _ptr(thr), counts.data_ptr(), int(reuse))
        return y, int(counts[0]), int(counts[1])

    def mlp_moe(self, args: "LayerArgs", x: torch.Tensor, k: int) -> torch.Tensor:
        """The whole layer with its MLP router and fixed top-k, in one call (b_out not added)."""
        y = torch.empty_like(x)
        self._mlp_moe(x.shape[0], *args.router, k, x.data_ptr(), *args.router_weights, args.experts_head[1],
                      *args.experts_tail, y.data_ptr(), torch.get_num_threads())
        return y

    def mlp_topk(self, args: "LayerArgs", x: torch.Tensor, k: int) -> torch.Tensor:
        """Top-k experts [T, K] of the layer's MLPRouter (gelu MLP) for x [T, D], unordered."""
        idx = torch.empty(x.shape[0], k, dtype=torch.int64)
        self._mlp_topk(x.shape[0], *args.router, k, x.data_ptr(), *args.router_weights, idx.data_ptr(),
                       torch.get_num_threads())
        return idx


class LayerArgs:
    """An MoEFFN's weight pointers, gathered once (attribute access costs microseconds per call).
    Holds references to the tensors, so the memory stays valid while the arguments live; `key`
    (the weights' data pointers) tells the layer when its weights were replaced."""

    def __init__(self, layer):
        self.tensors = list(layer.parameters())
        self.key = weights_key(layer)
        D, n = layer.w_in.shape[2], layer.w_in.shape[1]
        self.experts_head = (D, n)
        self.experts_tail = (_ptr(layer.w_in), _ptr(layer.w_up), _ptr(layer.b_in), _ptr(layer.w_out),
                             layer.spec["shared"], _ptr(layer.shared_in), _ptr(layer.shared_up),
                             _ptr(layer.shared_b_in), _ptr(layer.shared_out), ACT_CODES[layer.act])
        self.experts_tail_routed = (*self.experts_tail[:4], 0, None, None, None, None, self.experts_tail[-1])
        r = layer.router
        if hasattr(r, "fc1") and hasattr(r, "fc2"):
            self.router = (D, r.fc1.out_features, r.fc2.out_features)
            self.router_weights = (_ptr(r.fc1.weight), _ptr(r.fc1.bias), _ptr(r.fc2.weight), _ptr(r.fc2.bias))


def weights_key(layer) -> tuple:
    """Data pointers of a layer's own and its router's parameters, read without nn.Module's
    attribute lookup (a few microseconds for a whole layer)."""
    router = layer._modules["router"]
    return tuple(p.data_ptr() for m in (layer, router, *router._modules.values())
                 for p in m._parameters.values() if p is not None)
