"""Benchmark of the fused sampling op ``specdec.ops.sample``, side by side in one run.

Providers (same inputs, same process):
  reference    specdec.reference through ``ops.sample(backend="reference")`` (float64 inside)
  torch_fp32   the usual PyTorch sampler in float32: temperature, sort-based top-k/top-p mask,
               softmax, exponential race (what vLLM-style code does), returning the probs too
  cpp          specdec C++ CPU kernel (``backend="cpp"``)
  triton       specdec Triton kernel (``backend="triton"``, CUDA only)
  flashinfer   softmax + ``flashinfer.sampling.sampling_from_probs`` /
               ``top_k_top_p_sampling_from_probs`` (CUDA only, when importable)
  cpp_logprobs, triton_logprobs
               the same specdec backend with ``return_logprobs=True``; column ``vs_without_logprobs``
               is its time over the plain backend's on the same inputs (the cost of logprobs)

The op reads the logits and writes the probs it sampled from ([B, V] fp32, ready to be
``draft_probs``); bytes moved = logits + probs + ids, and GB/s is shown next to the measured
copy bandwidth. Modes: ``plain`` (temperature 1), ``top_k`` (50), ``top_p`` (0.9), ``greedy``.

    python benchmarks/bench_sample.py            # default sweep
    python benchmarks/bench_sample.py --quick    # seconds
"""
from __future__ import annotations

import itertools
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks import harness as H

ALL_PROVIDERS = ("reference", "torch_fp32", "cpp", "cpp_logprobs", "triton", "triton_logprobs", "flashinfer")
CPU_PROVIDERS = ("reference", "torch_fp32", "cpp", "cpp_logprobs")
GPU_PROVIDERS = ("reference", "torch_fp32", "triton", "triton_logprobs", "flashinfer")
LOGPROBS_SUFFIX = "_logprobs"  # provider variant: the backend before it, with return_logprobs=True
MODES = {"plain": (1.0, 0, 1.0), "top_k": (1.0, 50, 1.0), "top_p": (1.0, 0, 0.9), "greedy": (0.0, 0, 1.0)}
REFERENCE_MAX_ELEMENTS = 8 * 151936


def torch_fp32_sample(logits, temperature: float, top_k: int, top_p: float):
    """Vectorised float32 sampler: returns (token_ids [B], probs [B, V] fp32)."""
    x = logits.float()
    if temperature == 0:
        tok = x.argmax(-1)
        return tok, torch.nn.functional.one_hot(tok, x.shape[-1]).float()
    x = x / temperature
    if top_k > 0 or top_p < 1.0:
        vals, idx = x.sort(-1, descending=True)
        if top_k > 0:
            vals[:, top_k:] = float("-inf")
        if top_p < 1.0:
            cum = vals.softmax(-1).cumsum(-1)
            drop = (cum - vals.softmax(-1)) >= top_p  # mass before this token already reaches top_p
            vals = vals.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter_(-1, idx, vals)
    probs = x.softmax(-1)
    tok = (probs / torch.empty_like(probs).exponential_()).argmax(-1)
    return tok, probs


def _flashinfer():
    try:
        import flashinfer.sampling as fs
    except Exception as exc:  # noqa: BLE001
        return None, f"flashinfer not importable: {type(exc).__name__}: {exc}"
    return fs, ""


def provider_status(name, device):
    if name in ("reference", "torch_fp32"):
        return True, ""
    if name in ("cpp", "triton"):
        return H.specdec_status(name, device, "sample")
    if name.endswith(LOGPROBS_SUFFIX):
        return provider_status(name[:-len(LOGPROBS_SUFFIX)], device)
    if name == "flashinfer":
        if device.type != "cuda":
            return False, "FlashInfer needs a CUDA device"
        fs, why = _flashinfer()
        return fs is not None, why
    return False, f"unknown provider {name!r}"


def make_call(name, logits, mode):
    from specdec import ops

    temperature, top_k, top_p = MODES[mode]
    if name in ("reference", "cpp", "triton"):
        return (lambda: ops.sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, seed=7,
                                   backend=name)), ""
    if name.endswith(LOGPROBS_SUFFIX):
        backend = name[:-len(LOGPROBS_SUFFIX)]
        return (lambda: ops.sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, seed=7,
                                   backend=backend, return_logprobs=True)), ""
    if name == "torch_fp32":
        return (lambda: torch_fp32_sample(logits, temperature, top_k, top_p)), ""
    if name == "flashinfer":
        fs, _ = _flashinfer()
        if mode == "greedy":
            return None, ""
        if mode == "plain":
            return (lambda: fs.sampling_from_probs(torch.softmax(logits.float(), -1))), \
                "includes the softmax; does not return filtered probs"
        return (lambda: fs.top_k_top_p_sampling_from_probs(torch.softmax(logits.float(), -1),
                                                            top_k if top_k else logits.shape[-1], top_p)), \
            "includes the softmax; does not return filtered probs"
    raise ValueError(name)


def _int_list(s):
    return [int(x) for x in s.split(",") if x]


def build_parser():
    p = H.make_parser("bench_sample", __doc__.splitlines()[0])
    p.add_argument("--providers", default=None, help=f"comma list from {','.join(ALL_PROVIDERS)}")
    p.add_argument("--B", type=_int_list, default=None, help="batch sizes (default 1,8,64)")
    p.add_argument("--V", type=_int_list, default=None, help="vocabulary sizes (default 32000,151936)")
    p.add_argument("--dtypes", default=None, help="logit dtypes (default fp32,bf16)")
    p.add_argument("--modes", default="plain,top_p", help=f"comma list from {','.join(MODES)}")
    p.add_argument("--full", action="store_true", help="run the reference at every shape too (slow)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = H.apply_common(args)
    if args.quick:
        Bs, Vs, dts = [1, 8], [32000], ["fp32"]
        runs, max_time = args.runs or 5, args.max_time or 0.5
    else:
        Bs, Vs, dts = [1, 8, 64], [32000, 151936], ["fp32", "bf16"]
        runs, max_time = args.runs or 30, args.max_time or (1.0 if device.type == "cpu" else 0.5)
    Bs, Vs = args.B or Bs, args.V or Vs
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
    path = H.csv_path(args, "sample")
    configs = list(itertools.product(modes, dtypes, Vs, Bs))
    with H.CsvWriter(path, env, extra_columns=["mode", "B", "V", "speedup_vs_torch_fp32",
                                                               "vs_without_logprobs"]) as out:
        bar = H.progress(configs, desc="sample", total=len(configs))
        for mode, dtype, V, B in bar:
            g = torch.Generator().manual_seed(0)
            logits = (torch.randn(B, V, generator=g) * 3.0).to(device=device, dtype=dtype)
            nbytes = logits.numel() * logits.element_size() + B * V * 4 + B * 8
            shape = H.shape_str(B=B, V=V)
            base = dict(op="sample", shape=shape, dtype=H.dtype_str(dtype), bytes=nbytes,
                        copy_gb_per_s=copy_gbps, mode=mode, B=B, V=V)
            times = {}
            for name in providers:
                if hasattr(bar, "set_postfix_str"):
                    bar.set_postfix_str(f"{mode} {H.dtype_str(dtype)} {shape} {name}")
                if name == "reference" and not args.full and logits.numel() > REFERENCE_MAX_ELEMENTS:
                    out.add(provider=name, note="skipped at this size (slow float64 reference); --full runs it",
                            **base)
                    continue
                fn, why = make_call(name, logits, mode)
                if fn is None:
                    continue
                slow = name == "reference" and device.type == "cpu"
                t = H.bench(fn, device=device, runs=min(runs, 10) if slow else runs, max_time_s=max_time,
                            min_runs=3, warmup=1 if slow else 3)
                times[name] = t.median_ms
                row = dict(base)
                if "torch_fp32" in times and name != "torch_fp32":
                    row["speedup_vs_torch_fp32"] = times["torch_fp32"] / t.median_ms
                if name.endswith(LOGPROBS_SUFFIX) and name[:-len(LOGPROBS_SUFFIX)] in times:
                    row["vs_without_logprobs"] = t.median_ms / times[name[:-len(LOGPROBS_SUFFIX)]]
                out.add(provider=name, timing=t, note=why, **row)
    rows = out.rows
    print(f"wrote {path}")
    if not args.no_plot:
        for dt in dict.fromkeys(r["dtype"] for r in rows):
            for mode in dict.fromkeys(r["mode"] for r in rows):
                p = H.plot_bars(rows, H.png_path(args, "sample", f"_{mode}_{dt}"), value="gb_per_s",
                                title=f"sample ({mode}, {dt} logits) on {env['device']}: achieved GB/s",
                                ylabel="GB/s (log)", log=True,
                                hlines={f"copy {copy_gbps:.1f} GB/s": copy_gbps},
                                filter=lambda r, dt=dt, mode=mode: r["dtype"] == dt and r["mode"] == mode)
                if p:
                    print(f"wrote {p}")
    print(f"{'mode':7} {'dtype':5} {'shape':16} {'provider':11} {'median ms':>10} {'GB/s':>8} {'x copy':>7}")
    for r in rows:
        if r["median_ms"]:
            print(f"{r['mode']:7} {r['dtype']:5} {r['shape']:16} {r['provider']:11} {float(r['median_ms']):10.3f} "
                  f"{float(r['gb_per_s']):8.2f} {float(r['frac_of_copy']):7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
