"""Benchmark of the KV-cache store (``specdec.cache``): one speculative step's cache work.

A step = append K+1 positions to every layer (layer by layer, as an HF forward does), roll every
row back to its own accepted length, append the next position. Providers (same geometry):

  specdec        RaggedCache's store, C++ kernels (``backend="cpp"``; CUDA kernels on --device cuda)
  specdec_torch  the same store through the plain-PyTorch fallback ops
  hf_dynamic     ``transformers.DynamicCache``: update (concatenation) + ``crop`` — batch 1 only,
                 since crop removes the same count from every row (HF assisted generation refuses B > 1)
  reprefill      what a user without per-row rollback does for B > 1: re-run the kept prefix through the
                 model to rebuild the cache (a tiny Llama with the same KV geometry; skipped above
                 ``--reprefill-max-tokens`` tokens per call on CPU)

Also ``rollback`` alone (the O(1) claim: the same cost at 4096 tokens as at 512): the store method
(checks + host mirror, one device-to-host copy of B ints) and the raw op without checks.

    python benchmarks/bench_cache.py            # B in {1, 8, 32}, S in {512, 1024, 2048, 4096}
    python benchmarks/bench_cache.py --quick    # seconds
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks import harness as H
from specdec import cache as C

K = 4  # drafts per step: K+1 positions appended (drafts + bonus)


def _geometry(args):
    return dict(num_layers=args.layers, num_kv_heads=args.kv_heads, head_dim=args.head_dim)


def _kept(B, device):
    """Per-row accepted counts 0..K+1 (a fixed, varied pattern) as a [B] tensor."""
    return (torch.arange(B, device=device) * 3 % (K + 2)).to(torch.int32)


def bench_specdec(B, S, args, dtype, device, backend):
    g = _geometry(args)
    store = C.KVStore(g["num_layers"], B, g["num_kv_heads"], g["head_dim"], S + 2 * (K + 1), dtype=dtype,
                      device=device, backend=backend)
    draft = torch.randn(B, g["num_kv_heads"], K + 1, g["head_dim"], dtype=dtype, device=device)
    one = draft[:, :, :1]
    base = torch.full((B,), S, dtype=torch.int32, device=device)
    store.append(torch.zeros(g["num_layers"], B, g["num_kv_heads"], S, g["head_dim"], dtype=dtype, device=device),
                 torch.zeros(g["num_layers"], B, g["num_kv_heads"], S, g["head_dim"], dtype=dtype, device=device))
    new_lengths = base + _kept(B, device)

    def setup():
        store.rollback(base)

    def step():
        L = store.num_layers
        for layer in range(L):
            store.append(draft, draft, layer, advance=layer == L - 1)
        store.rollback(new_lengths)
        for layer in range(L):
            store.append(one, one, layer, advance=layer == L - 1)

    nbytes = 2 * store.keys.element_size() * g["num_layers"] * B * g["num_kv_heads"] * g["head_dim"] * (K + 2)
    t_step = H.bench(step, device=device, runs=args.runs, max_time_s=args.max_time, setup=setup)

    # rollback alone: the store method (checks + host mirror) and the raw op
    full = base + K + 1
    store.rollback(base)
    store.append(draft.expand(g["num_layers"], -1, -1, -1, -1), draft.expand(g["num_layers"], -1, -1, -1, -1))

    def reset_full():
        store.lengths.copy_(full)
        store._set_host(full.cpu())

    t_rb = H.bench(lambda: store.rollback(new_lengths), device=device, runs=args.runs, max_time_s=args.max_time,
                   setup=reset_full)
    t_rb_raw = H.bench(lambda: C.rollback_(store.lengths, new_lengths, False, backend=backend), device=device,
                       runs=args.runs, max_time_s=args.max_time)
    del store
    return t_step, nbytes, t_rb, t_rb_raw


def bench_hf_dynamic(S, args, dtype, device):
    from transformers import DynamicCache

    g = _geometry(args)
    cache = DynamicCache()
    prefix = torch.zeros(1, g["num_kv_heads"], S, g["head_dim"], dtype=dtype, device=device)
    for layer in range(g["num_layers"]):
        cache.update(prefix, prefix, layer)
    draft = torch.randn(1, g["num_kv_heads"], K + 1, g["head_dim"], dtype=dtype, device=device)
    one = draft[:, :, :1]
    kept = 2  # B = 1: one accepted count

    def setup():
        if cache.get_seq_length() > S:
            cache.crop(-(cache.get_seq_length() - S))  # never crop(0)

    def step():
        for layer in range(g["num_layers"]):
            cache.update(draft, draft, layer)
        cache.crop(-(K + 1 - kept))
        for layer in range(g["num_layers"]):
            cache.update(one, one, layer)

    return H.bench(step, device=device, runs=args.runs, max_time_s=args.max_time, setup=setup)


_MODEL = {}


def bench_reprefill(B, S, args, dtype, device):
    """Rebuild the cache by running the kept prefix (S + accepted tokens) through a tiny Llama."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    g = _geometry(args)
    if "m" not in _MODEL:
        heads = 2 * g["num_kv_heads"]
        config = LlamaConfig(vocab_size=1024, hidden_size=heads * g["head_dim"], intermediate_size=2 * heads * g["head_dim"],
                             num_hidden_layers=g["num_layers"], num_attention_heads=heads,
                             num_key_value_heads=g["num_kv_heads"], max_position_embeddings=8192)
        _MODEL["m"] = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device, dtype).eval()
    model = _MODEL["m"]
    ids = torch.randint(0, 1024, (B, S + 2), device=device)

    def step():
        with torch.no_grad():
            model.model(input_ids=ids, use_cache=True)

    return H.bench(step, device=device, runs=min(args.runs, 5), min_runs=2, warmup=1, warmup_s=0,
                   max_time_s=args.max_time)


def main(argv=None):
    p = H.make_parser("bench_cache", "one speculative step's KV-cache work: append K+1, per-row rollback, append")
    p.add_argument("--batch", type=int, nargs="*", default=None, help="batch sizes (default 1 8 32)")
    p.add_argument("--seq", type=int, nargs="*", default=None, help="prefix lengths (default 512 1024 2048 4096)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default=None, help="default fp32 on CPU, fp16 on CUDA")
    p.add_argument("--reprefill-max-tokens", type=int, default=8192,
                   help="skip the re-prefill provider above B*S tokens on CPU (default %(default)s)")
    args = p.parse_args(argv)
    device = H.apply_common(args)
    dtype = H.parse_dtype(args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    args.runs = args.runs or (10 if args.quick else 30)
    args.max_time = args.max_time or (1.0 if args.quick else 3.0)
    batches = args.batch or ([1, 8] if args.quick else [1, 8, 32])
    seqs = args.seq or ([512, 4096] if args.quick else [512, 1024, 2048, 4096])
    backends = ["cpp", "torch"] if C.has_extension() else ["torch"]

    env = H.env_info(device)
    dts = H.dtype_str(dtype)
    path = H.csv_path(args, "cache")
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = [(B, S) for B in batches for S in seqs]
    with H.CsvWriter(path, env) as csv:
        for B, S in H.progress(shapes, desc="cache"):
            shape = H.shape_str(B=B, S=S, L=args.layers, Hkv=args.kv_heads, D=args.head_dim, K=K)
            for be in backends:
                prov = "specdec" if be == "cpp" else "specdec_torch"
                t_step, nbytes, t_rb, t_rb_raw = bench_specdec(B, S, args, dtype, device, be)
                csv.add(op="spec_step", provider=prov, shape=shape, dtype=dts, timing=t_step, bytes=nbytes)
                csv.add(op="rollback", provider=prov, shape=shape, dtype=dts, timing=t_rb,
                        note="store.rollback: checks + host mirror")
                csv.add(op="rollback_raw", provider=prov, shape=shape, dtype=dts, timing=t_rb_raw,
                        note="rollback_ op, check=False")
            if B == 1:
                csv.add(op="spec_step", provider="hf_dynamic", shape=shape, dtype=dts,
                        timing=bench_hf_dynamic(S, args, dtype, device), note="DynamicCache update + crop")
            if device.type == "cuda" or B * S <= args.reprefill_max_tokens:
                csv.add(op="spec_step", provider="reprefill", shape=shape, dtype=dts,
                        timing=bench_reprefill(B, S, args, dtype, device),
                        note="tiny Llama forward over the kept prefix")
            else:
                csv.add(op="spec_step", provider="reprefill", shape=shape, dtype=dts,
                        note=f"skipped: B*S > {args.reprefill_max_tokens} tokens on CPU")
        rows = csv.rows
    print(f"wrote {path}")
    for r in rows:
        if r.get("median_ms") not in ("", None):
            print(f"{r['op']:>12} {r['provider']:>13} {r['shape']:>36}  median {float(r['median_ms']):9.4f} ms")
    if not args.no_plot:
        plots = [("spec_step", "provider", True, lambda r: r["op"] == "spec_step"),
                 ("rollback", "op", False, lambda r: r["op"].startswith("rollback") and r["provider"] == "specdec")]
        for name, series, log, keep in plots:
            out = H.plot_bars(rows, H.png_path(args, "cache", "_" + name), filter=keep, series=series,
                              title=f"KV cache: {name} ({env['device']})", ylabel="median ms", log=log)
            if out:
                print(f"wrote {out}")


if __name__ == "__main__":
    main()
