"""How many compiled variants of each Triton kernel a serving loop needs.

Triton compiles one variant per distinct (constexpr values, argument dtypes, integer
specialisation: == 1, divisible by 16, fits int32; alignment of pointers) unless an integer
argument is marked ``do_not_specialize``. The adaptive draft width changes K at every step and the
batch shrinks as rows finish, so the launchers bucket what derives from B and K and mark those
integers ``do_not_specialize``. This test records every launch over a sweep of B and K, as a
132-SM GPU would see it (on the meta device: nothing runs), and bounds the variants.
"""
import inspect

import pytest
import torch
import triton.language as tl

import specdec.kernels.sample as ksample
import specdec.kernels.thresholds as kthresholds
import specdec.kernels.verify as kverify

V = 151936
BATCHES = [1, 2, 3, 5, 8, 13, 16, 31, 32, 64, 100, 128, 200, 256]
DRAFTS = range(1, 9)
MAX_VARIANTS = 8  # per kernel, per (logits dtype, draft probs or not, top-k/top-p or not)


class Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch's variant key."""

    def __init__(self, kernel):
        fn = self.kernel_fn = kernel.fn
        params = list(inspect.signature(fn).parameters.values())
        self.name = fn.__name__
        self.names = [p.name for p in params]
        self.constexpr = {p.name for p in params if p.annotation is tl.constexpr}
        dns = getattr(kernel, "do_not_specialize", None)
        if dns is None:  # the interpreter's InterpretedFunction keeps jit's keyword arguments
            dns = getattr(kernel, "kwargs", {}).get("do_not_specialize", [])
        self.dns = {self.names[d] if isinstance(d, int) else d for d in dns}
        self.keys = {}

    def __getitem__(self, grid):
        return self.launch

    def launch(self, *args, **kwargs):
        key = []
        for name, a in zip(self.names, args):
            if isinstance(a, torch.Tensor):
                key.append((name, str(a.dtype)))
            elif isinstance(a, bool) or name in self.constexpr:
                key.append((name, a))
            elif isinstance(a, int):
                i32 = -(2**31) <= a < 2**31
                key.append((name, i32) if name in self.dns else (name, a == 1, a % 16 == 0, i32))
        key.append(tuple(sorted(kwargs.items())))
        self.keys.setdefault(self.group, set()).add(tuple(key))


KERNELS = ["softmax_stats_kernel", "_sample_probs_kernel", "_sample_finish_kernel"]
VERIFY_KERNELS = ["_verify_accept_race_kernel", "_verify_finish_kernel", "_sample_compare_kernel"]
THRESHOLD_KERNELS = ["_thresholds_kernel"]  # top-k / top-p thresholds (filtered launches only)


@pytest.fixture
def recorders(monkeypatch):
    recs = {name: Recorder(getattr(ksample, name)) for name in KERNELS}
    recs.update({name: Recorder(getattr(kverify, name)) for name in VERIFY_KERNELS})
    recs.update({name: Recorder(getattr(kthresholds, name)) for name in THRESHOLD_KERNELS})
    for name, rec in recs.items():
        for module in (ksample, kverify, kthresholds):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, rec)
    monkeypatch.setattr(ksample, "_sm_count", lambda device: 132)
    return recs


def test_variants_over_a_sweep_of_batch_and_drafts(recorders):
    dev = "meta"
    for dtype in (torch.float32, torch.bfloat16):
        for has_q in (False, True):
            for filtered in (False, True):
                group = (str(dtype), has_q, filtered)
                for rec in recorders.values():
                    rec.group = group
                for B in BATCHES:
                    t = torch.empty(B, device=dev)
                    seed = torch.empty(B, dtype=torch.int64, device=dev)
                    tp = torch.empty(B, device=dev) if filtered else None
                    for K in DRAFTS:
                        logits = torch.empty(B, K + 1, V, dtype=dtype, device=dev)
                        drafts = torch.empty(B, K, dtype=torch.int64, device=dev)
                        q = torch.empty(B, K, V, device=dev) if has_q else None
                        kverify.verify(logits, drafts, q, t, None, tp, seed, seed)
                    if not has_q:
                        ksample.sample(torch.empty(B, V, dtype=dtype, device=dev), t, None, tp, seed, seed)
    report = {name: max(len(v) for v in rec.keys.values()) for name, rec in recorders.items() if rec.keys}
    assert set(report) == set(KERNELS + VERIFY_KERNELS + THRESHOLD_KERNELS)
    for name, n in report.items():
        assert n <= MAX_VARIANTS, f"{name}: {n} compiled variants per (dtype, probs, filter) over the sweep"


def test_the_recorder_sees_specialisation(recorders):
    """The recorder itself: without do_not_specialize, K would split variants (K = 1, K = 16)."""
    rec = recorders["_sample_compare_kernel"]
    rec.group = "x"
    rec.dns = set()
    for K in (1, 2, 3, 16):
        rec.launch(None, None, None, None, K, BLOCK_K1=8)
    assert len(rec.keys["x"]) == 3


def test_production_splits_compile_for_sm90(recorders, tmp_path):
    """The launch configurations that B = 8/64/256, K = 4, V = 151936 select on a 132-SM GPU (the
    vocabulary splits, bucketed tiles) compile for sm_90 with the interpreter off
    (tests/triton_compile.py): the interpreter alone would not catch a configuration the compiler
    rejects."""
    import json

    from triton_compile import compile_in_child, describe_launch

    launches = {}
    for rec in recorders.values():
        rec.group = "prod"

        def describe(*args, _fn=rec.kernel_fn, _launch=rec.launch, **kwargs):
            launches[json.dumps(describe_launch(_fn, args, kwargs), sort_keys=True, default=str)] = 1
            return _launch(*args, **kwargs)

        rec.launch = describe
    dev = "meta"
    for dtype in (torch.float32, torch.bfloat16):
        for B in (8, 64, 256):
            K = 4
            t = torch.empty(B, device=dev)
            seed = torch.empty(B, dtype=torch.int64, device=dev)
            logits = torch.empty(B, K + 1, V, dtype=dtype, device=dev)
            drafts = torch.empty(B, K, dtype=torch.int64, device=dev)
            for q in (None, torch.empty(B, K, V, device=dev)):
                for tp in (None, torch.empty(B, device=dev)):
                    kverify.verify(logits, drafts, q, t, None, tp, seed, seed)
            ksample.sample(logits[:, 0], t, None, None, seed, seed)
    assert len(launches) >= 10
    ok, out = compile_in_child([json.loads(k) for k in launches], tmp_path)
    assert ok, out
