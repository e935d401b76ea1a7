"""Benchmark of the fused chain-verification op ``specdec.ops.verify``, side by side in one run.

Providers (all on the same inputs, in the same process):
  reference    specdec.reference through ``ops.verify(backend="reference")`` (float64 inside: the spec)
  torch_fp32   the usual vectorised PyTorch rejection sampler in float32, as vLLM-style code writes it
               (softmax, gather, accept test, residual for every position, exponential race), below
  hf           transformers' ``_speculative_sampling`` (batch 1 routine; B > 1 loops over rows)
  cpp          specdec C++ CPU kernel (``backend="cpp"``)
  triton       specdec Triton kernel (``backend="triton"``, CUDA only)
  flashinfer   ``flashinfer.sampling.chain_speculative_sampling`` (CUDA only, when importable); it
               takes probabilities, so the timed call includes the target softmax
  cpp_logprobs, triton_logprobs
               the same specdec backend with ``return_logprobs=True``; column ``vs_without_logprobs``
               is its time over the plain backend's on the same inputs (the cost of logprobs)
  cpp_masked, triton_masked
               the same specdec backend with a ``token_bitmask`` (structured output: about half the
               ids allowed, always the drafts and each position's argmax)
  cpp_premasked, triton_premasked
               the backend without a mask on logits whose banned ids are already -inf: the same
               distributions, so the same chains and tokens as ``*_masked`` (a mask that renormalises
               the target changes how many drafts are accepted, so the plain backend on the raw
               logits does different work). Column ``vs_without_mask`` of a ``*_masked`` row is its
               time over ``*_premasked``'s: the cost of applying the mask inside the op.
  cpp_masked_fill, triton_masked_fill
               the unfused way: a copy of the logits masked by xgrammar's ``apply_token_bitmask_inplace``
               (``masked_fill`` without xgrammar), then the plain op

Every row has the bytes the op must move (target logits + draft probs + ids read, outputs written)
and the achieved GB/s next to the machine's measured copy bandwidth (``copy_gb_per_s``), the floor
for this memory-bound op. A chain stops at its first rejection, so an op need not read the later
positions: ``chain_bytes`` / ``chain_gb_per_s`` count only what these inputs' chains need (the
stricter measure; ``bytes`` can exceed what was read). Modes: ``sampled`` (temperature 1, draft_probs given: a model drafter),
``ngram`` (temperature 1, draft_probs None: one-hot q), ``greedy`` (temperature 0, no probs).

    python benchmarks/bench_verify.py                 # default sweep, a few minutes on a small CPU
    python benchmarks/bench_verify.py --quick         # seconds
    python benchmarks/bench_verify.py --full          # also the reference at the largest shapes
    python benchmarks/bench_verify.py --device cuda --providers torch_fp32,triton,flashinfer
"""
from __future__ import annotations

import itertools
import math
import os
import sys

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `specdec` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks import harness as H

ALL_PROVIDERS = ("reference", "torch_fp32", "hf", "cpp", "cpp_logprobs", "cpp_premasked", "cpp_masked",
                 "cpp_masked_fill", "triton", "triton_logprobs", "triton_premasked", "triton_masked",
                 "triton_masked_fill", "flashinfer")
CPU_PROVIDERS = ("reference", "torch_fp32", "hf", "cpp", "cpp_logprobs", "cpp_premasked", "cpp_masked",
                 "cpp_masked_fill")
GPU_PROVIDERS = ("reference", "torch_fp32", "hf", "triton", "triton_logprobs", "triton_premasked", "triton_masked",
                 "triton_masked_fill", "flashinfer")
LOGPROBS_SUFFIX = "_logprobs"  # provider variant: the backend before it, with return_logprobs=True
# token-mask variants of a backend: with token_bitmask, on pre-masked logits, masked_fill + op
MASK_SUFFIXES = ("_masked", "_premasked", "_masked_fill")


def _mask_variant(name):
    """(backend, suffix) of a token-mask provider variant, else (None, None)."""
    for suffix in MASK_SUFFIXES:
        if name.endswith(suffix):
            return name[:-len(suffix)], suffix
    return None, None
MODES = ("sampled", "ngram", "greedy")

# The reference (float64, several passes over B*(K+1)*V) takes seconds per call at the largest
# shapes on a small CPU: skipped above this many target-logit elements unless --full.
REFERENCE_MAX_ELEMENTS = 8 * 5 * 151936  # B=8, K=4, V=151936 (the CPU target shape) still runs


# ---------------------------------------------------------------------------------------------
# providers


def torch_fp32_verify(target_logits, draft_token_ids, draft_probs, temperature: float):
    """The usual vectorised PyTorch rejection sampler in float32 (vLLM style), compact.

    Accept draft i with probability min(1, p_i/q_i); residual norm(max(0, p - q)) computed at
    every position, bonus p_K appended, one exponential race over all K+1 rows, then pick the
    recovered/bonus token at the first rejection. Greedy when temperature == 0."""
    B, K1, V = target_logits.shape
    K = K1 - 1
    logits = target_logits.float()
    ids = draft_token_ids.long()
    if temperature == 0:
        argmax = logits.argmax(-1)  # [B, K+1]
        match = (ids == argmax[:, :K]).int()
        n = match.cumprod(1).sum(1)
        token = argmax.gather(1, n[:, None]).squeeze(1)
    else:
        p = torch.softmax(logits / temperature, dim=-1)  # [B, K+1, V]
        p_d = p[:, :K].gather(-1, ids[..., None]).squeeze(-1)
        if draft_probs is None:
            q = torch.zeros_like(p[:, :K]).scatter_(-1, ids[..., None], 1.0)
        else:
            q = draft_probs.float()
        q_d = q.gather(-1, ids[..., None]).squeeze(-1)
        u = torch.rand(B, K, device=logits.device)
        accept = u * q_d <= p_d
        n = accept.int().cumprod(1).sum(1)
        resid = (p[:, :K] - q).clamp_min_(0)
        resid = resid / resid.sum(-1, keepdim=True).clamp_min_(1e-30)
        dist = torch.cat([resid, p[:, K:]], dim=1)
        e = torch.empty_like(dist).exponential_()
        token = (dist / e).argmax(-1).gather(1, n[:, None]).squeeze(1)
    out = torch.where(torch.arange(K1, device=ids.device)[None] < n[:, None],
                      torch.cat([ids, ids[:, :1]], 1), -1)
    out.scatter_(1, n[:, None], token[:, None])
    return out, n.int()


def _hf_spec_sampling():
    try:
        from transformers.generation.utils import _speculative_sampling
    except Exception as exc:  # noqa: BLE001
        return None, f"transformers' _speculative_sampling not importable: {exc}"
    return _speculative_sampling, ""


def _flashinfer():
    try:
        from flashinfer.sampling import chain_speculative_sampling
    except Exception as exc:  # noqa: BLE001
        return None, f"flashinfer not importable: {type(exc).__name__}: {exc}"
    return chain_speculative_sampling, ""


def provider_status(name: str, device: torch.device):
    """(available, reason) of a provider on ``device``."""
    if name in ("reference", "torch_fp32"):
        return True, ""
    if name == "hf":
        fn, why = _hf_spec_sampling()
        return fn is not None, why
    if name in ("cpp", "triton"):
        return H.specdec_status(name, device, "verify")
    if name.endswith(LOGPROBS_SUFFIX):
        return provider_status(name[:-len(LOGPROBS_SUFFIX)], device)
    if _mask_variant(name)[0]:
        return provider_status(_mask_variant(name)[0], device)
    if name == "flashinfer":
        if device.type != "cuda":
            return False, "FlashInfer needs a CUDA device"
        fn, why = _flashinfer()
        return fn is not None, why
    return False, f"unknown provider {name!r}"


def make_inputs(B, K, V, dtype, device, mode, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    # target logits with a realistic spread (a few peaked tokens), drafts from a perturbed target
    target_logits = (torch.randn(B, K + 1, V, generator=g) * 3.0).to(device=device, dtype=dtype)
    draft_logits = draft_probs = None
    if mode == "sampled":
        draft_logits = (target_logits[:, :K].float()
                        + torch.randn(B, K, V, generator=g).to(device) * 1.0)
        draft_probs = torch.softmax(draft_logits, -1)
        draft_token_ids = torch.multinomial(draft_probs.view(-1, V).cpu(), 1, generator=g).view(B, K).to(device)
    else:
        draft_token_ids = target_logits[:, :K].float().argmax(-1)
        flip = torch.rand(B, K, generator=g).to(device) < 0.3  # some drafts wrong
        draft_token_ids = torch.where(flip, (draft_token_ids + 1) % V, draft_token_ids)
    return target_logits, draft_token_ids.to(torch.int64), draft_logits, draft_probs


def make_bitmask(target_logits, draft_token_ids, seed=0):
    """[B, K+1, ceil(V/32)] int32: about half the ids allowed at random, plus every draft (at its
    position) and each position's argmax, so the mask changes the chains little."""
    B, K1, V = target_logits.shape
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    allowed = torch.rand(B, K1, V, generator=g) < 0.5
    allowed.scatter_(2, target_logits.float().argmax(-1, keepdim=True).cpu(), True)
    allowed[:, :-1].scatter_(2, draft_token_ids.clamp(0, V - 1)[..., None].cpu(), True)
    pad = (-V) % 32
    octets = torch.nn.functional.pad(allowed, (0, pad)).view(B, K1, -1, 8).to(torch.int64)
    byte = (octets << torch.arange(8)).sum(-1)  # [B, K1, 4W]: id 8j+i in bit i of byte j
    words = (byte.view(B, K1, -1, 4) << torch.tensor([0, 8, 16, 24])).sum(-1)  # uint32 values in int64
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).to(target_logits.device)


def bytes_moved(target_logits, draft_token_ids, draft_probs):
    """Bytes the op must read and write at least: inputs once, outputs once."""
    B, K1, _ = target_logits.shape
    n = target_logits.numel() * target_logits.element_size() + draft_token_ids.numel() * 8
    if draft_probs is not None:
        n += draft_probs.numel() * draft_probs.element_size()
    return n + B * K1 * 8 + B * 4


def chain_bytes(target_logits, draft_token_ids, draft_probs, num_accepted):
    """Bytes a chain-aware op must read for these inputs and outcomes: a row's target logits up to
    its stop position s = num_accepted (later positions do not matter), the draft_probs row at s
    when the draft there was rejected (the residual), and the ids and outputs. ``bytes_moved``
    counts every input instead; an op that stops early can beat copy bandwidth on that measure,
    never on this one."""
    B, K1, V = target_logits.shape
    K = K1 - 1
    n = num_accepted.long().cpu()
    total = int((n + 1).sum()) * V * target_logits.element_size()
    if draft_probs is not None:
        total += int((n < K).sum()) * draft_probs.shape[-1] * draft_probs.element_size()
    return total + draft_token_ids.numel() * 8 + B * K1 * 8 + B * 4


def make_call(name, target_logits, draft_token_ids, draft_logits, draft_probs, temperature, bitmask=None):
    """A no-argument callable running ``name`` once on these inputs (None when the mode does not
    apply to the provider), and a note for the CSV. ``bitmask``: the token-mask variants' mask."""
    from specdec import ops, reference

    B, K1, V = target_logits.shape
    K = K1 - 1
    if name in ("reference", "cpp", "triton"):
        return (lambda: ops.verify(target_logits, draft_token_ids, draft_probs, temperature=temperature,
                                   seed=1234, backend=name)), ""
    backend, variant = _mask_variant(name)
    if variant == "_masked":
        return (lambda: ops.verify(target_logits, draft_token_ids, draft_probs, temperature=temperature,
                                   seed=1234, backend=backend, token_bitmask=bitmask)), ""
    if variant == "_premasked":
        premasked = target_logits.masked_fill(~reference.allowed_ids(bitmask, V), float("-inf"))
        return (lambda: ops.verify(premasked, draft_token_ids, draft_probs, temperature=temperature,
                                   seed=1234, backend=backend)), "logits with the banned ids at -inf"
    if variant == "_masked_fill":
        try:  # the unfused way: a masked copy of the logits (xgrammar's own kernel when present), then the op
            from xgrammar import apply_token_bitmask_inplace
        except ImportError:
            apply_token_bitmask_inplace = None

        def call():
            masked = target_logits.clone()
            if apply_token_bitmask_inplace is not None:
                apply_token_bitmask_inplace(masked.view(-1, V), bitmask.view(-1, bitmask.shape[-1]))
            else:
                masked.masked_fill_(~reference.allowed_ids(bitmask, V), float("-inf"))
            return ops.verify(masked, draft_token_ids, draft_probs, temperature=temperature, seed=1234,
                              backend=backend)
        how = "xgrammar.apply_token_bitmask_inplace" if apply_token_bitmask_inplace else "masked_fill"
        return call, f"a copy of the logits masked by {how}, then the op"
    if name.endswith(LOGPROBS_SUFFIX):
        backend = name[:-len(LOGPROBS_SUFFIX)]
        return (lambda: ops.verify(target_logits, draft_token_ids, draft_probs, temperature=temperature,
                                   seed=1234, backend=backend, return_logprobs=True)), ""
    if name == "torch_fp32":
        return (lambda: torch_fp32_verify(target_logits, draft_token_ids, draft_probs, temperature)), ""
    if name == "hf":
        if draft_probs is None or temperature == 0:
            return None, "HF's routine needs draft logits (sampled mode only)"
        fn, _ = _hf_spec_sampling()
        cand = torch.cat([torch.zeros(B, 8, dtype=torch.int64, device=draft_token_ids.device),
                          draft_token_ids], 1)  # a short "prompt" then the K candidates
        rows = [(cand[b:b + 1], draft_logits[b:b + 1], target_logits[b:b + 1]) for b in range(B)]

        def call():
            for c, dl, tl in rows:
                fn(c, dl, K, tl)
        return call, ("batch-1 routine looped over rows" if B > 1 else "")
    if name == "flashinfer":
        if draft_probs is None or temperature == 0:
            return None, "chain_speculative_sampling needs draft probs (sampled mode only)"
        fn, _ = _flashinfer()
        ids32 = draft_token_ids.to(torch.int32)
        dp = draft_probs.float()
        return (lambda: fn(dp, ids32, torch.softmax(target_logits.float(), -1))), \
            "includes the target softmax (the op takes probabilities)"
    raise ValueError(name)


# ---------------------------------------------------------------------------------------------


def _int_list(s):
    return [int(x) for x in s.split(",") if x]


def build_parser():
    p = H.make_parser("bench_verify", __doc__.splitlines()[0])
    p.add_argument("--providers", default=None,
                   help=f"comma list from {','.join(ALL_PROVIDERS)} (default: all available for the "
                        "device; a provider named here that cannot run is an error)")
    p.add_argument("--B", type=_int_list, default=None, help="batch sizes (default 1,8,64)")
    p.add_argument("--K", type=_int_list, default=None, help="draft lengths (default 1,4,8)")
    p.add_argument("--V", type=_int_list, default=None, help="vocabulary sizes (default 32000,151936)")
    p.add_argument("--dtypes", default=None, help="logit dtypes (default fp32,bf16)")
    p.add_argument("--modes", default="sampled", help=f"comma list from {','.join(MODES)} (default sampled)")
    p.add_argument("--full", action="store_true", help="run the reference at every shape too (slow)")
    p.add_argument("--temperature", type=float, default=None,
                   help="temperature of the sampled and ngram modes (default 1.0; greedy mode is 0)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = H.apply_common(args)
    if args.quick:
        Bs, Ks, Vs, dts = [1, 8], [4], [32000], ["fp32"]
        runs, max_time = args.runs or 5, args.max_time or 0.5
    else:
        Bs, Ks, Vs, dts = [1, 8, 64], [1, 4, 8], [32000, 151936], ["fp32", "bf16"]
        runs, max_time = args.runs or 30, args.max_time or (1.0 if device.type == "cpu" else 0.5)
    Bs, Ks, Vs = args.B or Bs, args.K or Ks, args.V or Vs
    dts = args.dtypes.split(",") if args.dtypes else dts
    dtypes = [H.parse_dtype(d) for d in dts]
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            H.fail(f"unknown mode {m!r}; use {', '.join(MODES)}")

    providers = H.select_providers(args.providers, CPU_PROVIDERS if device.type == "cpu" else GPU_PROVIDERS,
                                   ALL_PROVIDERS, lambda name: provider_status(name, device), f" on {device}")

    env = H.env_info(device)
    copy_gbps = H.copy_bandwidth(device)
    H.note(f"{env['device']}: measured copy bandwidth {copy_gbps:.1f} GB/s (read + write)")
    path = H.csv_path(args, "verify")
    configs = list(itertools.product(modes, dtypes, Vs, Ks, Bs))
    with H.CsvWriter(path, env, extra_columns=["mode", "B", "K", "V", "speedup_vs_reference",
                                               "speedup_vs_torch_fp32", "chain_bytes", "chain_gb_per_s",
                                               "chain_frac_of_copy", "vs_without_logprobs", "vs_without_mask",
                                               "temperature"]) as out:
        bar = H.progress(configs, desc="verify", total=len(configs))
        for mode, dtype, V, K, B in bar:
            temperature = 0.0 if mode == "greedy" else (1.0 if args.temperature is None else args.temperature)
            inputs = make_inputs(B, K, V, dtype, device, mode)
            target_logits, draft_token_ids, draft_logits, draft_probs = inputs
            nbytes = bytes_moved(target_logits, draft_token_ids, draft_probs)
            shape = H.shape_str(B=B, K=K, V=V)
            base = dict(op="verify", shape=shape, dtype=H.dtype_str(dtype), bytes=nbytes,
                        copy_gb_per_s=copy_gbps, mode=mode, B=B, K=K, V=V, temperature=temperature)
            # the chain's stop positions, from the first specdec backend that runs here
            from specdec import ops
            chk = "cpp" if device.type == "cpu" and ops.backends()["cpp"][0] else (
                "triton" if device.type == "cuda" and ops.backends()["triton"][0] else "reference")
            _, n_acc = ops.verify(target_logits, draft_token_ids, draft_probs, temperature=temperature,
                                  seed=1234, backend=chk)
            base["chain_bytes"] = chain_bytes(target_logits, draft_token_ids, draft_probs, n_acc)
            bitmask = make_bitmask(target_logits, draft_token_ids) if any(
                _mask_variant(p)[0] for p in providers) else None
            times = {}
            for name in providers:
                if hasattr(bar, "set_postfix_str"):
                    bar.set_postfix_str(f"{mode} {H.dtype_str(dtype)} {shape} {name}")
                if name == "reference" and not args.full and target_logits.numel() > REFERENCE_MAX_ELEMENTS:
                    out.add(provider=name, note="skipped at this size (slow float64 reference); --full runs it",
                            **base)
                    continue
                if name == "hf" and B > 8 and not args.full:
                    out.add(provider=name, note="skipped above B=8 (a Python loop of the batch-1 routine: "
                            "time grows linearly in B); --full runs it", **base)
                    continue
                fn, why = make_call(name, target_logits, draft_token_ids, draft_logits, draft_probs,
                                    temperature, bitmask)
                if fn is None:
                    continue
                slow = name in ("reference", "hf") and device.type == "cpu"
                t = H.bench(fn, device=device, runs=min(runs, 10) if slow else runs, max_time_s=max_time,
                            min_runs=3, warmup=1 if slow else 3)
                times[name] = t.median_ms
                row = dict(base)
                if "reference" in times and name != "reference":
                    row["speedup_vs_reference"] = times["reference"] / t.median_ms
                if "torch_fp32" in times and name != "torch_fp32":
                    row["speedup_vs_torch_fp32"] = times["torch_fp32"] / t.median_ms
                if name.endswith(LOGPROBS_SUFFIX) and name[:-len(LOGPROBS_SUFFIX)] in times:
                    row["vs_without_logprobs"] = t.median_ms / times[name[:-len(LOGPROBS_SUFFIX)]]
                backend, variant = _mask_variant(name)
                if variant == "_masked" and backend + "_premasked" in times:
                    row["vs_without_mask"] = t.median_ms / times[backend + "_premasked"]
                row["chain_gb_per_s"] = row["chain_bytes"] / (t.median_ms * 1e6)
                row["chain_frac_of_copy"] = row["chain_gb_per_s"] / copy_gbps
                out.add(provider=name, timing=t, note=why, **row)
            del inputs, target_logits, draft_token_ids, draft_logits, draft_probs, bitmask
    rows = out.rows
    print(f"wrote {path}")
    if not args.no_plot:
        _plots(args, rows, copy_gbps)
    _summary(rows)
    return 0


def _plots(args, rows, copy_gbps):
    dev = torch.device(args.device).type
    for dt in dict.fromkeys(r["dtype"] for r in rows):
        for mode in dict.fromkeys(r["mode"] for r in rows):
            sel = lambda r, dt=dt, mode=mode: r["dtype"] == dt and r["mode"] == mode  # noqa: E731
            suffix = f"_{mode}_{dt}"
            p1 = H.plot_bars(rows, H.png_path(args, "verify", suffix + "_gbps"), value="gb_per_s",
                             title=f"verify ({mode}, {dt} logits) on {rows[0]['device']}: achieved GB/s",
                             ylabel="GB/s (bytes moved / median time)", log=True,
                             hlines={f"copy {copy_gbps:.1f} GB/s": copy_gbps}, filter=sel)
            p2 = H.plot_bars(rows, H.png_path(args, "verify", suffix + "_ms"), value="median_ms",
                             title=f"verify ({mode}, {dt} logits) on {dev}: median time",
                             ylabel="median ms (log)", log=True, filter=sel)
            for p in (p1, p2):
                if p:
                    print(f"wrote {p}")


def _summary(rows):
    """Print the rows that the targets are checked on (and a short table)."""
    print(f"{'mode':8} {'dtype':5} {'shape':22} {'provider':11} {'median ms':>10} {'GB/s':>8} {'x copy':>7}"
          f" {'chain GB/s':>11} {'x copy':>7}")
    for r in rows:
        if not r["median_ms"]:
            continue
        print(f"{r['mode']:8} {r['dtype']:5} {r['shape']:22} {r['provider']:11} "
              f"{float(r['median_ms']):10.3f} {float(r['gb_per_s'] or 'nan'):8.2f} "
              f"{float(r['frac_of_copy'] or 'nan'):7.2f} {float(r['chain_gb_per_s'] or 'nan'):11.2f} "
              f"{float(r['chain_frac_of_copy'] or 'nan'):7.2f}")


if __name__ == "__main__":
    sys.exit(main())
