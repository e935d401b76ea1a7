"""End-to-end benchmark: HF generation vs specdec's speculative generation, side by side in one run.

Target: the embedded SmolLM2-135M-Instruct (``specdec.load_model()``) unless ``--target`` names
another; ``--quick`` uses a tiny random Llama instead (seconds, for the smoke test). Prompts are
input-grounded (repeat, edit or summarise a given text), where prompt lookup has something to copy.

Providers (each one row per configuration; a provider whose part of the stack is missing is
skipped with a note, or is an error when named explicitly in ``--providers``):
  hf              plain autoregressive ``model.generate`` (batch 1 and batch 8, left padded)
  hf-prompt-lookup  HF assisted generation, ``prompt_lookup_num_tokens=K`` (batch 1 only)
  hf-early-exit   HF assisted generation, ``assistant_early_exit=L`` (batch 1 only; greedy only,
                  like specdec-early-exit, outside --quick: without LayerSkip training it accepts ~nothing)
  hf-assistant    HF assisted generation with ``--assistant MODEL`` (batch 1; only when given)
  specdec-none    specdec's loop without a drafter (plain decoding through the ragged cache)
  specdec-ngram   specdec, n-gram (prompt lookup) drafter, fixed K (like for like with HF), verifying
                  a tree of the matched n-grams' continuations (the default; up to 2K nodes) ...
  specdec-ngram-chain  ... the same verifying one chain (``tree=False``) ...
  specdec-ngram-adaptive(-chain)  ... and with the default adaptive draft length (the depth <= K
                  chosen per step from the measured forward cost and acceptance)
  specdec-early-exit      specdec, the target's first L layers as drafter
  specdec-model   specdec with ``--assistant MODEL`` as drafter (only when given)

For each: tokens/s (generated tokens / wall time of the generate calls), acceptance rate and mean
tokens per target forward, the prefill's forward included (from specdec's stats; for HF at batch 1
from a count of the target's forward calls: plain decoding gives 1.00, and prompt lookup's first
forward verifies candidates like specdec's), at batch 1 and 8, greedy and sampled, fp32 and int8
(bitsandbytes; a subset, it is slow on CPU). Sampled rows run ``--sampled-repeats`` passes with
different seeds (one pass is too noisy to compare: on the 8 prompts, HF prompt lookup's tokens per
step ranged 1.72-2.01 over 3 seeds). Plus ``op=target_forward`` rows: the measured time of one cached target
forward over q = K+1 tokens against q = 1 (``cost_ratio``), which bounds the speedup: a step that
emits T tokens on average costs ``cost_ratio(K+1)`` plain steps, so speedup <= T / cost_ratio.

    python benchmarks/bench_e2e.py                   # the full run on the embedded model (~15 min on 2 cores)
    python benchmarks/bench_e2e.py --quick           # tiny random model, seconds
"""
from __future__ import annotations

import os
import sys
import time
import traceback

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

from benchmarks import harness as H
from specdec.hf_compat import cache_kwargs

ALL_PROVIDERS = ("hf", "hf-prompt-lookup", "hf-early-exit", "hf-assistant", "specdec-none", "specdec-ngram",
                 "specdec-ngram-chain", "specdec-ngram-adaptive", "specdec-ngram-adaptive-chain",
                 "specdec-early-exit", "specdec-model")
HF_BATCH1_ONLY = ("hf-prompt-lookup", "hf-early-exit", "hf-assistant")

# Input-grounded tasks: (instruction, text). The texts are written for this benchmark.
_TEXTS = [
    "The river town wakes early. Fishermen push their boats into the grey water before sunrise, and "
    "the baker on the corner opens his shutters at five. By seven the market square is full of crates "
    "of apples, pears and late plums, and the church bell rings the hour over the noise of the carts.",
    "To reset the router, unplug it from the wall, wait thirty seconds, and plug it back in. When the "
    "front light turns solid green, open a browser and go to the address printed on the label. Log in "
    "with the default password, choose a new one, and save the settings before closing the page.",
    "Our quarterly results show revenue of 4.2 million, up twelve percent on the same quarter last "
    "year. Costs rose by six percent, mostly from new hires in the support team. Cash on hand is 9.1 "
    "million, and we expect the next quarter to be flat because of the usual summer slowdown.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. It happens in the "
    "chloroplasts of plant cells, where chlorophyll absorbs mostly red and blue light. The sugar feeds "
    "the plant, and the oxygen is released into the air through small pores in the leaves.",
]
_TASKS = [
    "Repeat the following text exactly, word for word:\n\n{}",
    "Rewrite the following text, replacing every number with the word 'many', and change nothing else:\n\n{}",
    "Copy the following text, then add one sentence at the end:\n\n{}",
    "Summarise the following text in two sentences, reusing its own words:\n\n{}",
]


def make_prompts(n: int):
    return [_TASKS[i % len(_TASKS)].format(_TEXTS[(i // len(_TASKS) + i) % len(_TEXTS)]) for i in range(n)]


def encode_prompts(tokenizer, n: int):
    out = []
    for text in make_prompts(n):
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            ids = tokenizer(text)["input_ids"]
        out.append([int(t) for t in ids])
    return out


def tiny_model(seed: int = 0):
    """A tiny random Llama (vocab 256, 4 layers) for --quick: exercises every code path in seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model


def tiny_prompts(n: int):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        base = torch.randint(3, 256, (12,), generator=g).tolist()
        out.append([1] + base + base[:8] + base)  # repeated spans: the n-gram drafter finds matches
    return out


# ---------------------------------------------------------------------------------------------
# runners: each returns (tokens generated, per-call seconds list, extra stats dict)


class _ForwardCounter:
    """Counts calls of a module's forward (target steps of HF generate)."""

    def __init__(self, module):
        self.n = 0
        self._h = module.register_forward_pre_hook(self._hook)

    def _hook(self, *a):
        self.n += 1

    def close(self):
        self._h.remove()


def _eos_set(model):
    eos = model.generation_config.eos_token_id
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)


def _count_new(row, eos):
    """Generated tokens of one row up to and including the first EOS."""
    n = 0
    for t in row:
        n += 1
        if t in eos:
            break
    return n


def run_hf(model, prompts, *, batch, max_new, sampled, temperature, seed, kwargs=None, count_steps=True):
    """HF generate over the prompts in batches of ``batch`` (left padded). Returns tokens, times, stats."""
    kwargs = dict(kwargs or {})
    eos = _eos_set(model)
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = next(iter(eos)) if eos else 0
    gen = dict(max_new_tokens=max_new, do_sample=sampled, pad_token_id=pad, **kwargs)
    if sampled:
        gen.update(temperature=temperature, top_k=0, top_p=1.0)
    else:
        gen.update(temperature=None, top_k=None, top_p=None)
    tokens, times, steps = 0, [], 0
    counter = _ForwardCounter(model) if count_steps else None
    try:
        for start in range(0, len(prompts), batch):
            part = prompts[start:start + batch]
            L = max(len(p) for p in part)
            ids = torch.tensor([[pad] * (L - len(p)) + p for p in part])
            mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in part])
            torch.manual_seed(seed + start)
            n0 = counter.n if counter else 0
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=mask, **gen)
            times.append(time.perf_counter() - t0)
            if counter:
                steps += counter.n - n0  # every forward, the prefill included (it emits a token too)
            tokens += sum(_count_new(r[L:].tolist(), eos) for r in out)
    finally:
        if counter:
            counter.close()
    stats = {}
    if count_steps and steps > 0 and batch == 1:
        # tokens per target forward, the prefill included: plain decoding emits one token per forward
        # (the prefill's included), and prompt lookup's first forward verifies candidates too. Same
        # count as specdec's GenerationStats.tokens_per_step.
        stats.update(tokens_per_step=tokens / steps, steps=steps)
    return tokens, times, stats


def run_specdec(model, prompts, *, drafter, batch, max_new, sampled, temperature, seed, K, adaptive,
                backend="auto", tree=None):
    from specdec.generator import SpeculativeGenerator

    gen = SpeculativeGenerator(model, drafter=drafter, num_draft_tokens=K, adaptive=adaptive, backend=backend,
                               tree=tree)
    tokens, times, agg = 0, [], None
    for start in range(0, len(prompts), batch):
        part = prompts[start:start + batch]
        t0 = time.perf_counter()
        res = gen.generate(part, max_new_tokens=max_new, temperature=temperature if sampled else 0.0,
                           seed=seed + start)
        times.append(time.perf_counter() - t0)
        tokens += sum(len(s) for s in res.sequences)
        if agg is None:
            agg = res.stats
        else:
            agg.merge(res.stats)
    stats = {}
    if agg is not None:
        stats = {"tokens_per_step": agg.tokens_per_step, "steps": agg.row_steps,
                 "tree_steps": agg.tree_steps, "draft_nodes": agg.draft_nodes}
        if drafter not in (None, "none"):
            stats.update(acceptance_rate=agg.acceptance_rate, drafted=agg.drafted_tokens,
                         accepted=agg.accepted_tokens)
    return tokens, times, stats


def _rollback(cache, length):
    """Cut an HF DynamicCache back to ``length`` tokens (crop takes a negative count in 5.x)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        try:
            cache.crop(-extra)
        except ValueError:  # transformers 4.x: crop(max_length)
            cache.crop(length)


def forward_cost(model, prompt, qs, batch, device, runs, max_time):
    """Median time of one cached forward over q tokens after a prefill of ``prompt`` (per q)."""
    from transformers import DynamicCache

    ids = torch.tensor([prompt] * batch, device=device)
    L = ids.shape[1]
    with torch.inference_mode():
        cache = DynamicCache(config=model.config) if "config" in DynamicCache.__init__.__code__.co_varnames \
            else DynamicCache()
        model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache))
    out = {}
    for q in qs:
        x = torch.randint(3, 100, (batch, q), device=device)
        pos = torch.arange(L, L + q, device=device)[None].expand(batch, q)

        def call(x=x, pos=pos):
            with torch.inference_mode():
                model(input_ids=x, position_ids=pos, use_cache=True, **cache_kwargs(model, cache))

        out[q] = H.bench(call, device=device, runs=runs, max_time_s=max_time, min_runs=3, warmup=2,
                         setup=lambda: _rollback(cache, L))
    return out


# ---------------------------------------------------------------------------------------------


def build_parser():
    p = H.make_parser("bench_e2e", __doc__.splitlines()[0])
    p.add_argument("--target", default=None, help="target model (default: the embedded SmolLM2-135M)")
    p.add_argument("--assistant", default=None, help="a smaller model sharing the target's tokenizer (optional)")
    p.add_argument("--providers", default=None, help=f"comma list from {','.join(ALL_PROVIDERS)}")
    p.add_argument("--batches", default="1,8", help="batch sizes (default 1,8; HF assisted runs at 1 only)")
    p.add_argument("--modes", default="greedy,sampled", help="greedy,sampled")
    p.add_argument("--dtypes", default="fp32,int8",
                   help="fp32,int8 (int8 = bitsandbytes, a subset: hf and specdec-ngram, greedy)")
    p.add_argument("--prompts", type=int, default=8, help="number of prompts (default 8)")
    p.add_argument("--batch1-prompts", type=int, default=None,
                   help="run batch 1 over only the first N prompts (default: all; saves time on a slow CPU)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--early-exit-prompts", type=int, default=2,
                   help="prompts for the early-exit providers at batch 1 (slow: they accept almost nothing "
                        "on a model not trained for early exit); 0 = all")
    p.add_argument("--int8-prompts", type=int, default=2,
                   help="prompts for the int8 subset (bitsandbytes int8 is ~10x slower than fp32 on CPU)")
    p.add_argument("--int8-max-new-tokens", type=int, default=32)
    p.add_argument("--draft-tokens", type=int, default=10, help="K for prompt lookup / n-gram (default 10)")
    p.add_argument("--model-draft-tokens", type=int, default=4, help="K for early-exit / model drafters")
    p.add_argument("--early-exit-layers", type=int, default=None, help="default: a quarter of the target's")
    p.add_argument("--temperature", type=float, default=0.7, help="for sampled mode (default 0.7)")
    p.add_argument("--sampled-repeats", type=int, default=3,
                   help="passes (seeds) for sampled rows (default 3); greedy rows use --repeats")
    p.add_argument("--repeats", type=int, default=1,
                   help="passes over the prompt set per configuration; pass r uses seed + 1000 r, so sampled "
                        "rows average over r draws (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto",
                   help="specdec ops backend (auto, cpp, triton, reference); auto falls back to the reference "
                        "when the C++ kernels are not built")
    p.add_argument("--no-cost", action="store_true", help="skip the target forward cost-ratio rows")
    p.add_argument("--h2h-rounds", type=int, default=None,
                   help="head-to-head rounds at batch 1 (op=e2e_h2h; default 3, --quick 1; 0 = off): HF, HF "
                        "prompt lookup and specdec's default n-gram generator (tree and chain) take turns "
                        "on every prompt, so a slow spell of a shared machine hits all of them")
    return p


def _available(name, args, has_generator):
    if name.startswith("specdec") and not has_generator[0]:
        return False, has_generator[1]
    if name in ("hf-assistant", "specdec-model") and not args.assistant:
        return False, "needs --assistant MODEL (no smaller model sharing the target's tokenizer is embedded)"
    return True, ""


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = H.apply_common(args)
    if args.quick:
        args.prompts = min(args.prompts, 2)
        args.max_new_tokens = min(args.max_new_tokens, 16)
        args.dtypes = "fp32"
        args.batches = "1,2" if args.batches == "1,8" else args.batches
        runs, max_time = args.runs or 3, args.max_time or 0.5
    else:
        runs, max_time = args.runs or 10, args.max_time or 5.0
    batches = [int(b) for b in args.batches.split(",") if b]
    modes = [m for m in args.modes.split(",") if m]
    dtypes = [d for d in args.dtypes.split(",") if d]
    for m in modes:
        if m not in ("greedy", "sampled"):
            H.fail(f"unknown mode {m!r}")
    for d in dtypes:
        if d not in ("fp32", "int8"):
            H.fail(f"unknown dtype {d!r}: fp32 or int8")

    try:
        import specdec.generator  # noqa: F401
        import specdec.cache  # noqa: F401

        has_generator = (True, "")
    except Exception as exc:  # noqa: BLE001
        has_generator = (False, f"specdec's generation layer is not importable: {type(exc).__name__}: {exc}")
    explicit = args.providers is not None
    providers = H.select_providers(args.providers, ALL_PROVIDERS, ALL_PROVIDERS,
                                   lambda name: _available(name, args, has_generator))

    args.backend = _resolve_backend(args.backend, device)
    env = H.env_info(device)
    path = H.csv_path(args, "e2e")
    extra = ["mode", "batch", "draft_tokens", "new_tokens", "speedup_vs_hf", "speedup_vs_hf_prompt_lookup",
             "ratio_min", "ratio_max", "cost_ratio", "model"]
    rounds = args.h2h_rounds if args.h2h_rounds is not None else (1 if args.quick else 3)
    with H.CsvWriter(path, env, extra_columns=extra) as out:
        for dt in dtypes:
            model, prompts, model_name, assistant = _load(args, dt, device)
            if model is None:
                continue
            L = args.early_exit_layers or max(1, len(model.model.layers) // 4)
            run_args = args
            if dt == "int8":
                import copy

                run_args = copy.copy(args)
                run_args.max_new_tokens = min(args.max_new_tokens, args.int8_max_new_tokens)
                prompts = prompts[:args.int8_prompts]
            if not args.no_cost and dt == "fp32":
                _cost_rows(out, model, prompts, args, device, runs, max_time, model_name, dt)
            if rounds > 0 and dt == "fp32" and has_generator[0]:
                for mode in modes:
                    head_to_head(out, model, prompts, mode, rounds, args, model_name, dt)
            jobs = _jobs(providers, batches, modes, dt, args, L)
            base_tps = {}
            bar = H.progress(jobs, desc=f"e2e {dt}", total=len(jobs))
            for name, batch, mode, K in bar:
                if hasattr(bar, "set_postfix_str"):
                    bar.set_postfix_str(f"{name} B={batch} {mode}")
                sampled = mode == "sampled"
                try:
                    tokens, times, stats = _run(name, model, assistant, prompts, batch, sampled, K, L, run_args)
                except Exception as exc:  # noqa: BLE001
                    if explicit:
                        raise
                    H.note(f"{name} B={batch} {mode} {dt} failed: {type(exc).__name__}: {exc}")
                    if os.environ.get("SPECDEC_BENCH_DEBUG"):
                        traceback.print_exc()
                    out.add(op="e2e", provider=name, shape=H.shape_str(B=batch, K=K), dtype=dt, mode=mode,
                            batch=batch, draft_tokens=K, model=model_name,
                            note=f"failed: {type(exc).__name__}: {str(exc)[:160]}")
                    continue
                timing = H.timing_from_samples([t * 1e3 for t in times])
                tps = tokens / sum(times) if sum(times) > 0 else float("nan")
                base_tps[(name, batch, mode)] = tps
                row = dict(op="e2e", provider=name, shape=H.shape_str(B=batch, K=K), dtype=dt, timing=timing,
                           tokens_per_s=tps, mode=mode, batch=batch, draft_tokens=K, new_tokens=tokens,
                           model=model_name, acceptance_rate=stats.get("acceptance_rate"),
                           tokens_per_step=stats.get("tokens_per_step"),
                           note=_note(name, batch, args.backend) + (
                               f"; int8 subset: {len(prompts)} prompts x {run_args.max_new_tokens} new tokens"
                               if dt == "int8" else ""))
                if ("hf", 1, mode) in base_tps and name != "hf":
                    row["speedup_vs_hf"] = tps / base_tps[("hf", 1, mode)]
                if ("hf-prompt-lookup", 1, mode) in base_tps and name.startswith("specdec-ngram"):
                    row["speedup_vs_hf_prompt_lookup"] = tps / base_tps[("hf-prompt-lookup", 1, mode)]
                out.add(**row)
            del model
    rows = out.rows
    print(f"wrote {path}")
    if not args.no_plot:
        for mode in modes:
            p = H.plot_bars(rows, H.png_path(args, "e2e", f"_{mode}"), value="tokens_per_s", group="provider",
                            series="shape",
                            title=f"end to end ({mode}), {rows[0]['model'] if rows else ''} on {env['device']}",
                            ylabel="tokens/s (all rows of the batch)",
                            filter=lambda r, mode=mode: r["op"] == "e2e" and r["mode"] == mode and r["dtype"] == "fp32")
            if p:
                print(f"wrote {p}")
    _summary(rows)
    return 0


H2H_PROVIDERS = ("hf", "hf-prompt-lookup", "hf-prompt-lookup-narrow", "specdec-ngram-adaptive",
                 "specdec-ngram-adaptive-chain", "specdec-ngram-adaptive-sgemm")


def head_to_head(out, model, prompts, mode, rounds, args, model_name, dt):
    """Batch 1, interleaved: in every round each prompt runs once per provider, in an order that
    rotates with the prompt and the round, so drift in the machine's speed (a shared 2-core box
    swings by 30% within minutes) lands on every provider alike. HF prompt lookup uses
    ``--draft-tokens``; specdec runs its defaults (adaptive, n-gram K cap 32), one generator per
    provider for the whole run, as a user would keep one. Two ablations split specdec's gain:
    ``hf-prompt-lookup-narrow`` is HF prompt lookup with its linears on ``specdec.linear.narrow_linear``
    (what the kernel alone gives HF), ``specdec-ngram-adaptive-sgemm`` is specdec's default without it
    (``narrow_linear=False``: torch's sgemm, as HF uses). Rows ``op=e2e_h2h``: tokens/s of the
    median round, ``speedup_vs_hf_prompt_lookup`` the median over rounds of the per-round ratio
    (``ratio_min``/``ratio_max`` its range), tokens per target forward over all rounds."""
    from specdec.generator import SpeculativeGenerator
    from specdec.linear import narrow_linears

    sampled = mode == "sampled"
    K = args.draft_tokens
    gens = {"specdec-ngram-adaptive": SpeculativeGenerator(model, "ngram", backend=args.backend),
            "specdec-ngram-adaptive-chain": SpeculativeGenerator(model, "ngram", backend=args.backend, tree=False),
            "specdec-ngram-adaptive-sgemm": SpeculativeGenerator(model, "ngram", backend=args.backend,
                                                                 narrow_linear=False)}
    hf_kwargs = {"hf": {}, "hf-prompt-lookup": {"prompt_lookup_num_tokens": K},
                 "hf-prompt-lookup-narrow": {"prompt_lookup_num_tokens": K}}
    tokens = {p: np.zeros(rounds) for p in H2H_PROVIDERS}
    seconds = {p: np.zeros(rounds) for p in H2H_PROVIDERS}
    steps = {p: 0 for p in H2H_PROVIDERS}
    kw = dict(batch=1, max_new=args.max_new_tokens, sampled=sampled, temperature=args.temperature)

    def one(name, prompt, seed):
        if name in hf_kwargs:
            with narrow_linears(model if name.endswith("-narrow") else None):
                n, times, st = run_hf(model, [prompt], **kw, seed=seed, kwargs=hf_kwargs[name])
            return n, sum(times), st.get("steps", 0)
        t0 = time.perf_counter()
        res = gens[name].generate([prompt], max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature if sampled else 0.0, seed=seed)
        return len(res.sequences[0]), time.perf_counter() - t0, res.stats.target_steps

    for name in H2H_PROVIDERS:  # warm-up
        one(name, prompts[0], args.seed)
    work = [(r, i) for r in range(rounds) for i in range(len(prompts))]
    for r, i in H.progress(work, desc=f"head to head ({mode})", total=len(work)):
        shift = (r + i) % len(H2H_PROVIDERS)
        for name in H2H_PROVIDERS[shift:] + H2H_PROVIDERS[:shift]:
            n, sec, st = one(name, prompts[i], args.seed + 1000 * r + i)
            tokens[name][r] += n
            seconds[name][r] += sec
            steps[name] += st
    base = tokens["hf-prompt-lookup"] / seconds["hf-prompt-lookup"]
    for name in H2H_PROVIDERS:
        tps = tokens[name] / seconds[name]
        ratio = tps / base
        k = 0 if name == "hf" else (K if name.startswith("hf") else gens[name].num_draft_tokens)
        row = dict(op="e2e_h2h", provider=name, shape=H.shape_str(B=1, K=k), dtype=dt,
                   timing=H.timing_from_samples(list(seconds[name] * 1e3)), tokens_per_s=float(np.median(tps)),
                   mode=mode, batch=1, draft_tokens=k,
                   new_tokens=int(tokens[name].sum()), model=model_name,
                   tokens_per_step=tokens[name].sum() / steps[name] if steps[name] else None,
                   note=f"interleaved, {rounds} rounds x {len(prompts)} prompts; times per round"
                        + (f"; specdec defaults (adaptive, K cap {k}), " + ("chain" if name.endswith("chain") else "tree")
                           + (", torch sgemm linears (narrow_linear=False)" if name.endswith("sgemm") else "")
                           if name.startswith("specdec") else "")
                        + ("; linears on specdec.linear.narrow_linear" if name.endswith("-narrow") else ""))
        if name != "hf-prompt-lookup":
            row.update(speedup_vs_hf_prompt_lookup=float(np.median(ratio)), ratio_min=float(ratio.min()),
                       ratio_max=float(ratio.max()))
        out.add(**row)


def _resolve_backend(backend, device):
    """The ops backend specdec rows use: ``auto`` unless its pick cannot run verify here."""
    if backend != "auto":
        return backend
    try:
        from specdec import ops

        avail = ops.backends()
    except Exception:  # noqa: BLE001
        return backend
    if device.type == "cpu" and avail["cpp"][0] and not (
            hasattr(torch.ops.specdec_cpp, "verify") and hasattr(torch.ops.specdec_cpp, "sample")):
        H.note("specdec._C has no verify/sample kernels yet: specdec rows use the reference backend")
        return "reference"
    return backend


def _note(name, batch, backend=""):
    parts = []
    if name in ("specdec-ngram", "specdec-ngram-chain"):
        parts.append("fixed draft length (adaptive off), like for like with HF prompt lookup")
    if name.startswith("specdec-ngram"):
        parts.append("chain" if name.endswith("-chain") else "tree")
    if name == "hf" and batch > 1:
        parts.append("left padded batch")
    if name.startswith("specdec"):
        parts.append(f"ops backend {backend}")
    return "; ".join(parts)


def _jobs(providers, batches, modes, dt, args, L):
    jobs = []
    for mode in modes:
        for name in providers:
            if dt == "int8" and (mode != "greedy" or name not in ("hf", "specdec-ngram")):
                continue  # int8: a subset (batch 1, greedy, HF plain vs specdec n-gram); slow on CPU
            for batch in batches:
                if dt == "int8" and batch > 1:
                    continue
                if batch > 1 and name in HF_BATCH1_ONLY:
                    continue
                if "early-exit" in name and mode == "sampled" and not args.quick:
                    continue  # greedy already shows its acceptance; it is the slowest provider here
                K = args.draft_tokens if ("ngram" in name or "prompt-lookup" in name) else \
                    (args.model_draft_tokens if name not in ("hf", "specdec-none") else 0)
                jobs.append((name, batch, mode, K))
    return jobs


def _run(name, model, assistant, prompts, batch, sampled, K, L, args):
    if batch == 1 and args.batch1_prompts:
        prompts = prompts[:args.batch1_prompts]
    if "early-exit" in name and args.early_exit_prompts:
        prompts = prompts[:max(batch, args.early_exit_prompts)]
    kw = dict(batch=batch, max_new=args.max_new_tokens, sampled=sampled, temperature=args.temperature,
              seed=args.seed)
    reps = max(1, args.sampled_repeats if sampled else args.repeats)
    # warm-up: one short call on the first prompt
    if name.startswith("hf"):
        hf_kwargs = {"hf": {}, "hf-prompt-lookup": {"prompt_lookup_num_tokens": K},
                     "hf-early-exit": {"assistant_early_exit": L, "num_assistant_tokens": K,
                                       "num_assistant_tokens_schedule": "constant"},
                     "hf-assistant": {"assistant_model": assistant, "num_assistant_tokens": K,
                                      "num_assistant_tokens_schedule": "constant"}}[name]
        run_hf(model, prompts[:1], **{**kw, "max_new": 4, "batch": 1}, kwargs=hf_kwargs, count_steps=False)
        res = [run_hf(model, prompts, **{**kw, "seed": args.seed + 1000 * rep}, kwargs=hf_kwargs,
                      count_steps=name in ("hf", "hf-prompt-lookup"))
               for rep in range(reps)]
    else:
        drafter = "ngram" if name.startswith("specdec-ngram") else {
            "specdec-none": "none", "specdec-early-exit": "early-exit", "specdec-model": assistant}[name]
        adaptive = name.startswith("specdec-ngram-adaptive")
        tree = False if name.endswith("-chain") else None
        skw = dict(drafter=drafter, K=K if K else None, adaptive=adaptive, backend=args.backend, tree=tree)
        if name == "specdec-early-exit":
            from specdec.generator import SpeculativeGenerator  # noqa: F401
        run_specdec(model, prompts[:1], **{**kw, "max_new": 4, "batch": 1}, **skw)
        res = [run_specdec(model, prompts, **{**kw, "seed": args.seed + 1000 * rep}, **skw) for rep in range(reps)]
    tokens = sum(r[0] for r in res)
    times = [t for r in res for t in r[1]]
    stats = _merge_stats(res)
    return tokens, times, stats


def _merge_stats(res):
    """Stats of several passes (seeds) pooled: tokens / steps and accepted / drafted over all of them."""
    out = {}
    stats = [r[2] for r in res]
    if stats and all("steps" in st for st in stats):
        out["tokens_per_step"] = sum(r[0] for r in res) / sum(st["steps"] for st in stats)
    if stats and all("drafted" in st for st in stats):
        drafted = sum(st["drafted"] for st in stats)
        out["acceptance_rate"] = sum(st["accepted"] for st in stats) / drafted if drafted else 0.0
    return out


def _load(args, dt, device):
    if args.quick:
        return tiny_model(args.seed).to(device), tiny_prompts(args.prompts), "tiny-random-llama", None
    try:
        import specdec

        t0 = time.perf_counter()
        model = specdec.load_model(args.target, quantization="int8" if dt == "int8" else "none", device=device)
        tok = specdec.load_tokenizer(args.target)
        H.note(f"loaded target {args.target or 'SmolLM2-135M-Instruct'} ({dt}) in {time.perf_counter() - t0:.1f} s")
    except Exception as exc:  # noqa: BLE001
        if dt == "int8":
            H.note(f"int8 target unavailable, skipped: {type(exc).__name__}: {exc}")
            return None, None, None, None
        H.fail(f"cannot load the target model: {type(exc).__name__}: {exc}")
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    assistant = None
    if args.assistant:
        assistant = specdec.load_model(args.assistant, quantization="int8" if dt == "int8" else "none", device=device)
    name = os.path.basename(str(args.target or "SmolLM2-135M-Instruct"))
    return model, encode_prompts(tok, args.prompts), name, assistant


def _cost_rows(out, model, prompts, args, device, runs, max_time, model_name, dt):
    qs = [1, 2, 3, 5, 9, 11] if not args.quick else [1, 5]
    for batch in ([1, 8] if not args.quick else [1]):
        try:
            t = forward_cost(model, prompts[0], qs, batch, device, runs, max_time)
        except Exception as exc:  # noqa: BLE001
            H.note(f"target forward cost not measured: {type(exc).__name__}: {exc}")
            return
        for q, timing in t.items():
            out.add(op="target_forward", provider="hf-forward", shape=H.shape_str(B=batch, q=q), dtype=dt,
                    timing=timing, batch=batch, draft_tokens=q - 1, model=model_name,
                    cost_ratio=timing.median_ms / t[1].median_ms,
                    note=f"cached forward over q tokens after a {len(prompts[0])}-token prefill; "
                         "cost_ratio = time(q) / time(1)")


def _summary(rows):
    print(f"{'op':14} {'provider':24} {'shape':12} {'mode':8} {'dtype':5} {'tok/s':>8} {'accept':>7} "
          f"{'tok/step':>8} {'ratio':>6} {'vs hf':>6} {'vs pld':>6}")
    f = lambda v, w=8, p=2: (f"{float(v):{w}.{p}f}" if v else " " * w)  # noqa: E731
    for r in rows:
        print(f"{r['op']:14} {r['provider']:24} {r['shape']:12} {r['mode']:8} {r['dtype']:5} {f(r['tokens_per_s'])} "
              f"{f(r['acceptance_rate'], 7)} {f(r['tokens_per_step'])} {f(r['cost_ratio'], 6)} "
              f"{f(r['speedup_vs_hf'], 6)} {f(r['speedup_vs_hf_prompt_lookup'], 6)} {r['note'][:40] if 'failed' in r['note'] else ''}")


if __name__ == "__main__":
    sys.exit(main())
