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

Structured output (``--workload structured``, rows ``op=e2e_structured`` in e2e_structured_<device>.csv):
8 passages (a person, a product, an event, ...), each with its own JSON schema (strings, integers, enums,
arrays, nested objects) to extract fields into, the schema in the prompt. Providers, taking turns on
every batch of prompts in each of ``--rounds`` rounds (as in the head-to-head rows): (a) ``hf-xgrammar``,
HF ``generate`` with xgrammar's HF logits processor over the grammars compiled as specdec compiles them
(the same masks, no speculation); specdec with the grammar and (b) ``specdec-none``, no drafts, (c)
``specdec-ngram``, n-gram drafts, (d) ``specdec-ngram-forced``, n-gram and grammar-forced drafts.
Reported: tokens/s, tokens per target forward, and the fraction of outputs that are valid JSON
for their schema (``jsonschema``) and that ended with the grammar complete.

    python benchmarks/bench_e2e.py                   # the full run on the embedded model (~15 min on 2 cores)
    python benchmarks/bench_e2e.py --quick           # tiny random model, seconds
    python benchmarks/bench_e2e.py --workload structured --threads 1 --rounds 2 --batch1-prompts 4 --max-new-tokens 96
"""
from __future__ import annotations

import json
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


def encode_text(tokenizer, text: str) -> list:
    """Token ids of one user message: the tokenizer's chat template when it has one, else the raw text."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
    else:
        ids = tokenizer(text)["input_ids"]
    return [int(t) for t in ids]


def encode_prompts(tokenizer, n: int):
    return [encode_text(tokenizer, text) for text in make_prompts(n)]


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


def run_hf(model, prompts, *, batch, max_new, sampled, temperature, seed, kwargs=None, count_steps=True,
           outputs=None):
    """HF generate over the prompts in batches of ``batch`` (left padded). Returns tokens, times, stats.
    ``outputs``: a list that receives each row's generated ids (up to and including the first EOS)."""
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
            H.sync(out.device)
            times.append(time.perf_counter() - t0)
            if counter:
                steps += counter.n - n0  # every forward, the prefill included (it emits a token too)
            new = [r[L:].tolist() for r in out]
            counts = [_count_new(r, eos) for r in new]
            tokens += sum(counts)
            if outputs is not None:
                outputs.extend(r[:n] for r, n in zip(new, counts))
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
# the structured-output workload (--workload structured): extract fields from a passage into JSON

STRUCT_PROVIDERS = ("hf-xgrammar", "specdec-none", "specdec-ngram", "specdec-ngram-forced")
STRUCT_NOTES = {
    "hf-xgrammar": "(a) HF generate + xgrammar's HF logits processor (the same compiled grammars), no drafts",
    "specdec-none": "(b) specdec + grammar, no drafts (drafter none, grammar_drafts=False)",
    "specdec-ngram": "(c) specdec + grammar, n-gram drafts (grammar_drafts=False)",
    "specdec-ngram-forced": "(d) specdec + grammar, n-gram and grammar-forced drafts (grammar_drafts=True)",
}


def _obj(required=True, **props):
    """A JSON-schema object with ``props`` (all required unless ``required=False``)."""
    out = {"type": "object", "properties": props}
    if required:
        out["required"] = list(props)
    return out


_STR = {"type": "string", "maxLength": 48}  # bounded: a small model must not write one string forever
_INT = {"type": "integer"}


def _list(items, n):
    return {"type": "array", "items": items, "maxItems": n}


def _enum(*values):
    return {"type": "string", "enum": list(values)}


# (passage, what to extract, schema). The passages are written for this benchmark.
STRUCT_TASKS = [
    ("Maria Lopez is a 34-year-old architect who lives in Valencia, Spain. She speaks Spanish, English and "
     "Italian, and in her free time she restores old bicycles.",
     "the person's name, age, city, occupation and languages",
     _obj(name=_STR, age=_INT, city=_STR, occupation=_STR, languages=_list(_STR, 4))),
    ("The Nordlys X2 is a cordless vacuum cleaner made by Hemlig. It weighs 2 kilograms, runs for 45 minutes "
     "on one charge and costs 249 euros. It comes in grey and in white.",
     "the product, its brand, category, price, battery life and colours",
     _obj(product=_STR, brand=_STR, category=_enum("kitchen", "cleaning", "garden", "audio"), price_eur=_INT,
          battery_minutes=_INT, colours=_list(_STR, 3))),
    ("The Harbour Jazz Festival takes place in Bergen from 12 to 14 June 2025. Tickets cost 60 euros per day. "
     "The headliners are the Oslo Big Band and the singer Ana Reis.",
     "the event, its city, dates, ticket price and headliners",
     _obj(event=_STR, city=_STR, dates=_obj(first_day=_INT, last_day=_INT, month=_STR, year=_INT),
          ticket_eur=_INT, headliners=_list(_STR, 3))),
    ("Brightwell Foods was founded in 1998 in Leeds by Sarah Khan and Tom Ellis. It has 320 employees and "
     "sells frozen soups and ready meals to supermarkets in the UK and Ireland.",
     "the company, the year it was founded, its city, founders, employees and markets",
     _obj(company=_STR, founded=_INT, city=_STR, founders=_list(_STR, 3), employees=_INT,
          markets=_list(_STR, 3))),
    ("The Salt Road is a novel by Jonas Weber, published in 2019 by Linden Press. It has 412 pages and follows "
     "two sisters who cross the Sahara with a caravan. It won the Baltic Prize for fiction.",
     "the book's title, author, year, publisher, pages, genre and awards",
     _obj(title=_STR, author=_STR, year=_INT, publisher=_STR, pages=_INT,
          genre=_enum("novel", "biography", "poetry", "science", "history"), awards=_list(_STR, 2))),
    ("This lentil soup serves four and takes 40 minutes. You need 200 grams of red lentils, one onion, two "
     "carrots, one litre of vegetable stock and a teaspoon of cumin.",
     "the dish, servings, minutes and ingredients with their quantities",
     _obj(dish=_STR, servings=_INT, minutes=_INT,
          ingredients=_list(_obj(item=_STR, quantity=_STR), 6))),
    ("Booking confirmation: passenger Daniel Okafor, flight KL 1234 from Amsterdam to Lagos on 3 March 2025, "
     "departing at 10:45, seat 14C, economy class, one checked bag.",
     "the passenger, flight, route, date, seat, class and bags",
     _obj(passenger=_STR, flight=_STR, route=_obj(origin=_STR, destination=_STR),
          date=_obj(day=_INT, month=_STR, year=_INT), seat=_STR,
          travel_class=_enum("economy", "premium", "business", "first"), bags=_INT)),
    ("Lumen Analytics is hiring a senior data engineer in Toronto. The job is full time, pays 120000 to 140000 "
     "dollars a year and needs five years of experience with Python and SQL. Remote work is allowed two days "
     "a week.",
     "the company, job title, city, job type, salary range, years of experience, skills and remote days",
     _obj(company=_STR, title=_STR, city=_STR, job_type=_enum("full-time", "part-time", "contract"),
          salary=_obj(minimum=_INT, maximum=_INT, currency=_enum("USD", "CAD", "EUR")), experience_years=_INT,
          skills=_list(_STR, 4), remote_days=_INT)),
]


# --quick: schemas a random model completes in a few tokens (enums, booleans: no free text to ramble in)
QUICK_SCHEMAS = [
    _obj(colour=_enum("red", "green", "blue"), ok={"type": "boolean"}),
    _obj(size=_enum("S", "M", "L"), tags=_list(_enum("a", "b"), 2), inner=_obj(flag={"type": "boolean"})),
]


def structured_tasks(n: int, quick: bool = False):
    """n (prompt text, JSON schema) pairs: a passage, then the fields to extract and the schema."""
    out = []
    for i in range(n):
        passage, what, schema = STRUCT_TASKS[i % len(STRUCT_TASKS)]
        if quick:
            what, schema = "the fields", QUICK_SCHEMAS[i % len(QUICK_SCHEMAS)]
        out.append((f"{passage}\n\nExtract {what} from the text above as JSON with this schema:\n"
                    f"{json.dumps(schema)}", schema))
    return out


def json_valid(text: str, schema: dict) -> bool:
    """Whether ``text`` parses as JSON and validates against ``schema`` (jsonschema, independent of xgrammar)."""
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def _struct_model(args, device):
    """(model, tokenizer, model name): the embedded SmolLM2 (fp32) or ``--target``; ``--quick``: a tiny
    random Llama over SmolLM2's tokenizer (it writes nonsense, but the grammar shapes it)."""
    import specdec

    tok = specdec.load_tokenizer(None if args.quick else args.target)
    if args.quick:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(args.seed)
        eos = tok.eos_token_id
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                          bos_token_id=tok.bos_token_id, eos_token_id=eos, pad_token_id=eos,
                          tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg).eval().to(device)
        model.generation_config.eos_token_id, model.generation_config.pad_token_id = eos, eos
        return model, tok, "tiny-random-llama (SmolLM2 tokenizer)"
    model = specdec.load_model(args.target, quantization="none", device=device)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return model, tok, os.path.basename(str(args.target or "SmolLM2-135M-Instruct"))


def structured(args, device) -> int:
    """The structured-output workload: 4 providers (``STRUCT_PROVIDERS``) in interleaved rounds per
    (mode, batch). In every round each batch of prompts (one prompt at batch 1) runs once per provider,
    in an order that rotates with the batch and the round, like ``head_to_head``. Rows ``op=e2e_structured``:
    tokens/s of the median round, ``speedup_vs_hf`` the median per-round ratio to (a) (``ratio_min``/
    ``ratio_max``), tokens per target forward over all rounds (HF: counted forwards, batch 1 only),
    ``valid_frac`` (outputs that parse and validate against their schema) and ``complete_frac`` (outputs
    that ended with the grammar complete: the rest hit max_new_tokens), greedy ``same_as_hf`` (outputs
    token for token equal to (a)'s: the mask makes all four the same argmax)."""
    import xgrammar as xgr
    from transformers import LogitsProcessorList

    from specdec import Grammar, SpeculativeGenerator
    from specdec.generator.grammar import GrammarCompiler
    from specdec.models import model_vocab_size

    if args.quick:
        args.prompts = min(args.prompts, 2)
        args.max_new_tokens = min(args.max_new_tokens, 40)
        args.batches = "1,2" if args.batches == "1,8" else args.batches
    providers = H.select_providers(args.providers, STRUCT_PROVIDERS, STRUCT_PROVIDERS, lambda name: (True, ""),
                                   where=" (structured workload)")
    batches = [int(b) for b in args.batches.split(",") if b]
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in ("greedy", "sampled"):
            H.fail(f"unknown mode {m!r}")
    if any(b < 1 for b in batches):
        H.fail(f"batch sizes must be >= 1, got {args.batches!r}")
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    if rounds < 1:
        H.fail(f"--rounds must be >= 1, got {rounds}")
    backend = _resolve_backend(args.backend, device)
    t0 = time.perf_counter()
    model, tok, model_name = _struct_model(args, device)
    H.note(f"loaded {model_name} in {time.perf_counter() - t0:.1f} s")
    tasks = structured_tasks(args.prompts, quick=args.quick)
    prompts = [encode_text(tok, text) for text, _ in tasks]
    schemas = [schema for _, schema in tasks]
    # (a) gets the grammars compiled exactly as specdec compiles them (same stop tokens, compact JSON)
    eos = sorted(_eos_set(model))
    compiler = GrammarCompiler(tok, model_vocab_size(model), eos)
    compiled = [compiler.compile(Grammar.json_schema(s)) for s in schemas]
    gens = {name: SpeculativeGenerator(model, "none" if name == "specdec-none" else "ngram", tok, backend=backend)
            for name in providers if name.startswith("specdec")}
    forced = {"specdec-none": False, "specdec-ngram": False, "specdec-ngram-forced": True}
    max_new = args.max_new_tokens

    def one(name, idx, sampled, seed, max_new=args.max_new_tokens):
        """One generate call over the prompts ``idx``: (tokens, seconds, HF forwards or specdec's
        GenerationStats, [generated ids per row], [row ended with its grammar complete])."""
        part = [prompts[i] for i in idx]
        if name == "hf-xgrammar":
            proc = xgr.contrib.hf.LogitsProcessor([compiled[i] for i in idx])  # one per call: it keeps state
            outs = []
            n, times, st = run_hf(model, part, batch=len(part), max_new=max_new, sampled=sampled,
                                  temperature=args.temperature, seed=seed,
                                  kwargs={"logits_processor": LogitsProcessorList([proc])}, outputs=outs)
            done = [bool(o) and o[-1] in eos for o in outs]
            return n, sum(times), st.get("steps", 0), outs, done
        H.sync(device)
        t = time.perf_counter()
        res = gens[name].generate(part, grammar=[schemas[i] for i in idx], max_new_tokens=max_new,
                                  temperature=args.temperature if sampled else 0.0, seed=seed,
                                  grammar_drafts=forced[name])
        H.sync(device)
        sec = time.perf_counter() - t
        outs = [list(s) for s in res.sequences]
        return sum(len(s) for s in outs), sec, res.stats, outs, [r == "eos" for r in res.finish_reasons]

    def text_of(ids):
        return tok.decode([t for t in ids if t not in eos], skip_special_tokens=True)

    # warm-up, untimed: every grammar compiled (each generator caches its own) and both paths run once
    for name in providers:
        one(name, list(range(len(prompts))), False, args.seed, 2)
        one(name, [0], True, args.seed, 4)

    env = H.env_info(device)
    path = H.csv_path(args, "e2e_structured")
    extra = ["mode", "batch", "draft_tokens", "new_tokens", "speedup_vs_hf", "ratio_min", "ratio_max",
             "valid_frac", "complete_frac", "same_as_hf", "outputs", "model"]
    with H.CsvWriter(path, env, extra_columns=extra) as out:
        for mode in modes:
            sampled = mode == "sampled"
            for batch in batches:
                used = min(len(prompts), args.batch1_prompts or len(prompts)) if batch == 1 else len(prompts)
                units = [list(range(s, min(s + batch, used))) for s in range(0, used, batch)]
                tokens = {p: np.zeros(rounds) for p in providers}
                seconds = {p: np.zeros(rounds) for p in providers}
                steps = {p: 0 for p in providers}
                agg = {p: None for p in providers}  # specdec's GenerationStats over all calls
                valid = {p: [] for p in providers}
                complete = {p: [] for p in providers}
                ids = {p: {} for p in providers}  # (round, prompt) -> generated ids
                work = [(r, u) for r in range(rounds) for u in range(len(units))]
                for r, u in H.progress(work, desc=f"structured {mode} B={batch}", total=len(work)):
                    shift = (r + u) % len(providers)
                    for name in providers[shift:] + providers[:shift]:
                        idx = units[u]
                        n, sec, st, outs, done = one(name, idx, sampled, args.seed + 1000 * r + idx[0])
                        tokens[name][r] += n
                        seconds[name][r] += sec
                        if name == "hf-xgrammar":
                            steps[name] += st
                        elif agg[name] is None:
                            agg[name] = st
                        else:
                            agg[name].merge(st)
                        for i, o, d in zip(idx, outs, done):
                            ids[name][(r, i)] = o
                            complete[name].append(d)
                            valid[name].append(json_valid(text_of(o), schemas[i]))
                base = tokens["hf-xgrammar"] / seconds["hf-xgrammar"] if "hf-xgrammar" in providers else None
                for name in providers:
                    tps = tokens[name] / seconds[name]
                    row = dict(op="e2e_structured", provider=name, shape=H.shape_str(B=batch), dtype="fp32",
                               timing=H.timing_from_samples(list(seconds[name] * 1e3)),
                               tokens_per_s=float(np.median(tps)), mode=mode, batch=batch,
                               new_tokens=int(tokens[name].sum()), model=model_name,
                               valid_frac=float(np.mean(valid[name])), complete_frac=float(np.mean(complete[name])),
                               outputs=len(valid[name]),
                               note=f"{STRUCT_NOTES[name]}; interleaved, {rounds} rounds x {used} prompts; "
                                    f"times per round; max_new_tokens {max_new}"
                                    + (f", temperature {args.temperature}" if sampled else ""))
                    if name == "hf-xgrammar":
                        if batch == 1 and steps[name]:  # HF at batch > 1: forwards of the whole batch, not per row
                            row["tokens_per_step"] = tokens[name].sum() / steps[name]
                        row["draft_tokens"] = 0
                    else:
                        st = agg[name]
                        row.update(tokens_per_step=st.tokens_per_step,
                                   draft_tokens=0 if name == "specdec-none" else gens[name].num_draft_tokens)
                        if name != "specdec-none":
                            row["acceptance_rate"] = st.acceptance_rate
                    if base is not None and name != "hf-xgrammar":
                        ratio = tps / base
                        row.update(speedup_vs_hf=float(np.median(ratio)), ratio_min=float(ratio.min()),
                                   ratio_max=float(ratio.max()))
                    if not sampled and "hf-xgrammar" in providers:
                        ref = ids["hf-xgrammar"]
                        row["same_as_hf"] = float(np.mean([ids[name][k] == ref[k] for k in ref]))
                    out.add(**row)
    rows = out.rows
    print(f"wrote {path}")
    if not args.no_plot:
        p = plot_structured(rows, H.png_path(args, "e2e_structured"))
        if p:
            print(f"wrote {p}")
    _structured_summary(rows)
    return 0


def plot_structured(rows, path):
    """Tokens/s per provider, one group per (mode, batch); ``rows`` as written (or read back) from the CSV."""
    if not rows:
        return None
    plot_rows = [dict(r, config=f"{r['mode']} {r['shape']}") for r in rows]
    return H.plot_bars(plot_rows, path, value="tokens_per_s", group="config", series="provider",
                       title=f"structured output (JSON schema), {rows[0]['model']}\n{rows[0]['device']}",
                       ylabel="tokens/s (all rows of the batch)")


def _structured_summary(rows):
    print(f"{'provider':22} {'mode':8} {'shape':6} {'tok/s':>8} {'vs (a)':>7} {'tok/step':>8} {'accept':>7} "
          f"{'valid':>6} {'complete':>8} {'same':>6}")
    f = lambda v, w=8, p=2: (f"{float(v):{w}.{p}f}" if v else " " * w)  # noqa: E731
    for r in rows:
        print(f"{r['provider']:22} {r['mode']:8} {r['shape']:6} {f(r['tokens_per_s'])} {f(r['speedup_vs_hf'], 7)} "
              f"{f(r['tokens_per_step'])} {f(r['acceptance_rate'], 7)} {f(r['valid_frac'], 6)} "
              f"{f(r['complete_frac'])} {f(r['same_as_hf'], 6)}")


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
    p.add_argument("--workload", default="grounded", choices=("grounded", "structured"),
                   help="grounded (default): repeat/edit/summarise a given text; structured: extract fields from "
                        "a passage into a JSON schema, HF + xgrammar against specdec + grammar, in rounds "
                        "(writes e2e_structured_<device>.csv; --providers from " + ",".join(STRUCT_PROVIDERS) + ")")
    p.add_argument("--rounds", type=int, default=None,
                   help="structured workload: interleaved rounds per configuration (default 3, --quick 1)")
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
    if args.workload == "structured":
        return structured(args, device)
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
