"""Shared benchmark harness: timing, CSV rows, plots, copy bandwidth, environment info.

Every script in ``benchmarks/`` uses the same few functions, so their CSVs have the same columns
and their numbers are taken the same way:

    from benchmarks import harness as H

    parser = H.make_parser("bench_cache", "what it measures")   # --out --quick --device --runs ...
    args = parser.parse_args(argv)
    env = H.env_info(args.device)                      # device name, versions, git commit
    copy = H.copy_bandwidth(args.device)               # GB/s, bytes read + written
    with H.CsvWriter(H.csv_path(args, "cache"), env) as csv:
        for shape in H.progress(shapes, desc="cache"):
            t = H.bench(lambda: op(...), device=args.device, runs=args.runs)
            csv.add(op="cache.append", provider="cpp", shape=H.shape_str(B=8, T=512), dtype="bf16",
                    timing=t, bytes=nbytes, copy_gb_per_s=copy)   # gb_per_s derived from bytes
    H.plot_bars(rows, H.png_path(args, "cache"), ...)  # or plot from the CSV later: H.read_csv

Timing (``bench``): a warm-up (count and time), then ``runs`` timed calls (or fewer when
``max_time_s`` runs out, never fewer than ``min_runs``), each timed on its own: CUDA events on
GPU (synchronised once at the end, so no host sync between the calls is measured), the
monotonic ``time.perf_counter_ns`` on CPU. Reports the median and the 20th/80th percentiles in
milliseconds. On a shared machine the median is the number to quote; p20..p80 shows the noise.

CSV columns (``COLUMNS``; empty where a column does not apply):
    op, provider, shape, dtype, median_ms, p20_ms, p80_ms, runs, bytes, gb_per_s,
    copy_gb_per_s, frac_of_copy, tokens_per_s, acceptance_rate, tokens_per_step, note,
    device, torch, triton, transformers, git_commit, timestamp
plus any script-specific ``extra_columns`` after ``note``.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

__all__ = [
    "COLUMNS", "Timing", "bench", "time_once", "sync", "copy_bandwidth", "env_info", "device_name",
    "git_commit", "CsvWriter", "read_csv", "plot_bars", "plot_lines", "progress", "make_parser",
    "csv_path", "png_path", "shape_str", "dtype_str", "parse_dtype", "ProviderUnavailable", "fail",
    "note", "RESULTS_DIR",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"

COLUMNS = [
    "op", "provider", "shape", "dtype", "median_ms", "p20_ms", "p80_ms", "runs", "bytes",
    "gb_per_s", "copy_gb_per_s", "frac_of_copy", "tokens_per_s", "acceptance_rate",
    "tokens_per_step", "note",
]
ENV_COLUMNS = ["device", "torch", "triton", "transformers", "git_commit", "timestamp"]


class ProviderUnavailable(RuntimeError):
    """A provider the user explicitly asked for cannot run here (the script exits non-zero)."""


def fail(message: str, code: int = 2):
    """Print a clear error on stderr and exit non-zero."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def note(message: str):
    """Print a note (skipped providers and the like) on stderr, so it shows above progress bars."""
    print(f"note: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# timing


@dataclass
class Timing:
    """Times of one benchmark in milliseconds: median, 20th and 80th percentile, number of runs."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int
    samples_ms: list = field(default_factory=list, repr=False)

    @property
    def median_s(self) -> float:
        return self.median_ms * 1e-3


def _percentile(sorted_vals: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of already sorted values."""
    if not sorted_vals:
        return float("nan")
    pos = (len(sorted_vals) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def timing_from_samples(samples_ms: Sequence[float]) -> Timing:
    s = sorted(samples_ms)
    return Timing(statistics.median(s), _percentile(s, 20), _percentile(s, 80), len(s), list(samples_ms))


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device):
    if _is_cuda(device):
        torch.cuda.synchronize(torch.device(device))


def bench(
    fn: Callable[[], object],
    *,
    device="cpu",
    runs: int = 50,
    warmup: int = 3,
    warmup_s: float = 0.05,
    min_runs: int = 5,
    max_time_s: float = 10.0,
    setup: Optional[Callable[[], object]] = None,
) -> Timing:
    """Time ``fn()`` (no arguments): warm-up, then up to ``runs`` individually timed calls.

    ``warmup`` calls and at least ``warmup_s`` seconds of calls are run first (compilation,
    allocator and cache warm-up). The timed loop stops after ``runs`` calls or once ``max_time_s``
    is spent, whichever comes first, but never before ``min_runs`` calls. ``setup()``, if given,
    runs before each call outside the timed region (e.g. to reset a cache's lengths).
    On CUDA each call is bracketed by CUDA events and the host synchronises once at the end.
    """
    cuda = _is_cuda(device)
    t_end = time.perf_counter() + warmup_s
    n = 0
    while n < warmup or time.perf_counter() < t_end:
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        n += 1
        if n >= 1000 or (n == 1 and not cuda and time.perf_counter() - t0 > max_time_s / 4):
            break  # a slow call (seconds) needs no more warm-up than its first run
    sync(device)
    samples = []
    start_all = time.perf_counter()
    if cuda:
        events = []
        for i in range(max(runs, min_runs)):
            if setup is not None:
                setup()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            events.append((a, b))
            if i + 1 >= min_runs and time.perf_counter() - start_all > max_time_s:
                break
        torch.cuda.synchronize()
        samples = [a.elapsed_time(b) for a, b in events]
    else:
        for i in range(max(runs, min_runs)):
            if setup is not None:
                setup()
            t0 = time.perf_counter_ns()
            fn()
            samples.append((time.perf_counter_ns() - t0) * 1e-6)
            if i + 1 >= min_runs and time.perf_counter() - start_all > max_time_s:
                break
    return timing_from_samples(samples)


def time_once(fn: Callable[[], object], device="cpu") -> float:
    """Wall-clock seconds of one call of ``fn()``, synchronising the device before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# copy bandwidth (the floor for memory-bound ops)

_COPY_CACHE: dict = {}


def copy_bandwidth(device="cpu", nbytes: Optional[int] = None, runs: int = 20) -> float:
    """Measured copy bandwidth of ``device`` in GB/s (1e9 bytes), counting bytes read + written.

    ``dst.copy_(src)`` of two ``nbytes`` buffers (default 256 MiB on CPU, well past any L3; 1 GiB
    on GPU), median of ``runs`` copies. A memory-bound op that reads R bytes and writes W bytes
    cannot beat (R + W) / this. Cached per (device, nbytes) for the process.
    """
    dev = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 30) if dev.type == "cuda" else (256 << 20)
    key = (str(dev), nbytes)
    if key not in _COPY_CACHE:
        n = nbytes // 4
        src = torch.rand(n, device=dev)
        dst = torch.empty_like(src)
        t = bench(lambda: dst.copy_(src), device=dev, runs=runs, warmup=2, min_runs=3, max_time_s=5.0)
        _COPY_CACHE[key] = 2 * n * 4 / t.median_s / 1e9
        del src, dst
    return _COPY_CACHE[key]


# ---------------------------------------------------------------------------------------------
# environment


def device_name(device="cpu") -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def git_commit(short: bool = True) -> str:
    """The repository's HEAD commit (with '+dirty' when tracked files differ), or 'unknown'."""
    root = Path(__file__).resolve().parent.parent
    try:
        cmd = ["git", "rev-parse"] + (["--short"] if short else []) + ["HEAD"]
        rev = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return "unknown"
        commit = rev.stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "specdec", "kernels", "csrc"],
                               cwd=root, capture_output=True, timeout=10)
        return commit + ("+dirty" if dirty.returncode == 1 else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(mod: str) -> str:
    try:
        import importlib.metadata as md

        return md.version(mod)
    except Exception:
        return ""


def env_info(device="cpu") -> dict:
    """Values of the environment columns: device name, torch/triton/transformers, commit, time."""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "git_commit": git_commit(),
        "timestamp": _dt.datetime.now().isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------
# CSV


def shape_str(**dims) -> str:
    """'B=8 K=4 V=151936' from keyword dimensions (kept in the order given)."""
    return " ".join(f"{k}={v}" for k, v in dims.items())


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp64": torch.float64}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; use one of fp32, bf16, fp16")


def dtype_str(dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
            torch.float64: "fp64"}.get(dtype, str(dtype))


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.6g}"
    return str(v)


class CsvWriter:
    """Writes benchmark rows to ``path`` (written as ``path.<pid>.tmp`` then renamed on close, so a
    crashed run never leaves a half CSV under the final name; rows are flushed as they come).

    ``add(op=, provider=, shape=, dtype=, timing=Timing|None, bytes=, copy_gb_per_s=, ...)``:
    ``gb_per_s`` is derived from ``bytes`` and the median when not given, ``frac_of_copy`` from
    ``gb_per_s`` and ``copy_gb_per_s``. Unknown keywords must be in ``extra_columns``.
    ``rows`` keeps every row added (dicts of formatted strings), for plotting.
    """

    def __init__(self, path, env: dict, extra_columns: Sequence[str] = ()):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.columns = COLUMNS[:-1] + list(extra_columns) + ["note"] + ENV_COLUMNS
        # per-process temporary name: two runs writing the same CSV never share (or steal) a file
        self._tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        self._f = open(self._tmp, "w", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=self.columns)
        self._w.writeheader()
        self._f.flush()
        self.rows: list = []

    def add(self, *, op: str, provider: str, shape: str = "", dtype: str = "",
            timing: Optional[Timing] = None, **values) -> dict:
        row = {"op": op, "provider": provider, "shape": shape, "dtype": dtype}
        if timing is not None:
            row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                       runs=timing.runs)
        unknown = set(values) - set(self.columns)
        if unknown:
            raise KeyError(f"unknown CSV columns {sorted(unknown)}; declare them in extra_columns")
        row.update(values)
        if row.get("gb_per_s") is None and row.get("bytes") and timing is not None and timing.median_ms > 0:
            row["gb_per_s"] = row["bytes"] / timing.median_s / 1e9
        if row.get("frac_of_copy") is None and row.get("gb_per_s") and row.get("copy_gb_per_s"):
            row["frac_of_copy"] = row["gb_per_s"] / row["copy_gb_per_s"]
        row.update(self.env)
        out = {k: _fmt(row.get(k)) for k in self.columns}
        self._w.writerow(out)
        self._f.flush()
        self.rows.append(out)
        return out

    def close(self):
        if not self._f.closed:
            self._f.close()
            os.replace(self._tmp, self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def read_csv(path) -> list:
    """Rows of a benchmark CSV as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


# ---------------------------------------------------------------------------------------------
# plots


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except Exception as exc:  # plotting is optional: the CSV is the result
        note(f"matplotlib unavailable ({exc}); no PNG written")
        return None


def plot_bars(rows: Sequence[dict], path, *, value: str = "median_ms", group: str = "shape",
              series: str = "provider", title: str = "", ylabel: str = "", log: bool = False,
              hlines: Optional[dict] = None, filter: Optional[Callable[[dict], bool]] = None) -> Optional[Path]:
    """Grouped bar chart: one group per distinct ``group`` value (x axis), one bar per ``series``.

    ``hlines`` = {label: y} draws horizontal reference lines (e.g. the copy bandwidth).
    Returns the PNG path, or None when matplotlib is missing or there is nothing to plot.
    """
    rows = [r for r in rows if (filter is None or filter(r)) and not math.isnan(_num(r.get(value)))]
    if not rows:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    groups = list(dict.fromkeys(r[group] for r in rows))
    names = list(dict.fromkeys(r[series] for r in rows))
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.18 * len(groups) * max(1, len(names)) + 3)), 5.0))
    for i, name in enumerate(names):
        ys = []
        for g in groups:
            vals = [_num(r[value]) for r in rows if r[group] == g and r[series] == name]
            ys.append(vals[0] if vals else float("nan"))
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(groups))]
        ax.bar(xs, ys, width=width, label=name)
    for label, y in (hlines or {}).items():
        ax.axhline(y, linestyle="--", color="k", linewidth=1)
        ax.annotate(label, (len(groups) - 0.5, y), ha="right", va="bottom", fontsize=8)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel or value)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_lines(rows: Sequence[dict], path, *, x: str, value: str, series: str = "provider",
               title: str = "", xlabel: str = "", ylabel: str = "", logx: bool = False,
               logy: bool = False, hlines: Optional[dict] = None,
               filter: Optional[Callable[[dict], bool]] = None) -> Optional[Path]:
    """Line plot of ``value`` against the numeric column ``x``, one line per ``series``."""
    rows = [r for r in rows if (filter is None or filter(r)) and not math.isnan(_num(r.get(value)))]
    if not rows:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name in dict.fromkeys(r[series] for r in rows):
        pts = sorted((_num(r[x]), _num(r[value])) for r in rows if r[series] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    for label, y in (hlines or {}).items():
        ax.axhline(y, linestyle="--", color="k", linewidth=1, label=label)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or value)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# progress, arguments, paths


def progress(iterable: Iterable, desc: str = "", total: Optional[int] = None, disable: Optional[bool] = None):
    """A tqdm progress bar on stderr, only when stderr is a terminal: piped to a log, its
    carriage-return updates would fill it (plain iteration then, when tqdm is missing, or with
    ``disable`` / SPECDEC_BENCH_NO_PROGRESS=1)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    if disable is None:
        disable = os.environ.get("SPECDEC_BENCH_NO_PROGRESS") == "1" or not sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, disable=disable, dynamic_ncols=True, leave=False)


def select_providers(requested: Optional[str], default: Sequence[str], known: Sequence[str],
                     status: Callable[[str], tuple], where: str = "") -> list:
    """The providers to run: ``requested`` (a comma list from ``--providers``) or ``default``.

    ``status(name) -> (ok, why)``. A provider the user asked for by name that cannot run here is an
    error (exit 2); one from the defaults is skipped with a note. No runnable provider is an error.
    """
    explicit = requested is not None
    out = []
    for name in [p for p in (requested.split(",") if explicit else default) if p]:
        if name not in known:
            fail(f"unknown provider {name!r}; use {', '.join(known)}")
        ok, why = status(name)
        if ok:
            out.append(name)
        elif explicit:
            fail(f"provider {name!r} was asked for but is unavailable{where}: {why}")
        else:
            note(f"skipping provider {name}: {why}")
    if not out:
        fail("no provider can run")
    return out


def specdec_status(backend: str, device, op: str) -> tuple:
    """(available, reason) of specdec's ``cpp`` or ``triton`` backend for ``op`` on ``device``."""
    from specdec import ops

    device = torch.device(device)
    if backend == "cpp":
        if device.type != "cpu":
            return False, "the C++ kernels run on CPU tensors"
        ok, why = ops.backends()["cpp"]
        if ok and not hasattr(torch.ops.specdec_cpp, op):
            return False, f"specdec._C loaded but has no {op} kernel (torch.ops.specdec_cpp.{op})"
        return ok, why
    if backend == "triton":
        if device.type != "cuda":
            return False, "the Triton kernels need a CUDA device (interpreter timings are meaningless)"
        return ops.backends()["triton"]
    return False, f"unknown specdec backend {backend!r}"


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark script shares:
    ``--out DIR`` (default benchmarks/results), ``--quick`` (a small subset: seconds),
    ``--device`` (cpu, cuda, cuda:1; default cpu), ``--runs N`` (timed calls per
    measurement), ``--max-time S`` (seconds per measurement at most), ``--tag`` (suffix of the
    output file names, e.g. the machine), ``--no-plot``, ``--threads N`` (torch CPU threads).
    """
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--out", default=str(RESULTS_DIR), help="output directory (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a small subset that runs in seconds")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: %(default)s)")
    p.add_argument("--runs", type=int, default=None, help="timed calls per measurement")
    p.add_argument("--max-time", type=float, default=None, help="seconds per measurement at most")
    p.add_argument("--tag", default="", help="suffix of output file names (e.g. h100)")
    p.add_argument("--no-plot", action="store_true", help="write the CSV only")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return p


def apply_common(args):
    """Apply ``--threads`` and check ``--device``; call right after ``parse_args``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {args.device} asked for, but torch sees no CUDA device")
    return dev


def _stem(args, subject: str) -> str:
    tag = getattr(args, "tag", "") or ""
    dev = torch.device(getattr(args, "device", "cpu")).type
    return f"{subject}_{dev}" + (f"_{tag}" if tag else "") + ("_quick" if getattr(args, "quick", False) else "")


def csv_path(args, subject: str) -> Path:
    """``<out>/<subject>_<cpu|cuda>[_<tag>][_quick].csv``."""
    return Path(args.out) / (_stem(args, subject) + ".csv")


def png_path(args, subject: str, suffix: str = "") -> Path:
    return Path(args.out) / (_stem(args, subject) + suffix + ".png")
