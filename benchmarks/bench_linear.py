"""Benchmark of ``specdec.linear.narrow_linear`` against torch's ``F.linear`` (MKL sgemm on x86):
every linear layer of one target forward over M = B * q tokens, the work that decides what a
drafted token costs on a CPU.

Weights: random, with the shapes of a Llama-family model (default SmolLM2-135M: hidden 576,
intermediate 1536, 3 key/value heads of 64, 30 layers, vocabulary 49152 for the LM head; 0.54 GB of
float32, so every call streams the weights from memory as a real forward does). For each M the
providers alternate call by call, so a slow spell of a shared machine hits both:

  specdec   torch.ops.specdec_cpp.narrow_linear (the C++ kernel, no size cut-off)
  torch     torch.nn.functional.linear

Rows ``op=linears``: median ms over the layers of one forward; ``cost_ratio`` = time(M) / time of
torch at M = 1 (what the generator's cost model sees).

    python benchmarks/bench_linear.py --threads 1     # M = 1..48 (~2 min)
    python benchmarks/bench_linear.py --quick         # 2 layers, seconds
"""
from __future__ import annotations

import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import harness as H


def layer_shapes(hidden: int, intermediate: int, kv: int, layers: int, vocab: int) -> list:
    """[(N, K)] of a Llama forward's linears: q, k, v, o, gate, up, down per layer, then the LM head."""
    one = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),
           (intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]
    return one * layers + ([(vocab, hidden)] if vocab else [])


def main(argv=None) -> int:
    p = H.make_parser("bench_linear", "a forward's linear layers at M = B*q rows: narrow_linear vs F.linear")
    p.add_argument("--rows", default=None, help="comma list of M (default 1..12,16,20,24,32,48)")
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--kv", type=int, default=192, help="key/value width (heads x head_dim)")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--vocab", type=int, default=49152, help="LM head rows (0 = none)")
    args = p.parse_args(argv)
    device = H.apply_common(args)
    if device.type != "cpu":
        H.fail("narrow_linear is a CPU kernel: run with --device cpu")
    from specdec.linear import narrow_linear_available

    if not narrow_linear_available():
        H.fail("specdec._C is not built: narrow_linear is unavailable")
    if args.quick:
        args.layers, args.vocab = 2, 1000
    rows = [int(m) for m in args.rows.split(",")] if args.rows else \
        ([1, 4] if args.quick else list(range(1, 13)) + [16, 20, 24, 32, 48])
    runs = args.runs or (3 if args.quick else 15)
    shapes = layer_shapes(args.hidden, args.intermediate, args.kv, args.layers, args.vocab)
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, k, generator=g) / k ** 0.5 for n, k in shapes]
    nbytes = sum(w.numel() * 4 for w in weights)
    op = torch.ops.specdec_cpp.narrow_linear
    fns = {"specdec": lambda x, w: op(x, w, None), "torch": lambda x, w: F.linear(x, w)}

    env = H.env_info(device)
    path = H.csv_path(args, "narrow_linear")
    model = f"L={args.layers} d={args.hidden} ff={args.intermediate} kv={args.kv} V={args.vocab}"
    base = None
    with H.CsvWriter(path, env, extra_columns=["cost_ratio", "model"]) as csv:
        for M in H.progress(rows, desc="narrow_linear"):
            xs = {k: torch.randn(M, k, generator=g) for k in {k for _, k in shapes}}
            samples = {name: [] for name in fns}
            for _ in range(2):  # warm-up
                for fn in fns.values():
                    for w in weights:
                        fn(xs[w.shape[1]], w)
            for r in range(runs):
                for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):  # alternate the order
                    fn = fns[name]
                    t0 = time.perf_counter_ns()
                    for w in weights:
                        fn(xs[w.shape[1]], w)
                    samples[name].append((time.perf_counter_ns() - t0) * 1e-6)
            if M == rows[0] == 1:
                base = float(np.median(samples["torch"]))
            for name in fns:
                t = H.timing_from_samples(samples[name])
                csv.add(op="linears", provider=name, shape=H.shape_str(M=M), dtype="fp32", timing=t,
                        bytes=nbytes, model=model, cost_ratio=t.median_ms / base if base else None,
                        note="every linear of one forward; providers alternate call by call")
        out = csv.rows
    print(f"wrote {path}")
    for r in out:
        print(f"{r['provider']:>8} {r['shape']:>6}  median {float(r['median_ms']):8.2f} ms  "
              f"{float(r['gb_per_s']):6.1f} GB/s")
    if not args.no_plot:
        for r in out:
            r["M"] = r["shape"].split("=")[1]
        png = H.plot_lines(out, H.png_path(args, "narrow_linear"), x="M", value="median_ms",
                           title=f"linears of one forward ({model}), {env['device']}",
                           xlabel="rows M = batch x tokens per row", ylabel="median ms")
        if png:
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
