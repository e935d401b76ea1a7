"""token_bitmask= on verify, verify_tree and sample (structured output): every backend applies the
mask inside its kernels, and the target at a position is the target restricted to the allowed ids.

Masks here are built from boolean "allowed" arrays with numpy's packbits, independently of the
library's own unpacking (reference.allowed_ids), and checked once against xgrammar's."""
import numpy as np
import pytest
import torch

from specdec import ops, reference
from stats import ALPHA, chi2_pvalue
from conftest import backend_available, device_for

NEG = float("-inf")


def bits(allowed: torch.Tensor, W: int | None = None) -> torch.Tensor:
    """bool [..., V] -> int32 [..., W] in xgrammar's layout (bit i % 32 of word i // 32)."""
    a = allowed.cpu().numpy()
    V = a.shape[-1]
    W = -(-V // 32) if W is None else W
    packed = np.packbits(a, axis=-1, bitorder="little")  # byte j: ids 8j .. 8j+7, lowest in bit 0
    out = np.zeros(a.shape[:-1] + (4 * W,), dtype=np.uint8)
    n = min(packed.shape[-1], 4 * W)
    out[..., :n] = packed[..., :n]
    return torch.from_numpy(out.view("<i4").copy())


def random_allowed(shape, V, g, density=None):
    """Random allowed sets: per row a density in [0.05, 0.9], or 1-5 allowed ids ("sparse", the
    JSON punctuation case) for about a third of the rows; never empty."""
    n = int(np.prod(shape))
    out = torch.zeros(n, V, dtype=torch.bool)
    for i in range(n):
        if density is None and torch.rand(1, generator=g) < 0.35:
            k = int(torch.randint(1, 6, (1,), generator=g))
            out[i, torch.randperm(V, generator=g)[:k]] = True
        else:
            d = density if density is not None else float(torch.rand(1, generator=g)) * 0.85 + 0.05
            out[i] = torch.rand(V, generator=g) < d
            out[i, int(torch.randint(0, V, (1,), generator=g))] = True
    return out.view(*shape, V)


def masked_logits(logits, allowed):
    return logits.double().masked_fill(~allowed, NEG)


def on(backend, *ts):
    dev = device_for(backend)
    return [None if t is None else t.to(dev) for t in ts]


# ---------------------------------------------------------------- the layout


def test_layout_is_xgrammars():
    xgr = pytest.importorskip("xgrammar")
    g = torch.Generator().manual_seed(0)
    for V in (32, 33, 111, 1000):  # (xgrammar 0.2.9's CPU apply misreads rows past the first for V < 32)
        allowed = random_allowed((3,), V, g)
        mask = bits(allowed)
        theirs = torch.randn(3, V, generator=g)
        ours = reference._masked(theirs, mask)
        xgr.apply_token_bitmask_inplace(theirs, mask)
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), V
    for V in (1, 31, 32, 33, 111):
        allowed = random_allowed((3,), V, g)
        assert torch.equal(reference.allowed_ids(bits(allowed), V), allowed), V


@pytest.mark.parametrize("V,W", [(1, 1), (31, 1), (32, 1), (33, 2), (100, 4), (1000, 33)])
def test_random_words(V, W):
    """Any int32 words (negative ones: bit 31 set), unpacked through numpy's bit order."""
    torch.manual_seed(V)
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, 2, W), dtype=torch.int32)
    logits = torch.randn(3, 2, V)
    ok = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, bitorder="little")[..., :V].astype(bool)
    expected = torch.where(torch.from_numpy(ok), logits.double(), NEG)
    assert torch.equal(reference._masked(logits, bitmask), expected)


def test_short_and_long_masks():
    """W < ceil(V / 32) (a tokenizer smaller than the logits) bans the ids past 32 W; extra words
    and the bits past V are ignored."""
    V = 100
    allowed = torch.ones(2, V, dtype=torch.bool)
    short = bits(allowed, W=2)  # ids 0..63
    assert torch.equal(reference.allowed_ids(short, V), torch.arange(V).expand(2, V) < 64)
    long = bits(allowed, W=6)
    long[:, 3:] = -1  # every bit set past V
    assert torch.equal(reference.allowed_ids(long, V), allowed)


# ---------------------------------------------------------------- exact


@pytest.mark.parametrize("V", [111, 1000])
def test_greedy_is_the_argmax_over_allowed_ids(backend, V):
    B, K = 3, 3
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(B, K + 1, V, generator=g)
    allowed = random_allowed((B, K + 1), V, g)
    best = masked_logits(logits, allowed).argmax(-1)  # [B, K+1]
    drafts = best[:, :K].clone()
    allowed[1, 1, drafts[1, 1]] = False  # row 1: its second draft is banned there
    best = masked_logits(logits, allowed).argmax(-1)
    drafts[0] = best[0, :K]
    drafts[2] = best[2, :K]
    L, D, M = on(backend, logits, drafts, bits(allowed))
    out, n = ops.verify(L, D, temperature=0.0, token_bitmask=M, backend=backend, check=True)
    out, n = out.cpu(), n.cpu()
    assert n.tolist() == [K, 1, K]
    assert torch.equal(out[0], best[0]) and torch.equal(out[2], best[2])
    assert out[1, :2].tolist() == [drafts[1, 0], best[1, 1]] and out[1, 2:].tolist() == [-1] * (K - 1)
    tok, probs = ops.sample(L[:, 0], temperature=0.0, token_bitmask=M[:, 0], backend=backend)
    assert torch.equal(tok.cpu(), best[:, 0])
    assert torch.equal(probs.cpu(), torch.nn.functional.one_hot(best[:, 0], V).float())


def test_tree_greedy_skips_a_banned_child(backend):
    V, B = 111, 2
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(B, 3, V, generator=g)
    top = logits[:, 0].argmax(-1)
    allowed = torch.ones(B, 3, V, dtype=torch.bool)
    allowed[:, 0, top[0]] = False
    allowed[:, 0, top[1]] = False
    best = masked_logits(logits[:, 0], allowed[:, 0]).argmax(-1)
    tokens = torch.stack([top, best], 1)  # two children of the root: the banned argmax, then the best allowed
    parents = torch.full((B, 2), -1)
    L, T, P, M = on(backend, logits, tokens, parents, bits(allowed))
    out, n, nodes = ops.verify_tree(L, T, P, temperature=0.0, token_bitmask=M, backend=backend, check=True)
    assert n.tolist() == [1, 1] and nodes.cpu()[:, 0].tolist() == [1, 1]
    assert torch.equal(out.cpu()[:, 0], best)
    assert torch.equal(out.cpu()[:, 1], masked_logits(logits[:, 2], allowed[:, 2]).argmax(-1))


def _random_case(B, K, V, g, with_q):
    logits = torch.randn(B, K + 1, V, generator=g) * 2
    allowed = random_allowed((B, K + 1), V, g)
    q = torch.softmax(torch.randn(B, K, V, generator=g) * 2, -1) if with_q else None
    # drafts: half from the target's allowed ids, half anywhere (often banned)
    pick = torch.softmax(masked_logits(logits[:, :K], allowed[:, :K]), -1)
    drafts = torch.multinomial(pick.reshape(-1, V).float(), 1, generator=g).view(B, K)
    anywhere = torch.randint(0, V, (B, K), generator=g)
    drafts = torch.where(torch.rand(B, K, generator=g) < 0.5, drafts, anywhere)
    return logits, allowed, drafts, q


@pytest.mark.parametrize("with_q", [True, False])
def test_every_backend_gives_the_references_tokens(backend, with_q):
    """Sampled rows (temperature, top-k, top-p mixed with greedy rows), random masks: verify,
    verify(method="block"), verify_tree on a chain and sample emit the reference's tokens."""
    B, K, V = 4, 3, 111 if backend == "triton" else 700
    g = torch.Generator().manual_seed(11 + with_q)
    logits, allowed, drafts, q = _random_case(B, K, V, g, with_q)
    mask = bits(allowed)
    kw = dict(temperature=torch.tensor([0.8, 1.0, 0.0, 1.3]), top_k=torch.tensor([0, 5, 0, 0]),
              top_p=torch.tensor([1.0, 1.0, 1.0, 0.9]), seed=torch.tensor([1, 2, 3, 4]), offset=7)
    L, D, Q, M = on(backend, logits, drafts, q, mask)
    want = ops.verify(logits, drafts, q, token_bitmask=mask, backend="reference", **kw)
    got = ops.verify(L, D, Q, token_bitmask=M, backend=backend, **kw)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want))
    if with_q:
        want = ops.verify(logits, drafts, q, token_bitmask=mask, backend="reference", method="block", **kw)
        got = ops.verify(L, D, Q, token_bitmask=M, backend=backend, method="block", **kw)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want))
    chain = torch.arange(K).expand(B, K) - 1
    want = ops.verify_tree(logits, drafts, chain, q, token_bitmask=mask, backend="reference", **kw)
    got = ops.verify_tree(L, D, chain.to(L.device), Q, token_bitmask=M, backend=backend, **kw)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want))
    assert torch.equal(want[0], ops.verify(logits, drafts, q, token_bitmask=mask, backend="reference", **kw)[0])
    want = ops.sample(logits[:, 1], token_bitmask=mask[:, 1], backend="reference", **kw)
    got = ops.sample(L[:, 1], token_bitmask=M[:, 1], backend=backend, **kw)
    assert torch.equal(got[0].cpu(), want[0])
    torch.testing.assert_close(got[1].cpu(), want[1], rtol=1e-5, atol=1e-7)
    assert not bool((want[1] > 0)[~allowed[:, 1]].any())


def test_an_all_ones_mask_is_no_mask(backend):
    B, K, V = 3, 3, 111
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(B, K + 1, V, generator=g)
    drafts = torch.randint(0, V, (B, K), generator=g)
    q = torch.softmax(torch.randn(B, K, V, generator=g), -1)
    ones = bits(torch.ones(B, K + 1, V, dtype=torch.bool))
    L, D, Q, M = on(backend, logits, drafts, q, ones)
    kw = dict(temperature=torch.tensor([0.7, 0.0, 1.0]), seed=5, backend=backend, return_logprobs=True)
    plain = ops.verify(L, D, Q, **kw)
    full = ops.verify(L, D, Q, token_bitmask=M, **kw)
    assert torch.equal(plain[0], full[0]) and torch.equal(plain[1], full[1])
    for a, b in zip(plain[2:], full[2:]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_a_banned_draft_is_never_accepted(fast_backend):
    """The draft holds most of the target's unmasked mass and all of q's, yet its bit is 0."""
    N, V = 2000, 50
    logits = torch.zeros(2, V)
    logits[:, 7] = 5.0
    allowed = torch.ones(2, V, dtype=torch.bool)
    allowed[0, 7] = False
    drafts = torch.full((N, 1), 7)
    q = torch.nn.functional.one_hot(torch.tensor([7]), V).float()[None].expand(N, 1, V)
    for probs in (q, None):
        out, n = ops.verify(logits.expand(N, 2, V), drafts, probs, token_bitmask=bits(allowed).expand(N, 2, -1),
                            seed=torch.arange(N), backend=fast_backend)
        assert int(n.max()) == 0 and not bool((out[:, 0] == 7).any())
    out, n = ops.verify(logits.expand(N, 2, V), drafts, temperature=0.0,
                        token_bitmask=bits(allowed).expand(N, 2, -1), backend=fast_backend)
    assert int(n.max()) == 0 and not bool((out[:, 0] == 7).any())


def test_no_allowed_finite_logit(backend):
    """The mask allows only ids whose logits are -inf at position 0: the row emits nothing (check
    raises); a position after the stop with an empty allowed set does not void its row."""
    V = 111
    logits = torch.randn(2, 3, V)
    logits[0, 0, :10] = NEG
    allowed = torch.ones(2, 3, V, dtype=torch.bool)
    allowed[0, 0, 10:] = False
    allowed[1, 2] = False  # row 1: nothing allowed at position 2, never reached (greedy, drafts rejected)
    allowed[1, 2, 0] = True
    logits[1, 2, 0] = NEG
    drafts = torch.tensor([[0, 0], [-1, -1]])
    L, D, M = on(backend, logits, drafts, bits(allowed))
    out, n = ops.verify(L, D, temperature=0.0, token_bitmask=M, backend=backend)
    assert out.cpu()[0].tolist() == [-1, -1, -1] and int(n[0]) == 0
    assert int(out[1, 0]) == int(masked_logits(logits[1, 0], allowed[1, 0]).argmax())
    with pytest.raises(ValueError, match="no finite logit"):
        ops.verify(L, D, temperature=0.0, token_bitmask=M, backend=backend, check=True)
    tok, probs = ops.sample(L[:, 0], token_bitmask=M[:, 0], backend=backend)
    assert int(tok[0]) == -1 and float(probs[0].sum()) == 0.0
    with pytest.raises(ValueError, match="token_bitmask allows"):
        ops.sample(L[:, 0], token_bitmask=M[:, 0], backend=backend, check=True)
    out, n, _ = ops.verify_tree(L, D, torch.tensor([[-1, 0], [-1, 0]]).to(L.device), temperature=0.0,
                                token_bitmask=M, backend=backend)
    assert out.cpu()[0].tolist() == [-1, -1, -1]


def test_bad_bitmask_raises_naming_it():
    L = torch.randn(2, 3, 50)
    d = torch.zeros(2, 2, dtype=torch.int64)
    good = torch.zeros(2, 3, 2, dtype=torch.int32)
    cases = [
        (good.long(), TypeError, "token_bitmask must be int32"),
        (good.float(), TypeError, "token_bitmask must be int32"),
        (good[:, :2], ValueError, r"token_bitmask must be \[2, 3, W\]"),
        (good[0], ValueError, r"token_bitmask must be \[2, 3, W\]"),
        (good[..., :0], ValueError, "W >= 1"),
        (good.to("meta"), ValueError, "token_bitmask is on meta"),
        ([[1]], TypeError, "token_bitmask must be an int32 tensor"),
    ]
    for mask, exc, msg in cases:
        for check in (True, False):  # shape, dtype and device are always checked (no sync)
            with pytest.raises(exc, match=msg):
                ops.verify(L, d, token_bitmask=mask, check=check)
    with pytest.raises(ValueError, match=r"token_bitmask must be \[2, 3, W\]"):
        ops.verify_tree(L, d, torch.full((2, 2), -1), token_bitmask=good[:, :1])
    with pytest.raises(ValueError, match=r"token_bitmask must be \[2, W\]"):
        ops.sample(L[:, 0], token_bitmask=good)
    if backend_available("cpp"):  # the C++ op checks too, for callers of torch.ops.specdec_cpp
        args = (L, d, None, torch.ones(2), torch.zeros(2, dtype=torch.int64), torch.ones(2),
                torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64), False)
        with pytest.raises(RuntimeError, match="token_bitmask must be"):
            torch.ops.specdec_cpp.verify(*args, good[:, :2])


# ---------------------------------------------------------------- logprobs


def test_logprobs_under_a_mask(backend):
    """processed = log p under the masked (then tempered) target; raw = log_softmax of the logits
    without the mask; greedy rows: log_softmax of the masked logits. float64 written here."""
    B, K, V = 3, 2, 111
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(B, K + 1, V, generator=g) * 2
    allowed = random_allowed((B, K + 1), V, g, density=0.3)
    drafts = torch.randint(0, V, (B, K), generator=g)
    t = torch.tensor([0.7, 0.0, 1.0])
    L, D, M = on(backend, logits, drafts, bits(allowed))
    out, n, processed, raw = ops.verify(L, D, temperature=t, seed=9, token_bitmask=M, backend=backend,
                                        return_logprobs=True)
    out = out.cpu()
    for b in range(B):
        for j in range(int(n[b]) + 1):
            tok = int(out[b, j])
            assert allowed[b, j, tok]
            scale = 1.0 if t[b] <= 0 else float(t[b])
            want_p = torch.log_softmax(masked_logits(logits[b, j], allowed[b, j]) / scale, -1)[tok]
            want_r = torch.log_softmax(logits[b, j].double(), -1)[tok]
            assert abs(float(processed[b, j]) - float(want_p)) < 1e-4, (b, j)
            assert abs(float(raw[b, j]) - float(want_r)) < 1e-4, (b, j)
        assert bool((processed[b, int(n[b]) + 1:] == NEG).all())
    tok, _, processed, raw = ops.sample(L[:, 0], temperature=t, seed=9, token_bitmask=M[:, 0], backend=backend,
                                        return_logprobs=True)
    for b in range(B):
        scale = 1.0 if t[b] <= 0 else float(t[b])
        want_p = torch.log_softmax(masked_logits(logits[b, 0], allowed[b, 0]) / scale, -1)[int(tok[b])]
        assert abs(float(processed[b]) - float(want_p)) < 1e-4
        assert abs(float(raw[b]) - float(torch.log_softmax(logits[b, 0].double(), -1)[int(tok[b])])) < 1e-4


# ---------------------------------------------------------------- statistics


def masked_target(logits, allowed, temperature, top_k, top_p):
    """The masked target per position, float64, written independently: mask, scale, sort, cut."""
    out = []
    for row, ok in zip(logits.double(), allowed):
        s = row.masked_fill(~ok, NEG) / temperature
        vals, idx = s.sort(descending=True)
        keep = torch.isfinite(vals)
        if top_k:
            keep[top_k:] = False
        p = torch.softmax(vals.masked_fill(~keep, NEG), -1)
        if top_p < 1:
            keep &= (p.cumsum(0) - p) < top_p
        p = torch.softmax(vals.masked_fill(~keep, NEG), -1)
        out.append(torch.zeros_like(p).scatter(0, idx, p))
    return torch.stack(out)


@pytest.mark.parametrize("K,temperature,top_k,top_p,V,density,with_q", [
    (2, 1.0, 0, 1.0, 40, 0.5, True),
    (2, 0.7, 0, 1.0, 40, 0.5, False),
    (2, 1.0, 6, 1.0, 60, 0.4, True),
    (2, 1.0, 0, 0.8, 60, 0.6, True),
    (3, 1.0, 0, 1.0, 300, 0.02, True),  # 1-9 allowed ids per position, across two race blocks
])
def test_emitted_tokens_follow_the_masked_target(fast_backend, K, temperature, top_k, top_p, V, density,
                                                 with_q):
    """Chi-square per position against the masked float64 target. q puts 40% of its mass on
    tokens the target dislikes, banned ones included, so banned drafts are frequent."""
    N = 30_000
    g = torch.Generator().manual_seed(K * 100 + V)
    logits = torch.randn(K + 1, V, generator=g) * 1.5
    allowed = random_allowed((K + 1,), V, g, density=density)
    p = masked_target(logits, allowed, temperature, top_k, top_p)
    q = (0.6 * p[:K] + 0.4 * torch.softmax(-logits[:K].double(), -1)).float()
    drafts = torch.stack([torch.multinomial(q[i], N, replacement=True, generator=g) for i in range(K)], 1)
    out, n = ops.verify(logits.expand(N, K + 1, V), drafts, q.expand(N, K, V) if with_q else None,
                        temperature=temperature, top_k=top_k, top_p=top_p, seed=torch.arange(N) * 3 + 1,
                        token_bitmask=bits(allowed).expand(N, K + 1, -1), backend=fast_backend)
    for i in range(K + 1):
        emitted = out[:, i][out[:, i] >= 0]
        assert len(emitted) > 500, f"position {i}: too few samples"
        pv = chi2_pvalue(emitted, p[i])
        assert pv > ALPHA, f"position {i}: chi-square p-value {pv:.2e}"


def test_sample_and_tree_follow_the_masked_target(fast_backend):
    N, V = 30_000, 80
    g = torch.Generator().manual_seed(77)
    logits = torch.randn(3, V, generator=g) * 1.5
    allowed = random_allowed((3,), V, g, density=0.3)
    p = masked_target(logits, allowed, 1.0, 0, 1.0)
    mask = bits(allowed)
    tok, _ = ops.sample(logits[:1].expand(N, V), seed=torch.arange(N), token_bitmask=mask[:1].expand(N, -1),
                        backend=fast_backend)
    assert chi2_pvalue(tok, p[0]) > ALPHA
    # a root with two children drawn from q (one often banned), each with a child of its own
    # (each node's token drawn from its q: half the target, half what it dislikes, banned ids included)
    q = (0.5 * p[:2] + 0.5 * torch.softmax(-logits[:2].double(), -1)).float()[[0, 0, 1, 1]]  # [4, V]
    tokens = torch.stack([torch.multinomial(q[i], N, replacement=True, generator=g) for i in range(4)], 1)
    parents = torch.tensor([-1, -1, 0, 1]).expand(N, 4)
    tl = logits[[0, 1, 1, 2, 2]].expand(N, 5, V)
    tm = mask[[0, 1, 1, 2, 2]].expand(N, 5, -1)
    for probs in (q.expand(N, 4, V), None):
        out, n, nodes = ops.verify_tree(tl, tokens, parents, probs, seed=torch.arange(N) + 10**5, token_bitmask=tm,
                                        backend=fast_backend)
        assert chi2_pvalue(out[:, 0], p[0]) > ALPHA
        second = out[:, 1][n >= 1]
        assert len(second) > 1000 and chi2_pvalue(second, p[1]) > ALPHA
