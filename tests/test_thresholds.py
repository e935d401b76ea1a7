"""``filter_thresholds`` (kernels/thresholds.py): the top-k / top-p keep threshold found by a Triton
multi-pivot search, held to ``specdec.reference._keep_mask`` (the specification) exactly: the keep
mask ``finite(x) & (x >= thr)`` must equal the reference's mask of ``logits.double() / T``, token
for token. The sort-based torch implementation it replaced is kept here as a second oracle.

Without a GPU the kernel runs on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set
before triton is imported, in conftest.py), so sizes stay small.
"""
import pytest
import torch
from conftest import triton_device

DEV = triton_device()  # skips this file where Triton cannot run

from specdec import reference  # noqa: E402
from specdec.kernels import sample as ksample  # noqa: E402
from specdec.kernels import thresholds as kthr  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _sort_thresholds(logits, temperature, top_k, top_p):
    """The replaced implementation (torch sort + float64 softmax/cumsum): a second oracle."""
    N, V = logits.shape
    x = logits.float()
    x = torch.where(torch.isfinite(x), x, torch.full_like(x, float("-inf")))
    sorted_vals = x.sort(dim=-1, descending=True).values
    thr = torch.full((N,), float("-inf"), dtype=torch.float32, device=logits.device)
    if top_k is not None:
        k = top_k.to(torch.int64)
        use_k = (k > 0) & (k < V)
        kth = sorted_vals.gather(1, (torch.where(use_k, k, torch.ones_like(k)) - 1)[:, None])
        thr = torch.where(use_k, kth.squeeze(1), thr)
    if top_p is not None:
        p = top_p.double()
        use_p = p < 1.0
        t = temperature.double()
        t = torch.where(t <= 0, torch.ones_like(t), t)
        kept = torch.where(sorted_vals >= thr[:, None], sorted_vals, float("-inf"))
        cum = torch.softmax(kept.double() / t[:, None], dim=-1).cumsum(dim=-1)
        n = (cum < p[:, None]).sum(dim=-1, keepdim=True) + 1
        n = torch.minimum(n, (kept > float("-inf")).sum(dim=-1, keepdim=True).clamp(min=1))
        thr = torch.where(use_p, kept.gather(1, n - 1).squeeze(1), thr)
    return thr


def _mask(logits, thr):
    x = logits.float()
    return torch.isfinite(x) & (x >= thr[:, None])


def _reference_mask(logits, temperature, top_k, top_p):
    """reference._keep_mask of the cleaned float64 logits / T (T <= 0 -> 1), per row."""
    N, V = logits.shape
    t = temperature.double()
    t = torch.where(t <= 0, torch.ones_like(t), t)
    k = top_k if top_k is not None else torch.zeros(N, dtype=torch.int64)
    p = top_p if top_p is not None else torch.ones(N, dtype=torch.float32)
    return reference._keep_mask(reference._clean(logits.cpu()) / t.cpu()[:, None], k.cpu(), p.cpu())


def check(logits, temperature, top_k, top_p, group=1, block_v=None):
    """Thresholds of the kernel; asserts that their mask is the reference's (and the sort's)."""
    dev_args = [None if a is None else a.to(DEV) for a in (logits, temperature, top_k, top_p)]
    thr = kthr.filter_thresholds(*dev_args, group=group, block_v=block_v)
    assert thr.dtype == torch.float32 and thr.shape == (logits.shape[0],)
    thr = thr.cpu()
    rep = lambda a: None if a is None else a.repeat_interleave(group)  # noqa: E731
    args = (logits, rep(temperature), rep(top_k), rep(top_p))
    mine = _mask(logits, thr)
    ref = _reference_mask(*args)
    bad = (mine != ref).any(dim=1).nonzero().flatten().tolist()
    assert not bad, f"rows {bad}: kept {mine.sum(1)[bad].tolist()}, reference {ref.sum(1)[bad].tolist()}"
    assert torch.equal(_mask(logits, _sort_thresholds(*args)), ref)
    return thr


def _params(N, V, gen):
    """Mixed per-row parameters: some rows off, k at the extremes, greedy rows."""
    k = torch.randint(-1, V + 2, (N,), generator=gen)
    k[: min(N, 4)] = torch.tensor([1, V - 1, V, 0])[: min(N, 4)]
    p = torch.rand(N, generator=gen, dtype=torch.float64).float()
    p[1::3] = 1.0
    t = torch.rand(N, generator=gen) * 2
    t[2::4] = 0.0
    return t, k, p


@pytest.mark.parametrize("V", [111, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_logits(V, dtype):
    gen = torch.Generator().manual_seed(V)
    N = 10
    x = (torch.randn(N, V, generator=gen) * 4).to(dtype)
    t, k, p = _params(N, V, gen)
    check(x, t, k, p)
    check(x, t, k, None)
    check(x, t, None, p)


def test_float16_and_small_tiles():
    """Many tiles per row (block_v = 16, V not a multiple of it), fp16 logits."""
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(6, 300, generator=gen) * 3).half()
    t, k, p = _params(6, 300, gen)
    check(x, t, k, p, block_v=16)


def test_both_none_is_none_and_empty_shapes():
    x = torch.randn(3, 50, device=DEV)
    t = torch.ones(3, device=DEV)
    assert kthr.filter_thresholds(x, t, None, None) is None
    assert ksample.filter_thresholds(x, t, None, None) is None
    empty = kthr.filter_thresholds(torch.empty(0, 50, device=DEV), t[:0], None, t[:0])
    assert empty.shape == (0,)


def test_many_ties():
    """Logits from a few integer values: the k-th value and top-p's last value have many ties,
    all of which are kept."""
    gen = torch.Generator().manual_seed(2)
    N, V = 12, 300
    x = torch.randint(-3, 3, (N, V), generator=gen).float()
    t, k, p = _params(N, V, gen)
    check(x, t, k, p)
    # k falling inside the run of the largest / second largest value
    counts = (x == x.max(dim=1, keepdim=True).values).sum(1)
    k = torch.where(torch.arange(N) % 2 == 0, counts - 1, counts + 1).clamp(min=1)
    check(x, t, k, None)
    check(x, t, k, p)


def test_top_p_just_below_and_above_a_group_boundary():
    """top_p a hair below / above the exact mass of the first two distinct values: the threshold
    is the second value / the third value (with all their ties)."""
    V = 200
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-4, 2, (4, V), generator=gen).float()
    t = torch.tensor([1.0, 0.5, 2.0, 0.0])
    w = torch.exp((x.double() - x.max(1, keepdim=True).values) / torch.where(t > 0, t, 1.0).double()[:, None])
    top2 = torch.stack([xx.unique(sorted=True)[-2] for xx in x])
    mass = (w * (x >= top2[:, None])).sum(1) / w.sum(1)
    for delta in (-1e-9, 1e-9):
        thr = check(x, t, None, mass + delta)  # float64 top_p: read as it is
        assert bool((thr < top2).all()) == (delta > 0)


def test_top_k_extremes():
    gen = torch.Generator().manual_seed(4)
    V = 111
    x = torch.randn(8, V, generator=gen)
    t = torch.ones(8)
    k = torch.tensor([1, 2, V - 1, V, V + 5, 0, -3, 57])
    thr = check(x, t, k, None)
    assert torch.equal(_mask(x, thr).sum(1), torch.tensor([1, 2, V - 1, V, V, V, V, 57]))
    assert torch.isneginf(thr[3:7]).all()


def test_top_p_extremes():
    gen = torch.Generator().manual_seed(5)
    V = 111
    x = torch.randint(-2, 3, (7, V), generator=gen).float()
    x[:, 5] = 9.0  # one max ...
    x[3:, 6] = 9.0  # ... or two tied
    t = torch.ones(7)
    p = torch.tensor([1e-9, 0.0, 0.999999, 1e-9, 0.999999, 1.0, 1.5])
    thr = check(x, t, None, p)
    kept = _mask(x, thr).sum(1)
    assert kept[0] == 1 and kept[1] == 1 and kept[3] == 2
    assert torch.isneginf(thr[5:]).all()
    check(x, t, None, torch.tensor([1 - 1e-12] * 7, dtype=torch.float64))


def test_non_finite_logits():
    gen = torch.Generator().manual_seed(6)
    V = 111
    x = torch.randn(8, V, generator=gen) * 2
    x[0, :50] = float("-inf")
    x[1, ::3] = float("nan")
    x[2, ::4] = float("inf")  # +inf is not a logit: it is -inf
    x[3] = float("-inf")  # no finite logit
    x[4] = float("nan")
    x[5, :] = float("-inf")
    x[5, 7] = 1.5  # a single finite logit
    x[6, :100] = float("-inf")  # fewer finite logits than k
    x[7, 10] = float("inf")
    t = torch.ones(8)
    k = torch.tensor([5, 5, 5, 5, 5, 3, 50, 1])
    p = torch.tensor([0.8, 0.5, 0.3, 0.5, 0.9, 0.5, 0.7, 0.5])
    thr = check(x, t, k, p)
    check(x, t, k, None)
    check(x, t, None, p)
    assert not _mask(x, thr)[3:5].any()


def test_signed_zeros_and_extreme_values():
    """-0.0 and +0.0 are one value (ties); logits near the float32 limits; extreme T."""
    V = 64
    x = torch.zeros(6, V)
    x[:, ::2] = -0.0
    x[:, 1:5] = 1.0
    x[2:4, 20:24] = torch.tensor([3e38, -3e38, 1e-38, -1e-45])
    x[4, 30] = 1e-45
    t = torch.tensor([1.0, 1.0, 1e-30, 1e30, 0.3, 1.0])
    k = torch.tensor([6, 5, 3, 7, 6, 40])
    p = torch.tensor([0.999, 0.4, 0.9, 0.37, 0.5, 0.999])
    check(x, t, k, None)
    check(x, t, k, p)
    check(x, t, None, p)


def test_greedy_and_odd_temperatures():
    """T <= 0 (greedy) counts as T = 1; NaN / +inf temperatures (rows that emit nothing) still
    give a threshold and terminate."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 111, generator=gen)
    t = torch.tensor([0.0, -1.0, 1.0, 1e-6])
    check(x, t, torch.tensor([3, 0, 3, 10]), torch.tensor([0.6, 0.6, 0.6, 0.6]))
    thr = kthr.filter_thresholds(x.to(DEV), torch.tensor([float("nan"), float("inf"), 1.0, 1.0], device=DEV),
                                 torch.tensor([3, 3, 3, 3], device=DEV), torch.full((4,), 0.5, device=DEV))
    assert thr.shape == (4,)


@pytest.mark.parametrize("group", [2, 4])
def test_group_reads_parameters_at_row_over_group(group):
    """Row n uses the parameters at n // group (verification: group = K + 1 positions)."""
    gen = torch.Generator().manual_seed(8 + group)
    B, V = 3, 111
    x = torch.randn(B * group, V, generator=gen) * 3
    t = torch.tensor([1.0, 0.0, 0.6])
    k = torch.tensor([4, 0, 20])
    p = torch.tensor([0.7, 0.4, 1.0])
    check(x, t, k, p, group=group)
    check(x, t, None, p, group=group)
    # int32 top_k, float64 top_p: read as they are
    check(x, t, k.int(), p.double(), group=group)


def test_fuzz_small_vocabularies():
    """Many rows of random small problems: random scales, value ranges and parameters."""
    gen = torch.Generator().manual_seed(9)
    N, V = 24, 37
    scale = torch.rand(N, 1, generator=gen) * 10
    x = torch.randn(N, V, generator=gen) * scale
    x[::3] = x[::3].round()
    x[::5, ::4] = float("-inf")
    k = torch.randint(0, V + 1, (N,), generator=gen)
    p = torch.rand(N, generator=gen) * 1.1
    t = torch.rand(N, generator=gen) * 3 - 0.5
    check(x, t, k, p)


def test_an_off_by_one_threshold_is_caught():
    """Sanity of the comparison itself: moving the threshold to the next distinct logit above or
    below changes the mask on every filtered row, so exact equality would catch it."""
    gen = torch.Generator().manual_seed(10)
    x = torch.randint(-3, 4, (4, 111), generator=gen).float()
    t = torch.ones(4)
    thr = check(x, t, torch.tensor([10, 30, 0, 0]), torch.tensor([1.0, 0.6, 0.5, 0.95]))
    ref = _reference_mask(x, t, torch.tensor([10, 30, 0, 0]), torch.tensor([1.0, 0.6, 0.5, 0.95]))
    for row in range(4):
        vals = x[row].unique(sorted=True)
        i = int((vals == thr[row]).nonzero())
        for j in (i - 1, i + 1):
            if 0 <= j < len(vals):
                wrong = thr.clone()
                wrong[row] = vals[j]
                assert not torch.equal(_mask(x, wrong), ref)


def test_top_p_mass_exactly_at_a_boundary():
    """With a huge T every weight exp(x / T - M / T) is exactly 1 in float64 (the scaled logits
    stay distinct), so the masses are dyadic and the reference's cumsum hits top_p exactly: the
    prefix whose mass equals top_p is kept, and nothing below it (>=, not >)."""
    V = 40
    x = torch.full((4, V), float("-inf"))
    x[:, :8] = torch.arange(8, 0, -1).float()  # 8 distinct logits, 8 weights of exactly 1
    t = torch.full((4,), 1e30)
    p = torch.tensor([0.25, 0.5, 0.625, 0.125], dtype=torch.float64)
    thr = check(x, t, None, p)
    assert _mask(x, thr).sum(1).tolist() == [2, 4, 5, 1]
    thr = check(x, t, torch.tensor([4, 4, 4, 4]), p)  # masses of the 4 top-k survivors
    assert _mask(x, thr).sum(1).tolist() == [1, 2, 3, 1]
