"""One-shot GPU validation of the verify op: correctness at production shapes, CUDA graphs,
torch.compile, and timing (CUDA-graph replays over rotated inputs, so L2 holds none of them).

    python benchmarks/gpu_check.py --out DIR            # on a CUDA machine (an H100/H200 lease)
    python benchmarks/gpu_check.py --out DIR --dry-run  # CPU, tiny shapes, Triton interpreter

Every result is appended to ``DIR/gpu_check.csv`` (and printed) the moment it exists, so a run cut
short by its time limit still leaves what it measured. Each part catches its own failure, logs it
and goes on; the exit status is 1 if any part failed.

Parts:
  correct    Triton tokens == ``backend="reference"`` (float64 PyTorch) on the same device, for
             B 1/8/64/256, K 4, V 151936, fp32/bf16, with and without draft probs, one top-p case
  chi2       B=4096 rows of one (p, q) pair with independent seeds: the first emitted token's
             counts against p (chi-square, scipy if present)
  big        a call over more than 2^31 logits: the last rows checked against the reference
  graph      capture verify in a CUDA graph with seed/offset as device tensors; replays with a
             new offset equal eager calls with that offset (no frozen noise)
  compile    torch.compile(fullgraph=True) of a function that calls specdec.verify
  time       per call, CUDA-graph replays rotating over enough input sets to exceed L2: Triton
             vs an eager PyTorch fp32 rejection sampler, and the HBM floor (bytes / copy GB/s)
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
import traceback

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

FIELDS = ["part", "case", "B", "K", "V", "dtype", "probs", "provider", "value", "unit", "ok", "note"]


class Log:
    def __init__(self, out_dir):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "gpu_check.csv")
        new = not os.path.exists(self.path)
        self.f = open(self.path, "a", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=FIELDS)
        if new:
            self.w.writeheader()
        self.failed = []

    def row(self, **kw):
        r = {k: kw.get(k, "") for k in FIELDS}
        self.w.writerow(r)
        self.f.flush()
        print("  " + " ".join(f"{k}={v}" for k, v in r.items() if v != ""), flush=True)


def make_inputs(B, K, V, dtype, dev, seed, with_probs=True, temperature=1.0):
    """Target logits near the draft's, so chains run to varied lengths."""
    g = torch.Generator(device=dev).manual_seed(seed)
    draft_logits = torch.randn(B, K, V, device=dev, generator=g) * 3
    target = torch.empty(B, K + 1, V, device=dev)
    target[:, :K] = draft_logits + torch.randn(B, K, V, device=dev, generator=g) * 0.7
    target[:, K] = torch.randn(B, V, device=dev, generator=g) * 3
    q = torch.softmax(draft_logits / temperature, -1)
    ids = torch.multinomial(q.view(-1, V), 1, generator=g).view(B, K)
    return target.to(dtype), ids, (q if with_probs else None)


def part_correct(log, dev, shapes, V, K=4):
    import specdec

    for B in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            for with_probs in (True, False):
                logits, ids, q = make_inputs(B, K, V, dtype, dev, seed=B * 7 + with_probs, with_probs=with_probs)
                seeds = torch.arange(B, device=dev, dtype=torch.int64) * 7919 + 11
                outs = {}
                for be in ("triton", "reference"):
                    outs[be] = specdec.verify(logits, ids, q, temperature=1.0, seed=seeds, offset=3, backend=be)
                eq = bool(torch.equal(outs["triton"][0], outs["reference"][0])
                          and torch.equal(outs["triton"][1], outs["reference"][1]))
                mism = int((outs["triton"][0] != outs["reference"][0]).any(1).sum())
                log.row(part="correct", case="sampled", B=B, K=K, V=V, dtype=str(dtype)[6:],
                        probs=with_probs, provider="triton", value=mism, unit="rows differing",
                        ok=eq, note=f"mean accepted {outs['triton'][1].float().mean().item():.2f}")
                if not eq:
                    log.failed.append(f"correct B={B} {dtype} probs={with_probs}")
    # greedy + mixed rows and a top-p / top-k case
    B = shapes[min(1, len(shapes) - 1)]
    logits, ids, q = make_inputs(B, K, V, torch.float32, dev, seed=99)
    temps = torch.linspace(0, 1.2, B, device=dev)
    for case, kw in (("mixed_greedy", dict(temperature=temps)),
                     ("top_p0.9_top_k50", dict(temperature=0.8, top_p=0.9, top_k=50))):
        seeds = torch.arange(B, device=dev, dtype=torch.int64) + 5
        a = specdec.verify(logits, ids, q, seed=seeds, offset=0, backend="triton", **kw)
        b = specdec.verify(logits, ids, q, seed=seeds, offset=0, backend="reference", **kw)
        eq = bool(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]))
        log.row(part="correct", case=case, B=B, K=K, V=V, dtype="float32", probs=True, provider="triton",
                value=int((a[0] != b[0]).any(1).sum()), unit="rows differing", ok=eq)
        if not eq:
            log.failed.append(f"correct {case}")


def part_chi2(log, dev, n_rows, V):
    import specdec

    K = 2
    logits, ids, q = make_inputs(1, K, V, torch.float32, dev, seed=5)
    logits = logits.expand(n_rows, -1, -1).contiguous()
    q = q.expand(n_rows, -1, -1).contiguous()
    ids = ids.expand(n_rows, -1).contiguous()  # the same drafts on every row: tests the residual too
    seeds = torch.arange(n_rows, device=dev, dtype=torch.int64) * 2654435761 + 17
    out, n_acc = specdec.verify(logits, ids, q, temperature=1.0, seed=seeds, offset=0, backend="triton")
    first = out[:, 0].cpu()
    p0 = torch.softmax(logits[0, 0].double(), -1).cpu()
    try:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
        from stats import chi2_pvalue  # scipy

        pv = chi2_pvalue(first, p0)
    except ImportError as exc:
        pv, note = float("nan"), f"no scipy: {exc}"
    else:
        note = f"accepted at position 0: {(n_acc > 0).float().mean().item():.3f}"
    ok = not (pv < 1e-3)
    log.row(part="chi2", case="first token vs p0", B=n_rows, K=K, V=V, dtype="float32", probs=True,
            provider="triton", value=f"{pv:.4g}", unit="p-value", ok=ok, note=note)
    if not ok:
        log.failed.append("chi2")


def part_big(log, dev, B, K, V):
    import specdec

    g = torch.Generator(device=dev).manual_seed(0)
    logits = torch.randn(B, K + 1, V, device=dev, dtype=torch.bfloat16, generator=g)
    ids = torch.randint(0, V, (B, K), device=dev, generator=g)
    seeds = torch.arange(B, device=dev, dtype=torch.int64) + 1
    out, n = specdec.verify(logits, ids, None, temperature=1.0, seed=seeds, offset=0, backend="triton")
    tail = slice(B - 4, B)  # rows whose logits start past 2^31 elements
    ro, rn = specdec.verify(logits[tail], ids[tail], None, temperature=1.0, seed=seeds[tail], offset=0,
                            backend="reference")
    ok = bool(torch.equal(out[tail], ro) and torch.equal(n[tail], rn) and bool((out[:, 0] >= 0).all()))
    log.row(part="big", case=f"{logits.numel() / 2**31:.2f} x 2^31 elements", B=B, K=K, V=V, dtype="bfloat16",
            probs=False, provider="triton", value=int(logits.numel()), unit="elements", ok=ok)
    if not ok:
        log.failed.append("big")


def part_graph(log, dev, B, K, V):
    import specdec

    logits, ids, q = make_inputs(B, K, V, torch.float32, dev, seed=1)
    seeds = torch.arange(B, device=dev, dtype=torch.int64) + 100
    offset = torch.zeros(B, device=dev, dtype=torch.int64)
    fn = lambda: specdec.verify(logits, ids, q, temperature=0.9, top_p=0.95, seed=seeds, offset=offset)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn()
    ok = True
    for off in (1, 2, 3):
        offset.fill_(off)
        graph.replay()
        eager = fn()
        ok &= bool(torch.equal(static_out[0], eager[0]) and torch.equal(static_out[1], eager[1]))
    offset.fill_(1)
    graph.replay()
    a = static_out[0].clone()
    offset.fill_(2)
    graph.replay()
    differs = not torch.equal(a, static_out[0])
    log.row(part="graph", case="replay == eager at new offsets", B=B, K=K, V=V, dtype="float32", probs=True,
            provider="triton", value=int(differs), unit="noise changes with offset", ok=ok and differs)
    if not (ok and differs):
        log.failed.append("graph")


def part_compile(log, dev, B, K, V):
    import specdec

    logits, ids, q = make_inputs(B, K, V, torch.float32, dev, seed=2)
    seeds = torch.arange(B, device=dev, dtype=torch.int64)
    offset = torch.zeros(B, device=dev, dtype=torch.int64)

    def step(logits, ids, q, seeds, offset):
        out, n = specdec.verify(logits, ids, q, temperature=0.7, seed=seeds, offset=offset)
        return out, n

    compiled = torch.compile(step, fullgraph=True)
    a = compiled(logits, ids, q, seeds, offset)
    b = step(logits, ids, q, seeds, offset)
    ok = bool(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]))
    log.row(part="compile", case="fullgraph=True", B=B, K=K, V=V, dtype="float32", probs=True,
            provider="triton", value=int(ok), unit="equal to eager", ok=ok)
    if not ok:
        log.failed.append("compile")


def _graph_time_ms(fns, rounds=20):
    """Median over rounds of the mean time of one replay, rotating over ``fns`` (callables that
    each run one captured graph over their own input set)."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for f in fns:
            f()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / len(fns))
    times.sort()
    return times[len(times) // 2], times[len(times) // 5], times[(4 * len(times)) // 5]


def _capture(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def part_time(log, dev, shapes, V, K=4, l2_bytes=60e6):
    import specdec
    from benchmarks.bench_verify import torch_fp32_verify
    from benchmarks.harness import copy_bandwidth

    bw = copy_bandwidth(dev)
    log.row(part="time", case="copy bandwidth (read+write)", provider="torch copy_", value=f"{bw:.1f}", unit="GB/s")
    for B in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            for with_probs in (True, False):
                esz = torch.tensor([], dtype=dtype).element_size()
                nbytes = B * (K + 1) * V * esz + (B * K * V * 4 if with_probs else 0) + B * K * 8
                n_sets = max(2, min(16, math.ceil(3 * l2_bytes / nbytes)))
                sets = [make_inputs(B, K, V, dtype, dev, seed=i, with_probs=with_probs) for i in range(n_sets)]
                seeds = torch.arange(B, device=dev, dtype=torch.int64)
                offset = torch.zeros(B, device=dev, dtype=torch.int64)
                floor_us = nbytes / (bw * 1e9) * 1e6
                case = "sampled" if with_probs else "ngram"
                for provider in ("triton", "torch_fp32"):
                    try:
                        if provider == "triton":
                            fns = [_capture(lambda s=s: specdec.verify(s[0], s[1], s[2], temperature=1.0, seed=seeds,
                                                                       offset=offset)) for s in sets]
                        else:
                            fns = [lambda s=s: torch_fp32_verify(s[0], s[1], s[2], 1.0) for s in sets]
                        med, p20, p80 = _graph_time_ms(fns)
                        us = med * 1e3
                        log.row(part="time", case=case, B=B, K=K, V=V, dtype=str(dtype)[6:], probs=with_probs,
                                provider=provider + (" (graph)" if provider == "triton" else " (eager)"),
                                value=f"{us:.1f}", unit="us/call",
                                note=f"p20 {p20 * 1e3:.1f} p80 {p80 * 1e3:.1f}; {nbytes / (us * 1e-6) / 1e9:.0f} GB/s; "
                                     f"HBM floor {floor_us:.1f} us ({floor_us / us:.0%} of floor speed); "
                                     f"{n_sets} input sets")
                    except Exception as exc:  # noqa: BLE001
                        log.row(part="time", case=case, B=B, provider=provider, ok=False,
                                note=f"{type(exc).__name__}: {exc}"[:300])
                        log.failed.append(f"time {provider} B={B}")
                del sets
                torch.cuda.empty_cache()


def part_profile(log, dev, B, K, V):
    """Per-kernel device time of one verify call (torch.profiler)."""
    import specdec
    from torch.profiler import ProfilerActivity, profile

    logits, ids, q = make_inputs(B, K, V, torch.bfloat16, dev, seed=3)
    seeds = torch.arange(B, device=dev, dtype=torch.int64)
    for _ in range(3):
        specdec.verify(logits, ids, q, seed=seeds, offset=0)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            specdec.verify(logits, ids, q, seed=seeds, offset=0)
        torch.cuda.synchronize()
    for e in prof.key_averages():
        t = getattr(e, "device_time", None) or getattr(e, "cuda_time", 0)
        if t > 0:
            log.row(part="profile", case=e.key[:60], B=B, K=K, V=V, dtype="bfloat16", probs=True,
                    provider="triton", value=f"{t:.1f}", unit="us/call (device)", note=f"calls {e.count}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/gpu")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter")
    ap.add_argument("--parts", default="correct,chi2,big,graph,compile,profile,time")
    args = ap.parse_args()
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    log = Log(args.out)
    dev = torch.device("cpu" if args.dry_run else "cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run", file=sys.stderr)
        return 2
    import specdec

    print("backends:", specdec.backends(), flush=True)
    if args.dry_run:
        plan = dict(correct=lambda: part_correct(log, dev, [1, 3], 300, K=2),
                    chi2=lambda: part_chi2(log, dev, 64, 40))
    else:
        V = 151936
        plan = dict(correct=lambda: part_correct(log, dev, [1, 8, 64, 256], V),
                    chi2=lambda: part_chi2(log, dev, 4096, V),
                    big=lambda: part_big(log, dev, 2900, 4, V),
                    graph=lambda: part_graph(log, dev, 8, 4, V),
                    compile=lambda: part_compile(log, dev, 8, 4, V),
                    profile=lambda: part_profile(log, dev, 8, 4, V),
                    time=lambda: part_time(log, dev, [1, 8, 64, 256], V))
    for name in args.parts.split(","):
        if name not in plan:
            continue
        t0 = time.perf_counter()
        print(f"=== {name}", flush=True)
        try:
            plan[name]()
        except Exception as exc:  # noqa: BLE001  one part's failure must not hide the others
            traceback.print_exc()
            log.row(part=name, ok=False, note=f"{type(exc).__name__}: {exc}"[:300])
            log.failed.append(name)
        print(f"--- {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print("FAILED:", log.failed if log.failed else "none")
    return 1 if log.failed else 0


if __name__ == "__main__":
    sys.exit(main())
