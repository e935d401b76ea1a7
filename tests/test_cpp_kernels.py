"""Checks specific to the C++ CPU kernels (``torch.ops.specdec_cpp``), beyond the shared
backend-parametrised suite: Philox known-answer vectors (scalar and AVX2 paths), and token-for-token
agreement with ``specdec.reference`` on random inputs at awkward sizes, dtypes and settings.

Inputs are built so that every branch is exercised: drafts sampled from a draft distribution close
to the target (so some are accepted and some rejected), greedy rows whose drafts are often the
argmax, -1 tails, out-of-range draft ids, Vd < Vt, non-finite logits and rows without any.
"""
import pytest
import torch

from specdec import reference as R

_C = pytest.importorskip("specdec._C", reason="C++ extension not built")
OPS = torch.ops.specdec_cpp
MASK32 = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# Philox


def test_philox_known_answers():
    # Random123 kat_vectors for philox4x32_10
    counter = torch.tensor([[0, 0, 0, 0], [MASK32] * 4, [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344]])
    key = torch.tensor([[0, 0], [MASK32] * 2, [0xA4093822, 0x299F31D0]])
    expect = torch.tensor([
        [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8],
        [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD],
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
    ])
    assert torch.equal(OPS._philox(counter, key, False), expect)
    assert torch.equal(torch.stack(R.philox4x32_10(*counter.T, *key.T), 1), expect)


def test_philox_avx2_lanes_match_scalar():
    g = torch.Generator().manual_seed(0)
    counter = torch.randint(0, 2**32, (64, 4), generator=g)
    counter[:4, 0] = MASK32 - torch.arange(4)  # index wrap-around inside the 8 lanes
    key = torch.randint(0, 2**32, (64, 2), generator=g)
    vec = OPS._philox(counter, key, True)
    for lane in range(8):
        c = counter.clone()
        c[:, 0] = (c[:, 0] + lane) & MASK32
        assert torch.equal(vec[:, lane], R.philox4x32_10(*c.T, *key.T)[0]), lane


# ---------------------------------------------------------------------------------------------
# random inputs


def _params(B, g, *, temps=(0.0, 0.6, 1.0), top_k=(0,), top_p=(1.0,)):
    pick = lambda xs: torch.tensor(xs)[torch.randint(0, len(xs), (B,), generator=g)]  # noqa: E731
    temperature = pick(list(temps)).float()
    tk = pick(list(top_k)).long()
    tp = pick(list(top_p)).float()
    seed = torch.randint(-(2**62), 2**62, (B,), generator=g)
    offset = torch.randint(0, 2**40, (B,), generator=g)
    return temperature, tk, tp, seed, offset


def _verify_inputs(B, K, Vt, Vd, dtype, with_q, g, scale=2.0):
    """Target logits, drafts and draft probs where drafts are often (not always) accepted."""
    L = torch.randn(B, K + 1, Vt, generator=g) * scale
    # the drafter sees the target plus noise, so p and q overlap without being equal
    dl = L[:, :K, :Vd] + torch.randn(B, K, Vd, generator=g)
    q = torch.softmax(dl, -1)
    if K > 0:
        drafts = torch.multinomial(q.reshape(-1, Vd), 1, generator=g).view(B, K)
        greedy_like = torch.rand(B, K, generator=g) < 0.5  # argmax drafts: accepted by greedy rows
        drafts = torch.where(greedy_like, L[:, :K].argmax(-1), drafts)
        # -1 tails on some rows, out-of-range ids here and there
        for b in range(B):
            r = int(torch.randint(0, 6, (1,), generator=g))
            if r == 0:
                drafts[b, int(torch.randint(0, K, (1,), generator=g)):] = -1
            elif r == 1:
                drafts[b, int(torch.randint(0, K, (1,), generator=g))] = [-5, Vd, Vt + 3][b % 3]
    else:
        drafts = torch.zeros(B, 0, dtype=torch.long)
    return L.to(dtype), drafts, (q.to(dtype) if with_q else None)


def _check_verify(L, drafts, q, params):
    got = OPS.verify(L, drafts, q, *params)[:2]  # [2:]: logprobs, empty without return_logprobs
    ref = R.verify(L, drafts, q, *params)
    assert torch.equal(got[1], ref[1]), (got[1], ref[1])
    assert torch.equal(got[0], ref[0]), (got[0], ref[0])
    return got


CASES = [  # B, K, Vt, Vd
    (3, 0, 111, 111),
    (64, 4, 111, 111),
    (64, 8, 111, 97),
    (3, 3, 32000, 32000),
    (1, 5, 32000, 31000),
    (3, 2, 151936, 151936),
    (1, 1, 151936, 151000),
]


@pytest.mark.parametrize("B,K,Vt,Vd", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_q", [True, False])
def test_verify_matches_reference(B, K, Vt, Vd, dtype, with_q):
    if not with_q and Vd != Vt:
        pytest.skip("Vd only exists with draft_probs")
    g = torch.Generator().manual_seed(B * 1000 + K * 10 + Vt + int(with_q))
    L, drafts, q = _verify_inputs(B, K, Vt, Vd, dtype, with_q, g)
    _check_verify(L, drafts, q, _params(B, g))


@pytest.mark.parametrize("Vt", [111, 32000])
def test_verify_top_k_top_p(Vt):
    g = torch.Generator().manual_seed(Vt)
    B, K = 16, 3
    L, drafts, q = _verify_inputs(B, K, Vt, Vt, torch.float32, True, g)
    L[0, :, :20] = 1.0  # ties at the top-k / top-p boundary
    params = _params(B, g, top_k=(0, 1, 5, 50, Vt, Vt + 1), top_p=(1.0, 0.0, 0.3, 0.9, 0.999))
    _check_verify(L, drafts, q, params)


def test_verify_accepts_and_rejects():
    """Sanity of the inputs themselves: the comparisons above cover both outcomes."""
    g = torch.Generator().manual_seed(7)
    L, drafts, q = _verify_inputs(64, 4, 111, 111, torch.float32, True, g)
    out, n = _check_verify(L, drafts, q, _params(64, g, temps=(1.0,)))
    assert 0 < int((n > 0).sum()) < 64 and int((n == 4).sum()) > 0


def test_verify_non_finite():
    g = torch.Generator().manual_seed(3)
    B, K, V = 8, 3, 257
    L, drafts, q = _verify_inputs(B, K, V, V, torch.float32, True, g)
    L[0, 1, ::3] = float("nan")
    L[1, 0, 5] = float("inf")  # +inf counts as -inf
    L[1, 0, :] = float("-inf")  # the first position (always reached) has no finite logit: void
    L[2, 3, :] = float("nan")
    drafts[2, 1] = -1  # ... but here position 3 is not live: the row is fine
    L[3, :, :] = float("-inf")
    L[3, :, 17] = 0.5  # a single finite logit per position
    L[4, :, :] = float("-inf")
    for temps in ((1.0,), (0.0,), (0.0, 0.7)):
        params = _params(B, g, temps=temps)
        for qq in (q, None):
            out, n = _check_verify(L, drafts, qq, params)
            assert out[1].eq(-1).all() and n[1] == 0 and out[4].eq(-1).all()
            assert out[2, 0] >= 0


def test_verify_temperature_extremes():
    g = torch.Generator().manual_seed(5)
    L, drafts, q = _verify_inputs(8, 3, 1000, 1000, torch.float32, True, g)
    params = list(_params(8, g))
    params[0] = torch.tensor([1e-4, 1e-3, 0.05, 5.0, 100.0, -1.0, 0.0, 1e-2])
    _check_verify(L, drafts, q, params)


# ---------------------------------------------------------------------------------------------
# sample


@pytest.mark.parametrize("B,V", [(1, 111), (64, 111), (3, 32000), (3, 151936)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sample_matches_reference(B, V, dtype):
    g = torch.Generator().manual_seed(B + V)
    logits = (torch.randn(B, V, generator=g) * 3).to(dtype)
    params = _params(B, g, temps=(0.0, 0.6, 1.0, 1.7), top_k=(0, 0, 1, 40, V), top_p=(1.0, 1.0, 0.9, 0.5))
    tok, probs = OPS.sample(logits, *params)[:2]
    rtok, rprobs = R.sample(logits, *params)
    assert torch.equal(tok, rtok)
    torch.testing.assert_close(probs, rprobs, atol=1e-5, rtol=1e-5)


def test_sample_non_finite_and_many_seeds():
    """Many draws of one row: the same token as the reference for every (seed, offset)."""
    g = torch.Generator().manual_seed(11)
    B, V = 256, 50
    logits = torch.randn(1, V, generator=g).expand(B, V).contiguous()
    logits[:, 7] = float("nan")
    logits[:, 9] = float("inf")
    logits[0] = float("-inf")
    params = _params(B, g, temps=(0.8,), top_p=(1.0, 0.95))
    tok, probs = OPS.sample(logits, *params)[:2]
    rtok, rprobs = R.sample(logits, *params)
    assert torch.equal(tok, rtok) and tok[0] == -1 and probs[0].eq(0).all()
    torch.testing.assert_close(probs, rprobs, atol=1e-6, rtol=1e-5)
    assert len(set(tok[1:].tolist())) > 10


def test_meta_shapes():
    L = torch.empty(2, 4, 10, device="meta")
    out, n = OPS.verify(L, torch.empty(2, 3, dtype=torch.long, device="meta"), None,
                        *[torch.empty(2, device="meta")] * 5)[:2]
    assert out.shape == (2, 4) and out.dtype == torch.int64 and n.shape == (2,) and n.dtype == torch.int32
    tok, probs = OPS.sample(torch.empty(3, 10, device="meta"), *[torch.empty(3, device="meta")] * 5)[:2]
    assert tok.shape == (3,) and probs.shape == (3, 10) and probs.dtype == torch.float32
