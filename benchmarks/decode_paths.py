"""Batch-1 FFN execution paths on 30 SmolLM2-shaped layers: dense vs gathering the selected experts (1 thread).

    python benchmarks/decode_paths.py
"""
import statistics, time, torch, torch.nn.functional as F
torch.set_num_threads(1)
D, I, L = 576, 1536, 30
def run(E, share):
    n = I // E; K = int(share * E)
    g = torch.Generator().manual_seed(0)
    W = [dict(gate=torch.randn(I, D, generator=g) / 24, up=torch.randn(I, D, generator=g) / 24,
              down=torch.randn(D, I, generator=g) / 40) for _ in range(L)]
    for w in W:
        w["gate_e"] = w["gate"].view(E, n, D).clone(); w["up_e"] = w["up"].view(E, n, D).clone()
        w["down_e"] = w["down"].T.contiguous().view(E, n, D)
        w["down_rows"] = w["down_e"].view(I, D)
    x = torch.randn(1, D)
    idx = [torch.randperm(E, generator=g)[:K].sort().values for _ in range(L)]
    rows = [(i[:, None] * n + torch.arange(n)).flatten() for i in idx]
    def dense():
        for w in W:
            F.linear(F.silu(F.linear(x, w["gate"])) * F.linear(x, w["up"]), w["down"])
    def gather():
        for w, i in zip(W, idx):
            t = lambda a: a.index_select(0, i).flatten(0, 1)
            (F.silu(F.linear(x, t(w["gate_e"]))) * F.linear(x, t(w["up_e"]))) @ t(w["down_e"])
    def gather_bag():
        for w, i, r in zip(W, idx, rows):
            t = lambda a: a.index_select(0, i).flatten(0, 1)
            h = F.silu(F.linear(x, t(w["gate_e"]))) * F.linear(x, t(w["up_e"]))
            F.embedding_bag(r[None], w["down_rows"], per_sample_weights=h, mode="sum")
    fns = dict(dense=dense, gather=gather, gather_bag=gather_bag)
    for f in fns.values():
        for _ in range(5): f()
    times = {k: [] for k in fns}
    for _ in range(3):
        for k, f in fns.items():
            for _ in range(20):
                s = time.perf_counter(); f(); times[k].append(time.perf_counter() - s)
    d = statistics.median(times["dense"])
    print(f"E={E} share={share}: dense {d*1e3:.2f} ms", " ".join(f"{k} {statistics.median(v)/d:.2f}x" for k, v in times.items() if k != "dense"), flush=True)
for E in (96, 384):
    for share in (0.5, 0.25):
        run(E, share)
