"""specdec.ops.sample: the same suite over every backend (reference, C++, Triton)."""
import pytest
import torch

from specdec import ops, reference
from stats import ALPHA, block_masses, chi2_pvalue
from conftest import device_for
from test_verify import target_probs


def run(backend, logits, **kw):
    dev = device_for(backend)
    tok, probs = ops.sample(logits.to(dev), backend=backend, **kw)
    assert tok.dtype == torch.int64 and tok.shape == (logits.shape[0],)
    assert probs.dtype == torch.float32 and probs.shape == logits.shape
    return tok.cpu(), probs.cpu()


@pytest.mark.parametrize("V,temperature,top_k,top_p", [
    (111, 1.0, 0, 1.0), (111, 0.6, 7, 1.0), (333, 1.0, 0, 0.7), (32000, 0.8, 50, 0.9)])
def test_probs_are_the_target_distribution(backend, V, temperature, top_k, top_p):
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(V)) * 2
    tok, probs = run(backend, logits, temperature=temperature, top_k=top_k, top_p=top_p, seed=1)
    want = target_probs(logits, temperature, top_k, top_p)
    torch.testing.assert_close(probs.double(), want, atol=1e-6, rtol=1e-5)
    assert (probs[torch.arange(3), tok] > 0).all()


def test_greedy_rows_and_dtypes(backend):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        logits = torch.randn(4, 111, generator=torch.Generator().manual_seed(2)).to(dtype)
        logits[:, 0] = float("nan")
        temperature = torch.tensor([0.0, 1.0, 0.0, 0.5])
        tok, probs = run(backend, logits, temperature=temperature, seed=3)
        want = torch.where(torch.isfinite(logits.float()), logits.float(), -torch.inf).argmax(-1)
        assert torch.equal(tok[[0, 2]], want[[0, 2]])
        assert torch.equal(probs[0], torch.nn.functional.one_hot(want[0], 111).float())
        assert (tok > 0).all()


def test_no_finite_logit_row(backend):
    logits = torch.randn(2, 50)
    logits[1] = -torch.inf
    tok, probs = run(backend, logits, seed=1)
    assert tok[1] == -1 and (probs[1] == 0).all() and tok[0] >= 0
    with pytest.raises(ValueError, match="row 1"):
        ops.sample(logits, check=True)


def test_matches_reference(backend):
    if backend == "reference":
        pytest.skip("the reference is what the others are compared with")
    g = torch.Generator().manual_seed(5)
    for V, dtype in ((111, torch.float32), (1000, torch.bfloat16), (32000, torch.float16)):
        logits = (torch.randn(3, V, generator=g) * 2).to(dtype)
        kw = dict(temperature=torch.tensor([0.0, 0.7, 1.0]), top_k=torch.tensor([0, 0, 30]),
                  top_p=torch.tensor([1.0, 0.9, 1.0]), seed=torch.tensor([1, 2, 3]),
                  offset=torch.tensor([0, 5, 9]))
        want = reference.sample(logits, *kw.values())
        tok, probs = run(backend, logits, **kw)
        assert torch.equal(tok, want[0])
        torch.testing.assert_close(probs, want[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", ["ties", "half_minus_inf", "spread"])
def test_top_k_top_p_kept_sets_match_reference(backend, case):
    """The kept set of top-k / top-p (nonzero probs) equals the reference's, for logits with many
    ties at the boundaries (integer logits, signed zeros), rows half -inf and wide spreads, with
    k = 1, k = V - 1, k beyond the finite count, small and large top_p."""
    if backend == "reference":
        pytest.skip("the reference is what the others are compared with")
    g = torch.Generator().manual_seed(11)
    B, V = 8, 1500
    logits = torch.randn(B, V, generator=g) * 3
    if case == "ties":
        logits = logits.round()
        logits[0, ::3] = -0.0
    elif case == "half_minus_inf":
        logits[:, : V // 2] = float("-inf")
    else:
        logits = logits * 10
    top_k = torch.tensor([0, 1, V - 1, 20, 900, 0, 5, 0])
    top_p = torch.tensor([0.5, 1.0, 0.95, 1.0, 0.3, 0.01, 0.999, 0.9])
    kw = dict(temperature=torch.full((B,), 0.8), top_k=top_k, top_p=top_p, seed=torch.arange(B),
              offset=torch.zeros(B, dtype=torch.int64))
    want_tok, want_probs = reference.sample(logits, *kw.values())
    tok, probs = run(backend, logits, **kw)
    assert torch.equal(probs > 0, want_probs > 0)
    assert torch.equal(tok, want_tok)


def test_seeding(backend):
    logits = torch.randn(4, 111, generator=torch.Generator().manual_seed(6))
    a, _ = run(backend, logits, seed=torch.tensor([1, 2, 3, 4]), offset=2)
    b, _ = run(backend, logits, seed=torch.tensor([1, 2, 3, 4]), offset=2)
    c, _ = run(backend, logits[:1], seed=torch.tensor([1]), offset=2)
    assert torch.equal(a, b) and a[0] == c[0]
    draws = {tuple(run(backend, logits, seed=7, offset=o)[0].tolist()) for o in range(5)}
    assert len(draws) > 1


# V = 700 spans three blocks of the two-level race, the last one short and holding most of the mass
@pytest.mark.parametrize("V,temperature,top_k,top_p", [(16, 1.0, 0, 1.0), (40, 0.6, 10, 0.9),
                                                       (700, 1.0, 0, 1.0)])
def test_tokens_follow_probs(fast_backend, V, temperature, top_k, top_p):
    N = 40_000
    logits = torch.randn(V, generator=torch.Generator().manual_seed(V)) * 1.5
    logits[512:] += 2.0
    tok, probs = run(fast_backend, logits.expand(N, V), temperature=temperature, top_k=top_k,
                     top_p=top_p, seed=torch.arange(N) * 3 + 5)
    p = target_probs(logits[None], temperature, top_k, top_p)[0]
    assert chi2_pvalue(tok, p) > ALPHA
    # per block of the two-level race too: a bias between blocks is diluted over many bins
    assert chi2_pvalue(tok // reference.RACE_BLOCK, block_masses(p, reference.RACE_BLOCK)) > ALPHA


def test_sample_then_verify_is_exact(fast_backend):
    """A drafter that samples with ``sample`` and hands its probs to ``verify`` with the same seed
    and offset: the streams differ, so the emitted tokens still follow the target."""
    N, K, V = 40_000, 2, 16
    g = torch.Generator().manual_seed(8)
    draft_logits = torch.randn(K, V, generator=g)
    target_logits = torch.randn(K + 1, V, generator=g)
    seeds = torch.arange(N) + 123
    drafts, qs = [], []
    for i in range(K):
        t, q = run(fast_backend, draft_logits[i].expand(N, V), seed=seeds, offset=i)
        drafts.append(t)
        qs.append(q)
    out, n = ops.verify(target_logits.expand(N, K + 1, V), torch.stack(drafts, 1), torch.stack(qs, 1),
                        seed=seeds, offset=0, backend=fast_backend)
    p = torch.softmax(target_logits.double(), -1)
    for i in range(K + 1):
        emitted = out[:, i][out[:, i] >= 0]
        assert chi2_pvalue(emitted, p[i]) > ALPHA, f"position {i}"


def test_bad_input():
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        ops.sample(torch.randn(2, 3, 4), check=True)
    with pytest.raises(TypeError, match="float"):
        ops.sample(torch.zeros(2, 4, dtype=torch.int64), check=True)
    with pytest.raises(ValueError, match="top_p"):
        ops.sample(torch.randn(2, 4), top_p=2.0, check=True)
    with pytest.raises(ValueError, match="temperature"):
        ops.sample(torch.randn(2, 4), temperature=[1.0, float("nan")], check=True)
