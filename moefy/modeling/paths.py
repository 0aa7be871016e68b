"""The execution paths of an MoE layer: the compiled kernels' (few tokens fused, many tokens with
torch's GEMM for the dense products) and the torch fallbacks (one gathered product per token,
experts grouped over tokens, a masked GEMM with gradients). Each computes only the selected
experts, except _masked, which exists for gradients and for many one-neuron experts (see there).

# T tokens, D hidden, E routed experts, n neurons per expert, K selected experts per token
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .activations import ACTIVATIONS
from .compiled import KERNEL_FUSED_MAX_TOKENS, SKETCH_GEMM_MIN_TOKENS, _kernels
from .router_sketch import SketchRouter, kept_channels
from .selection import _flat, select_experts


class ExpertPaths:
    """How MoEFFN computes its selected experts (a mixin: it reads the layer's weights and router)."""

    def _sparse(self, x):
        T = x.shape[0]
        if self._learning():
            return self._masked(x)
        kern = _kernels()
        if kern is not None and x.dtype == torch.float32 and x.device.type == "cpu" and not (
                torch.is_grad_enabled() and x.requires_grad):
            args = self._kernel_args(kern)
            if args is not None:
                if (not self._quant and not self._sketch_reuse and (self._approx_on() or self.thresholded)
                        and not self._fused_pruned(T)):
                    return self._sparse_approx(x.contiguous(), kern, args)
                return self._sparse_kernel(kern, args, x.contiguous())
        if T >= SKETCH_GEMM_MIN_TOKENS and isinstance(self.router, SketchRouter) and not self.oracle \
                and self.router_input == "own":
            return self._masked(x)
        if self._approx_on() or self.thresholded:
            return self._sparse_approx(x)
        scores = self._scores(x)  # [T, E]
        if T == 1 and self.tau is None:
            # Decode: indices straight from top-k (no mask, no host sync), one gathered product.
            k = self.top_k
            y = self._experts_gather(x, scores[0].topk(k).indices)
        else:
            mask = select_experts(scores, self.top_k, self.tau)
            k = int(mask.sum())
            y = self._experts_gather(x, mask[0].nonzero().squeeze(1)) if T == 1 else self._experts_grouped(x, mask)
        self.tokens_seen += T
        self.experts_selected += k
        return y if self.shared_in is None else y + self._shared(x)

    def _fused_sketch(self, T: int) -> bool:
        """Whether the fused sketch kernel (kern.sketch_moe) can take T tokens: few of them,
        one-neuron experts, a fixed top-k or thresholds; a sketch of fp32 rows (not the quantised router)."""
        return self.tau is None and T <= KERNEL_FUSED_MAX_TOKENS and self.spec["expert_size"] == 1 and not self._quant

    def _fused_pruned(self, T: int) -> bool:
        """Whether the fused kernel takes this call for a pruned sketch (SketchRouter.sparsity), on
        the layer's own input. It computes the selected neurons from every channel (a pruned sketch's
        reuse is counted, not executed: SketchRouter), as the torch paths do."""
        return (getattr(self.router, "sparsity", 0) > 0 and self._fused_sketch(T) and not self.oracle
                and self.router_input == "own")

    def _kernel_args(self, kern):
        """The kernels' view of this layer's weights, rebuilt whenever a weight tensor changed."""
        cached = self.__dict__.get("_kargs")
        if cached is None or cached.key != kern.weights_key(self):
            cached = kern.prepare(self)
            self.__dict__["_kargs"] = cached
        return cached

    def _sparse_kernel(self, kern, args, x):
        """The compiled path (moefy.kernels) for the routed experts. Few tokens: router, top-k,
        experts and shared neurons in one call. Many tokens: the router's and the shared
        neurons' dense products go to torch's GEMM, which is faster there."""
        T = x.shape[0]
        self.tokens_seen += T
        few = T <= KERNEL_FUSED_MAX_TOKENS
        if (self._sketch_reuse or self._quant or self._fused_pruned(T)) and not self.oracle and self.router_input == "own":
            return self._sketch_kernel(kern, args, x)
        if self.tau is None:
            self.experts_selected += T * self.top_k
            if few and self._fused_router and not self.oracle:
                return kern.mlp_moe(args, x, self.top_k)
            y = kern.experts(args, x, kern.topk(self._rank_scores(x), self.top_k), shared=few)
        else:
            experts, offsets = _flat(select_experts(self._scores(x), self.top_k, self.tau))
            self.experts_selected += len(experts)
            y = kern.experts(args, x, experts, offsets, shared=few)
        return y if few or self.shared_in is None else y + self._shared(x)

    def _sketch_kernel(self, kern, args, x):
        """The compiled path of a sketch router with reuse: the selected neurons complete the
        sketch's partial sums over the channels it did not read; sketched experts (approx_k) join
        their down projection. A pruned sketch takes its fused branch too (_fused_pruned), with
        the selected neurons computed from every channel."""
        if self._quant and self.tau is None and x.shape[0] <= KERNEL_FUSED_MAX_TOKENS and self.spec["expert_size"] == 1:
            y, exact, sketched = self._quant_step(kern, args)(x)
            self.experts_selected += exact
            self.sketched_selected += sketched
            return y if self.shared_in is None else y + self._shared(x)
        kb = self.approx_k if self._approx_on() else 0
        thresholds = self.thresholds() if self.thresholded else None
        if self._fused_sketch(x.shape[0]):
            t_in, t_up, norms = self.router.weights_view()
            y, exact, sketched = kern.sketch_moe(args, x, self.top_k, self.router.kept, t_in, t_up, norms,
                                                 sketched=kb, thresholds=thresholds, reuse=self._sketch_reuse)
            self.experts_selected += exact
            self.sketched_selected += sketched
            return y
        scores, h, (kept, gp, upp) = self.router.norms(x, self.router.kept, partials=True, hidden=True)
        if thresholds is None and self.tau is None:
            exact, sketched = self._tiers(scores, kern) if kb else (kern.topk(scores, self.top_k), None)
            self.experts_selected += x.shape[0] * self.top_k
            self.sketched_selected += x.shape[0] * kb
            y = kern.sketch_experts(args, x, kept, gp, upp, exact.contiguous(), sketched=sketched, hidden=h)
        else:  # a number of experts per token of its own: score thresholds or dynamic-k
            exact, sketched = (self._threshold_masks(scores) if thresholds is not None else
                               (select_experts(scores, self.top_k, self.tau), None))
            experts, offsets = _flat(exact)
            self.experts_selected += len(experts)
            extra = {}
            if sketched is not None:
                ids, offs = _flat(sketched)
                self.sketched_selected += len(ids)
                extra = dict(sketched=ids, sketched_offsets=offs, hidden=h)
            y = kern.sketch_experts(args, x, kept, gp, upp, experts, offsets, **extra)
        return y if self.shared_in is None else y + self._shared(x)

    def _masked(self, x):
        """Every routed neuron computed, the unselected experts zeroed: one GEMM per matrix, the
        same function as the sparse paths. It saves no FLOPs. Two callers: recovery tuning
        (moefy.tuning.distill; the expert weights require grad), where one GEMM carries the gradients of
        all selected experts; and a sketch router's layer at many tokens on the torch paths (see
        SKETCH_GEMM_MIN_TOKENS), where it replaces a loop over thousands of one-neuron experts.
        The counts are the selection's, so the FLOP share reported is what the sparse paths cost."""
        y = self.selected_hidden(x).flatten(1) @ self.w_out.flatten(0, 1)
        return y if self.shared_in is None else y + self._shared(x)

    def selected_hidden(self, x, full=None):
        """The routed neurons' activations as this layer's output uses them, [T, E, n]: exact for
        the selected experts, the sketch's estimate for the sketched ones, 0 for the others (the
        output is this times the down rows, plus the shared neurons'). Counts the selection.
        `full`: hidden_all(x), when the caller has it already."""
        E, n, D = self.w_in.shape
        sketch = isinstance(self.router, SketchRouter) and not self.oracle and self.router_input == "own"
        sketched = None
        if sketch:  # the sketch once, with gradients: it ranks the experts and gives the sketched ones
            hs = self.router.hidden_from(x, kept_channels(x.detach(), self.router.kept))[0].view(-1, E, n)
        with torch.no_grad():
            if not sketch:
                mask = self.route(x)  # [T, E]
            elif self.thresholded:
                mask, sketched = self._threshold_masks(self.router.scores_from_hidden(hs.detach()))
            elif self._approx_on():
                exact, second = self._tiers(self.router.scores_from_hidden(hs.detach()))
                mask = torch.zeros(x.shape[0], E, dtype=torch.bool, device=x.device).scatter_(1, exact, True)
                sketched = torch.zeros_like(mask).scatter_(1, second, True)
            else:
                mask = select_experts(self.router.scores_from_hidden(hs.detach()), self.top_k, self.tau)
        self.tokens_seen += x.shape[0]
        self.experts_selected += int(mask.sum())
        h = (self.hidden_all(x) if full is None else full).view(-1, E, n) * mask.unsqueeze(-1).to(x.dtype)
        if sketched is not None:
            self.sketched_selected += int(sketched.sum())
            h = h + hs * sketched.unsqueeze(-1).to(x.dtype)
        return h

    def _hidden(self, x, w_in, w_up, b_in):
        h = ACTIVATIONS[self.act](F.linear(x, w_in, b_in))
        return h * F.linear(x, w_up) if w_up is not None else h

    def _shared(self, x):
        return self._hidden(x, self.shared_in, self.shared_up, self.shared_b_in) @ self.shared_out

    def hidden_all(self, x):
        """The hidden activations of every routed neuron, expert-major, [T, E*n] (no copies)."""
        E, n, D = self.w_in.shape
        flat = lambda w: None if w is None else w.reshape(E * n, *w.shape[2:])  # noqa: E731
        return self._hidden(x, flat(self.w_in), flat(self.w_up), flat(self.b_in))

    def _dense(self, x):
        """Every expert: the dense FFN computed from the expert-major weights, without copies."""
        y = self.hidden_all(x) @ self.w_out.flatten(0, 1)
        return y if self.shared_in is None else y + self._shared(x)

    def _experts_gather(self, x, idx):
        """One token: gather the selected experts' rows into one product (decode path)."""
        take = lambda w: None if w is None else w.index_select(0, idx).flatten(0, 1)  # noqa: E731
        h = self._hidden(x, take(self.w_in), take(self.w_up), take(self.b_in))  # [1, K*n]
        return h @ take(self.w_out)

    def _experts_grouped(self, x, mask):
        """Many tokens: sort (token, expert) pairs by expert, one product per active expert."""
        tok, exp = mask.nonzero(as_tuple=True)  # pairs, sorted by token
        order = exp.argsort(stable=True)
        tok = tok[order]
        counts = torch.bincount(exp, minlength=mask.shape[1]).tolist()
        y = x.new_zeros(x.shape)
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            t = tok[start:start + count]
            start += count
            b = None if self.b_in is None else self.b_in[e]
            up = None if self.w_up is None else self.w_up[e]
            h = self._hidden(x.index_select(0, t), self.w_in[e], up, b)  # [c, n]
            y.index_add_(0, t, h @ self.w_out[e])
        return y

    def _quant_step(self, kern, args):
        """The quantised router's fused layer call with its arguments bound (kern.q4_moe), remade
        when what it binds changes: the weights (args), the selection, the router's settings and
        quantiles, the down rows in place (their norms), the thread count."""
        r = self.router
        q = r._buffers.get("quantiles")
        key = (args, self.top_k, self.oracle, self.router_input, r.approx, r.threshold,
               None if q is None else (q.data_ptr(), q._version), self._parameters["w_out"]._version,
               torch.get_num_threads())
        hit = self.__dict__.get("_quant_bound")
        if hit is None or hit[0] != key:
            kb = self.approx_k if self._approx_on() else 0
            thresholds = self.thresholds() if self.thresholded else None
            hit = (key, kern.q4_moe(args, r, self.top_k, kb, r.weights_view()[2], thresholds))
            self.__dict__["_quant_bound"] = hit
        return hit[1]

    def _approx_on(self) -> bool:
        """Whether this forward adds sketched experts (see approx_k)."""
        return self.approx_k > 0 and not self.oracle and self.router_input == "own"

    def _tiers(self, scores: torch.Tensor, kern=None):
        """(exact [T, k], sketched [T, approx_k]) expert ids: the top_k best scores, then the next."""
        k, kb = self.top_k, self.approx_k
        if kern is None:
            top = scores.topk(k + kb, dim=-1).indices  # sorted
            return top[:, :k], top[:, k:]
        top = kern.topk(scores, k + kb)  # unordered
        first = scores.gather(1, top).topk(k, dim=-1).indices
        pick = torch.zeros_like(top, dtype=torch.bool).scatter_(1, first, True)
        return top.gather(1, first), top[~pick].view(-1, kb)

    def _sketched(self, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The sketched experts' output [T, D]: activations h [T, E, n] of experts idx [T, kb]
        through their down rows (one gathered product for one token; a masked GEMM for many)."""
        if h.shape[0] == 1:
            return h[0].index_select(0, idx[0]).reshape(1, -1) @ self.w_out.index_select(0, idx[0]).flatten(0, 1)
        at = idx.unsqueeze(-1).expand(-1, -1, h.shape[2])
        z = torch.zeros_like(h).scatter(1, at, h.gather(1, at))
        return z.flatten(1) @ self.w_out.flatten(0, 1)

    def _sparse_approx(self, x: torch.Tensor, kern=None, args=None) -> torch.Tensor:
        """Inference with sketched experts or score thresholds, without completing the sketch's
        sums (an unpruned sketch with reuse goes to the kernels, _sketch_kernel): the top_k exact experts (on the
        kernels when given) plus the next approx_k sketched ones, or those the thresholds pick."""
        T = x.shape[0]
        self.tokens_seen += T
        scores, h = self.router.norms(x, self.router.kept, hidden=True)
        shared_done = kern is not None and T <= KERNEL_FUSED_MAX_TOKENS
        if self.thresholded:
            mask, approx = self._threshold_masks(scores)
            self.experts_selected += int(mask.sum())
            if kern is not None:
                y = kern.experts(args, x, *_flat(mask), shared=shared_done)
            elif T == 1:
                y = self._experts_gather(x, mask[0].nonzero().squeeze(1))
            else:
                y = self._experts_grouped(x, mask)
            if approx is not None:
                self.sketched_selected += int(approx.sum())
                y = y + self._sketched_masked(h, approx)
            return y if shared_done or self.shared_in is None else y + self._shared(x)
        self.experts_selected += T * self.top_k
        self.sketched_selected += T * self.approx_k
        exact, approx = self._tiers(scores, kern)
        if kern is not None:
            y = kern.experts(args, x, exact, shared=shared_done)
        elif T == 1:
            y = self._experts_gather(x, exact[0])
        else:
            y = self._experts_grouped(x, torch.zeros_like(scores, dtype=torch.bool).scatter_(1, exact, True))
        y = y + self._sketched(h, approx)
        return y if shared_done or self.shared_in is None else y + self._shared(x)

    def _sketched_masked(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The sketched experts' output [T, D] for a mask [T, E] of them (as _sketched)."""
        if h.shape[0] == 1:
            return self._sketched(h, mask[0].nonzero().T)
        return (h * mask.unsqueeze(-1).to(h.dtype)).flatten(1) @ self.w_out.flatten(0, 1)
