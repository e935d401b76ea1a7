"""End to end: block verification against token verification (``generate(verify_method=...)``).

Block verification (Sun et al., ICLR 2025) differs from token verification only when the drafts
come with their probabilities, so the drafter here is a sampled one: the early-exit drafter (the
target's first layers and its head) or, with ``--assistant``, a smaller model, at temperature 1 by
default, fixed K, chains (no trees: tree steps use tree verification). The two methods alternate
prompt by prompt within each round, so a slow spell of a shared machine hits both; each row is
a method's total over every prompt and round.

Rows ``op=e2e_verify_method``: ``tokens_per_s`` (generated tokens / wall time, after a device
synchronisation), ``acceptance_rate``, ``tokens_per_step`` (emitted tokens per target forward) and
``accepted_per_step`` (accepted drafts per row step), the number block verification raises.

    python benchmarks/bench_block.py --threads 2          # SmolLM2-135M, 8 prompts x 3 rounds
    python benchmarks/bench_block.py --quick              # 2 prompts, 8 tokens
"""
from __future__ import annotations

import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks import harness as H

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle stays upright while moving.",
    "Describe the water cycle to a ten-year-old.",
    "List five tips for writing clear documentation, with one sentence each.",
    "What are the main differences between a list and a tuple in Python?",
    "Summarise the plot of a heist film in a paragraph.",
    "Give a recipe for a simple vegetable soup.",
    "Why do leaves change colour in autumn?",
]


def main(argv=None) -> int:
    p = H.make_parser("bench_block", "generate with block vs token verification (sampled drafter)")
    p.add_argument("--target", default=None, help="target model (default: the embedded SmolLM2-135M)")
    p.add_argument("--assistant", default=None, help="a smaller drafter model (default: early exit)")
    p.add_argument("--early-exit-layers", type=int, default=None, help="default: a quarter of the target's")
    p.add_argument("--draft-tokens", type=int, default=4)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = H.apply_common(args)
    from specdec.generator import SpeculativeGenerator

    if args.quick:
        args.prompts, args.max_new_tokens, args.rounds = 2, 8, 1
    drafter = args.assistant or "early-exit"
    gen = SpeculativeGenerator.from_pretrained(args.target, drafter, device=device, quantization="none",
                                               num_draft_tokens=args.draft_tokens, adaptive=False, tree=False,
                                               early_exit_layers=args.early_exit_layers)
    prompts = (PROMPTS * (1 + args.prompts // len(PROMPTS)))[: args.prompts]
    methods = ("token", "block")
    totals = {m: dict(tokens=0, time=0.0, accepted=0, drafted=0, steps=0, row_steps=0) for m in methods}
    gen.generate(prompts[:1], max_new_tokens=4, temperature=args.temperature, seed=args.seed)  # warm-up
    work = [(r, i) for r in range(args.rounds) for i in range(len(prompts))]
    for r, i in H.progress(work, desc="token vs block", total=len(work)):
        order = methods if (r + i) % 2 == 0 else methods[::-1]
        for m in order:
            t0 = time.perf_counter()
            res = gen.generate([prompts[i]], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               seed=args.seed + 1000 * r + i, verify_method=m)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            s, t = res.stats, totals[m]
            t["tokens"] += s.generated_tokens
            t["time"] += dt
            t["accepted"] += s.accepted_tokens
            t["drafted"] += s.drafted_tokens
            t["steps"] += s.target_steps
            t["row_steps"] += s.row_steps
    env = H.env_info(device)
    path = H.csv_path(args, "e2e_block")
    label = f"{drafter} K={args.draft_tokens} T={args.temperature} prompts={len(prompts)} " \
            f"new={args.max_new_tokens} rounds={args.rounds}"
    with H.CsvWriter(path, env, extra_columns=["accepted_per_step", "model"]) as csv:
        for m in methods:
            t = totals[m]
            csv.add(op="e2e_verify_method", provider=m, shape=H.shape_str(B=1, K=args.draft_tokens), dtype="fp32",
                    timing=None, tokens_per_s=t["tokens"] / t["time"],
                    acceptance_rate=t["accepted"] / max(t["drafted"], 1),
                    tokens_per_step=t["tokens"] / max(t["steps"], 1),
                    accepted_per_step=t["accepted"] / max(t["row_steps"], 1), model=label,
                    note="methods alternate prompt by prompt; totals over prompts and rounds")
        rows = csv.rows
    print(f"wrote {path}")
    for row in rows:
        print(f"{row['provider']:>6}: {float(row['tokens_per_s']):6.2f} tokens/s, acceptance "
              f"{float(row['acceptance_rate']):.3f}, {float(row['accepted_per_step']):.3f} accepted drafts per step, "
              f"{float(row['tokens_per_step']):.3f} tokens per target forward")
    return 0


if __name__ == "__main__":
    sys.exit(main())
