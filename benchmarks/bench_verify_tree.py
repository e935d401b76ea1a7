"""Benchmark of the fused tree-verification op ``specdec.ops.verify_tree``, side by side in one run.

Providers (same inputs, same process):
  reference    specdec.reference through ``ops.verify_tree(backend="reference")`` (float64, the spec)
  torch_fp32   an eager PyTorch tree verifier in float32 (below): softmax of every node, then a walk
               down the tree with batched tensor ops, recursive rejection over siblings
  cpp          specdec C++ CPU kernel (``backend="cpp"``)
  triton       specdec Triton kernels (``backend="triton"``, CUDA only)
  cpp_chain / triton_chain
               the chain op ``ops.verify`` on each row's first-child path (as deep as the tree): what
               verifying only the main branch costs

Trees: N nodes per row, EAGLE-like: the root has up to 4 children, then every node up to 2, filled
breadth first (depth about log2 N). The first child of a node is the target's argmax there (so
paths get accepted), the others random (n-gram and greedy modes) or drawn from a draft distribution
close to the target (sampled mode, with draft_probs). Modes as in bench_verify.py.

    python benchmarks/bench_verify_tree.py --quick
    python benchmarks/bench_verify_tree.py                 # B 1/8/64 x N 8/16/32/64 x V 32000/151936 x fp32/bf16
    python benchmarks/bench_verify_tree.py --device cuda --providers torch_fp32,triton,triton_chain
"""
from __future__ import annotations

import itertools
import os
import sys

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `specdec` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks import harness as H

ALL_PROVIDERS = ("reference", "torch_fp32", "cpp", "cpp_chain", "triton", "triton_chain")
CPU_PROVIDERS = ("reference", "torch_fp32", "cpp", "cpp_chain")
GPU_PROVIDERS = ("reference", "torch_fp32", "triton", "triton_chain")
MODES = ("sampled", "ngram", "greedy")
REFERENCE_MAX_ELEMENTS = 8 * 17 * 32000


def torch_fp32_verify_tree(target_logits, tree_token_ids, tree_parents, draft_probs, temperature: float):
    """Eager PyTorch tree verification in float32, the way one would write it without a kernel.

    Softmax of all N+1 nodes up front; then depth by depth for the whole batch: the current node's
    children, tried in index order (greedy: the first equal to the argmax; no draft probs: the
    first equal to one target sample; with draft probs: recursive rejection sampling, the residual
    norm(max(0, p - q)) after each rejected sibling), and the emitted token where a row stops.
    Returns (output_ids [B, N+1], num_accepted [B])."""
    B, N1, V = target_logits.shape
    N = N1 - 1
    dev = target_logits.device
    logits = target_logits.float()
    greedy = temperature == 0
    probs = None if greedy else torch.softmax(logits / temperature, dim=-1)
    rows = torch.arange(B, device=dev)
    cur = torch.zeros(B, dtype=torch.long, device=dev)  # logits index of the current node
    live = torch.ones(B, dtype=torch.bool, device=dev)
    out = torch.full((B, N1), -1, dtype=torch.long, device=dev)
    n_acc = torch.zeros(B, dtype=torch.long, device=dev)
    tokens, parents = tree_token_ids.long(), tree_parents.long()
    for depth in range(N + 1):
        if not bool(live.any()):
            break
        children = (parents == (cur - 1)[:, None]) & (tokens >= 0) & live[:, None]  # [B, N]
        if greedy or draft_probs is None:
            if greedy:
                target = logits[rows, cur].argmax(-1)
            else:
                e = torch.empty(B, V, device=dev).exponential_()
                target = (probs[rows, cur] / e).argmax(-1)
            match = children & (tokens == target[:, None])
            found = match.any(1)
            first = match.float().argmax(1)
            emit = target
        else:
            p_cur = probs[rows, cur].clone()
            found = torch.zeros(B, dtype=torch.bool, device=dev)
            first = torch.zeros(B, dtype=torch.long, device=dev)
            for j in range(N):
                try_j = children[:, j] & ~found
                if not bool(try_j.any()):
                    continue
                x = tokens[:, j].clamp_min(0)
                q = draft_probs[:, j].float()
                u = torch.rand(B, device=dev)
                ok = try_j & (u * q[rows, x] <= p_cur[rows, x])
                first = torch.where(ok, j, first)
                found |= ok
                rej = try_j & ~ok
                resid = (p_cur - q).clamp_min(0)
                resid = resid / resid.sum(-1, keepdim=True).clamp_min(1e-30)
                p_cur = torch.where(rej[:, None], resid, p_cur)
            e = torch.empty(B, V, device=dev).exponential_()
            emit = (p_cur / e).argmax(-1)
        stop = live & ~found
        out[rows, n_acc] = torch.where(stop, emit, torch.where(live & found, tokens[rows, first], out[rows, n_acc]))
        n_acc = n_acc + (live & found).long()
        cur = torch.where(live & found, first + 1, cur)
        live = live & found
    return out, n_acc.int()


def make_tree(B, N, device, g):
    """EAGLE-like parents [B, N]: root up to 4 children, then 2 per node, breadth first."""
    parents = torch.full((N,), -1, dtype=torch.int64)
    frontier, slots, i = [-1], {-1: 4}, 0
    while i < N:
        nxt = []
        for node in frontier:
            for _ in range(slots.get(node, 2)):
                if i >= N:
                    break
                parents[i] = node
                nxt.append(i)
                i += 1
        frontier = nxt
    return parents.expand(B, N).contiguous().to(device)


def make_inputs(B, N, V, dtype, device, mode, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    target_logits = (torch.randn(B, N + 1, V, generator=g) * 3.0).to(device=device, dtype=dtype)
    parents = make_tree(B, N, device, g)
    parent_logits = target_logits[:, (parents[0] + 1).cpu()].float()  # [B, N, V]: logits at each node's parent
    draft_probs = None
    if mode == "sampled":
        draft_probs = torch.softmax(parent_logits + torch.randn(B, N, V, generator=g).to(device), -1)
        tokens = torch.multinomial(draft_probs.view(-1, V).cpu(), 1, generator=g).view(B, N).to(device)
    else:
        tokens = torch.randint(0, V, (B, N), generator=g).to(device)
        first = torch.ones(N, dtype=torch.bool)
        for i in range(1, N):  # the first child of each parent guesses the argmax
            first[i] = not bool((parents[0, :i] == parents[0, i]).any())
        tokens = torch.where(first.to(device)[None], parent_logits.argmax(-1), tokens)
    return target_logits, tokens.to(torch.int64), parents, draft_probs


def main_path(parents):
    """The first-child chain from the root (trees are the same in every row): node indices."""
    par = parents[0].tolist()
    chain, node = [], -1
    while True:
        kids = [i for i in range(len(par)) if par[i] == node]
        if not kids:
            return chain
        node = kids[0]
        chain.append(node)


def provider_status(name, device):
    if name in ("reference", "torch_fp32"):
        return True, ""
    return H.specdec_status(name.replace("_chain", ""), device, "verify")


def make_call(name, target_logits, tokens, parents, draft_probs, temperature):
    from specdec import ops

    if name in ("reference", "cpp", "triton"):
        return lambda: ops.verify_tree(target_logits, tokens, parents, draft_probs, temperature=temperature,
                                       seed=1234, backend=name)
    if name == "torch_fp32":
        return lambda: torch_fp32_verify_tree(target_logits, tokens, parents, draft_probs, temperature)
    chain = main_path(parents)
    chain_logits = target_logits[:, [0] + [i + 1 for i in chain]].contiguous()  # the root, then each node
    chain_probs = None if draft_probs is None else draft_probs[:, chain].contiguous()
    chain_ids = tokens[:, chain].contiguous()
    return lambda: ops.verify(chain_logits, chain_ids, chain_probs, temperature=temperature, seed=1234,
                              backend=name.replace("_chain", ""))


def _int_list(s):
    return [int(x) for x in s.split(",") if x]


def build_parser():
    p = H.make_parser("bench_verify_tree", __doc__.splitlines()[0])
    p.add_argument("--providers", default=None, help=f"comma list from {','.join(ALL_PROVIDERS)}")
    p.add_argument("--B", type=_int_list, default=None, help="batch sizes (default 1,8,64)")
    p.add_argument("--N", type=_int_list, default=None, help="tree nodes (default 8,16,32,64)")
    p.add_argument("--V", type=_int_list, default=None, help="vocabulary sizes (default 32000,151936)")
    p.add_argument("--dtypes", default=None, help="logit dtypes (default fp32,bf16)")
    p.add_argument("--modes", default="sampled,ngram", help=f"comma list from {','.join(MODES)}")
    p.add_argument("--full", action="store_true", help="run the reference at every shape too (slow)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = H.apply_common(args)
    if args.quick:
        Bs, Ns, Vs, dts = [1, 8], [16], [32000], ["fp32"]
        runs, max_time = args.runs or 5, args.max_time or 0.5
    else:
        Bs, Ns, Vs, dts = [1, 8, 64], [8, 16, 32, 64], [32000, 151936], ["fp32", "bf16"]
        runs, max_time = args.runs or 20, args.max_time or (1.0 if device.type == "cpu" else 0.5)
    Bs, Ns, Vs = args.B or Bs, args.N or Ns, args.V or Vs
    dtypes = [H.parse_dtype(d) for d in (args.dtypes.split(",") if args.dtypes else dts)]
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            H.fail(f"unknown mode {m!r}; use {', '.join(MODES)}")
    providers = H.select_providers(args.providers, CPU_PROVIDERS if device.type == "cpu" else GPU_PROVIDERS,
                                   ALL_PROVIDERS, lambda name: provider_status(name, device), f" on {device}")
    env = H.env_info(device)
    copy_gbps = H.copy_bandwidth(device)
    H.note(f"{env['device']}: measured copy bandwidth {copy_gbps:.1f} GB/s (read + write)")
    path = H.csv_path(args, "verify_tree")
    configs = list(itertools.product(modes, dtypes, Vs, Ns, Bs))
    with H.CsvWriter(path, env, extra_columns=["mode", "B", "N", "V", "speedup_vs_reference",
                                               "speedup_vs_torch_fp32"]) as out:
        bar = H.progress(configs, desc="verify_tree", total=len(configs))
        for mode, dtype, V, N, B in bar:
            temperature = 0.0 if mode == "greedy" else 1.0
            target_logits, tokens, parents, draft_probs = make_inputs(B, N, V, dtype, device, mode)
            nbytes = target_logits.numel() * target_logits.element_size() + tokens.numel() * 16
            if draft_probs is not None:
                nbytes += draft_probs.numel() * draft_probs.element_size()
            shape = H.shape_str(B=B, N=N, V=V)
            base = dict(op="verify_tree", shape=shape, dtype=H.dtype_str(dtype), bytes=nbytes,
                        copy_gb_per_s=copy_gbps, mode=mode, B=B, N=N, V=V)
            times = {}
            for name in providers:
                if hasattr(bar, "set_postfix_str"):
                    bar.set_postfix_str(f"{mode} {H.dtype_str(dtype)} {shape} {name}")
                if name == "reference" and not args.full and target_logits.numel() > REFERENCE_MAX_ELEMENTS:
                    out.add(provider=name, note="skipped at this size (slow float64 reference); --full runs it",
                            **base)
                    continue
                fn = make_call(name, target_logits, tokens, parents, draft_probs, temperature)
                slow = name in ("reference", "torch_fp32") and device.type == "cpu"
                t = H.bench(fn, device=device, runs=min(runs, 5) if slow else runs, max_time_s=max_time,
                            min_runs=3, warmup=1 if slow else 3)
                times[name] = t.median_ms
                row = dict(base)
                if "reference" in times and name != "reference":
                    row["speedup_vs_reference"] = times["reference"] / t.median_ms
                if "torch_fp32" in times and name != "torch_fp32":
                    row["speedup_vs_torch_fp32"] = times["torch_fp32"] / t.median_ms
                note = "first-child chain only (ops.verify)" if name.endswith("_chain") else ""
                out.add(provider=name, timing=t, note=note, **row)
    rows = out.rows
    print(f"wrote {path}")
    if not args.no_plot:
        for dt in dict.fromkeys(r["dtype"] for r in rows):
            for mode in dict.fromkeys(r["mode"] for r in rows):
                sel = lambda r, dt=dt, mode=mode: r["dtype"] == dt and r["mode"] == mode  # noqa: E731
                p = H.plot_bars(rows, H.png_path(args, "verify_tree", f"_{mode}_{dt}_ms"), value="median_ms",
                                title=f"verify_tree ({mode}, {dt} logits) on {rows[0]['device']}: median time",
                                ylabel="median ms (log)", log=True, filter=sel)
                if p:
                    print(f"wrote {p}")
    print(f"{'mode':8} {'dtype':5} {'shape':24} {'provider':13} {'median ms':>10} {'vs torch_fp32':>14}")
    for r in rows:
        if r["median_ms"]:
            sp = r.get("speedup_vs_torch_fp32") or ""
            print(f"{r['mode']:8} {r['dtype']:5} {r['shape']:24} {r['provider']:13} {float(r['median_ms']):10.3f} "
                  f"{(f'{float(sp):.1f}x' if sp else ''):>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
