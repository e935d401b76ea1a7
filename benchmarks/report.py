"""Markdown tables from benchmark CSVs (for the README's results section).

    python benchmarks/report.py                       # every known CSV in benchmarks/results/
    python benchmarks/report.py benchmarks/results/verify_cpu.csv
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness as H


def _f(v, fmt=None):
    try:
        x = float(v)
    except (TypeError, ValueError):
        return "–"
    if x != x:
        return "–"
    if fmt is None:  # milliseconds: 3 significant digits, no exponent
        fmt = "{:.0f}" if abs(x) >= 100 else "{:.1f}" if abs(x) >= 10 else "{:.2f}" if abs(x) >= 1 else "{:.3f}"
    return fmt.format(x)


def _table(header, rows):
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _machine(rows):
    r = rows[0]
    return (f"{r['device']}, torch {r['torch']}, triton {r['triton'] or '–'}, commit {r['git_commit']}, "
            f"{r['timestamp'][:10]}")


def kernel_tables(rows, op):
    """One table per (mode, dtype): median ms per provider, plus GB/s and x copy of the fastest specdec provider."""
    parts = []
    copy = rows[0].get("copy_gb_per_s")
    parts.append(f"Machine: {_machine(rows)}; measured copy bandwidth {_f(copy, '{:.1f}')} GB/s (read + write).\n")
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    ours = [p for p in ("cpp", "triton") if p in providers]
    for mode in dict.fromkeys(r["mode"] for r in rows):
        for dt in dict.fromkeys(r["dtype"] for r in rows):
            sel = [r for r in rows if r["mode"] == mode and r["dtype"] == dt]
            if not sel:
                continue
            header = ["shape"] + [f"{p} ms" for p in providers]
            for p in ours:
                header += [f"{p} GB/s", f"{p} x copy"]
                if "reference" in providers:
                    header.append(f"{p} vs reference")
                if "torch_fp32" in providers:
                    header.append(f"{p} vs torch fp32")
            body = []
            for shape in dict.fromkeys(r["shape"] for r in sel):
                by = {r["provider"]: r for r in sel if r["shape"] == shape}
                line = [shape] + [_f(by[p]["median_ms"]) if p in by and by[p]["median_ms"] else "–" for p in providers]
                for p in ours:
                    r = by.get(p, {})
                    line += [_f(r.get("gb_per_s"), "{:.2f}"), _f(r.get("frac_of_copy"), "{:.2f}")]
                    ref, tf = by.get("reference", {}), by.get("torch_fp32", {})
                    if "reference" in providers:
                        line.append(_f(float(ref["median_ms"]) / float(r["median_ms"]), "{:.0f}x")
                                    if ref.get("median_ms") and r.get("median_ms") else "–")
                    if "torch_fp32" in providers:
                        line.append(_f(float(tf["median_ms"]) / float(r["median_ms"]), "{:.1f}x")
                                    if tf.get("median_ms") and r.get("median_ms") else "–")
                body.append(line)
            parts.append(f"**{op}, {mode}, {dt} logits** (median ms; – = not run, see the CSV's note)\n")
            parts.append(_table(header, body) + "\n")
    return "\n".join(parts)


def e2e_tables(rows):
    parts = [f"Machine: {_machine(rows)}; model {rows[0].get('model', '')}.\n"]
    e2e = [r for r in rows if r["op"] == "e2e"]
    header = ["provider", "batch", "mode", "weights", "K", "tokens/s", "acceptance", "tokens/step",
              "vs HF plain B=1", "vs HF prompt lookup", "note"]
    body = []
    for r in e2e:
        body.append([r["provider"], r["batch"], r["mode"], r["dtype"], r["draft_tokens"], _f(r["tokens_per_s"], "{:.1f}"),
                     _f(r["acceptance_rate"], "{:.2f}"), _f(r["tokens_per_step"], "{:.2f}"),
                     _f(r["speedup_vs_hf"], "{:.2f}x"), _f(r["speedup_vs_hf_prompt_lookup"], "{:.2f}x"),
                     r["note"].split(";")[0] if "failed" in r["note"] or "padded" in r["note"] else ""])
    parts.append(_table(header, body) + "\n")
    cost = [r for r in rows if r["op"] == "target_forward"]
    if cost:
        batches = list(dict.fromkeys(r["batch"] for r in cost))
        qs = list(dict.fromkeys(int(r["draft_tokens"]) + 1 for r in cost))
        header = ["batch"] + [f"q={q} (K={q - 1})" for q in qs]
        body = []
        for b in batches:
            by = {int(r["draft_tokens"]) + 1: r for r in cost if r["batch"] == b}
            body.append([b] + [f"{_f(by[q]['median_ms'], '{:.1f}')} ms ({_f(by[q]['cost_ratio'], '{:.2f}')}x)"
                               if q in by else "–" for q in qs])
        parts.append("**Cost of one cached target forward over q tokens** (median ms, ratio to q=1)\n")
        parts.append(_table(header, body) + "\n")
    return "\n".join(parts)


def structured_table(rows):
    """bench_e2e.py --workload structured: one line per provider, mode and batch."""
    header = ["provider", "mode", "batch", "tokens/s", "vs (a) (range)", "tokens per target forward", "acceptance",
              "valid JSON", "complete", "greedy = (a)"]
    body = []
    for r in rows:
        ratio = (f"{_f(r['speedup_vs_hf'], '{:.2f}x')} ({_f(r['ratio_min'], '{:.2f}')}-{_f(r['ratio_max'], '{:.2f}')})"
                 if r["speedup_vs_hf"] else "–")
        body.append([r["provider"], r["mode"], r["batch"], _f(r["tokens_per_s"], "{:.1f}"), ratio,
                     _f(r["tokens_per_step"], "{:.2f}"), _f(r["acceptance_rate"], "{:.2f}"),
                     _f(r["valid_frac"], "{:.2f}"), _f(r["complete_frac"], "{:.2f}"), _f(r["same_as_hf"], "{:.2f}")])
    return f"Machine: {_machine(rows)}; model {rows[0].get('model', '')}.\n\n" + _table(header, body) + "\n"


def report(path) -> str:
    rows = H.read_csv(path)
    if not rows:
        return ""
    op = rows[0]["op"]
    title = f"### {Path(path).name}\n\n"
    if op in ("verify", "sample"):
        return title + kernel_tables(rows, op)
    if op in ("e2e", "target_forward"):
        return title + e2e_tables(rows)
    if op == "e2e_structured":
        return title + structured_table(rows)
    header = ["op", "provider", "shape", "dtype", "median ms", "GB/s", "x copy", "note"]
    body = [[r["op"], r["provider"], r["shape"], r["dtype"], _f(r["median_ms"]), _f(r["gb_per_s"], "{:.2f}"),
             _f(r["frac_of_copy"], "{:.2f}"), r["note"]] for r in rows]
    return title + f"Machine: {_machine(rows)}.\n\n" + _table(header, body) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    paths = argv or sorted(str(p) for p in H.RESULTS_DIR.glob("*.csv") if not p.name.endswith("_quick.csv"))
    for p in paths:
        print(report(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
