"""return_logprobs=True of verify, verify_tree and sample, on every backend.

Each emitted token's log-probability is checked against a float64 computation from the raw logits
written out here (not the reference's code): processed = log_softmax of the target after
temperature, top-k and top-p at the position the token was drawn at (greedy rows: raw), raw =
log_softmax of the logits at temperature 1; -inf padding after the emitted tokens. The tokens must
be the ones the op emits without logprobs (same seed), bit for bit."""
import math

import pytest
import torch

from specdec import ops
from conftest import backend_available, device_for

NEG_INF = float("-inf")


def expected_logprobs(logits, positions, tokens, temperature, top_k, top_p):
    """float64 (processed, raw) [B, M] of tokens [B, M] drawn at logits[b, positions[b, m]]."""
    B, M = tokens.shape
    V = logits.shape[-1]
    processed = torch.full((B, M), NEG_INF, dtype=torch.float64)
    raw = torch.full((B, M), NEG_INF, dtype=torch.float64)
    for b in range(B):
        for m in range(M):
            tok = int(tokens[b, m])
            if tok < 0:
                continue
            x = logits[b, int(positions[b, m])].double()
            x = torch.where(torch.isfinite(x), x, torch.full_like(x, NEG_INF))
            raw[b, m] = x[tok] - torch.logsumexp(x, 0)
            t = float(temperature[b])
            if t <= 0:
                processed[b, m] = raw[b, m]
                continue
            scaled = x / t
            keep = torch.isfinite(scaled)
            k = int(top_k[b])
            if 0 < k < V:
                keep &= scaled >= scaled.sort(descending=True).values[k - 1]
            p = float(top_p[b])
            if p < 1.0:
                vals = torch.where(keep, scaled, torch.full_like(scaled, NEG_INF)).sort(descending=True).values
                cum = torch.softmax(vals, 0).cumsum(0)
                n = min(int((cum < p).sum()) + 1, int(keep.sum()))
                keep &= scaled >= vals[n - 1]
            if keep[tok]:
                processed[b, m] = scaled[tok] - torch.logsumexp(scaled[keep], 0)
    return processed, raw


def per_row(x, B, dtype):
    return x if isinstance(x, torch.Tensor) else torch.full((B,), x, dtype=dtype)


def assert_logprobs(got, want):
    got = got.double()
    assert torch.equal(torch.isinf(got), torch.isinf(want)), (got, want)  # same -inf slots
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], atol=2e-4, rtol=2e-5)


def verify_both(backend, logits, drafts, q, **kw):
    """verify with and without logprobs; asserts the tokens agree and returns the logprob run."""
    dev = device_for(backend)
    args = (logits.to(dev), drafts.to(dev), None if q is None else q.to(dev))
    plain = ops.verify(*args, backend=backend, **kw)
    assert len(plain) == 2
    out, n, processed, raw = ops.verify(*args, backend=backend, return_logprobs=True, **kw)
    assert torch.equal(out, plain[0]) and torch.equal(n, plain[1])
    B, K1 = out.shape
    assert processed.shape == raw.shape == (B, K1)
    assert processed.dtype == raw.dtype == torch.float32
    return out.cpu(), n.cpu(), processed.cpu(), raw.cpu()


def ragged_case(B, K, V, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, K + 1, V, generator=g) * 2).to(dtype)
    drafts = torch.randint(0, V, (B, K), generator=g)
    # make drafts likely enough to be accepted sometimes: the target's argmax at half the slots
    top = logits.float().argmax(-1)[:, :K]
    drafts = torch.where(torch.rand(B, K, generator=g) < 0.6, top, drafts)
    drafts[1, K - 1:] = -1  # ragged rows
    if B > 2:
        drafts[2, 1:] = -1
    q = torch.softmax(torch.randn(B, K, V, generator=g), -1)
    return logits, drafts, q


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_q", [True, False])
def test_verify_logprobs_match_float64(backend, dtype, with_q):
    B, K, V = 4, 3, 300  # V > 256: more than one race block
    logits, drafts, q = ragged_case(B, K, V, dtype, seed=11)
    temperature = torch.tensor([0.7, 1.0, 0.0, 1.3])  # a greedy row among sampled ones
    top_k = torch.tensor([0, 20, 5, 0])
    top_p = torch.tensor([0.9, 1.0, 1.0, 0.8])
    out, n, processed, raw = verify_both(backend, logits, drafts, q if with_q else None,
                                         temperature=temperature, top_k=top_k, top_p=top_p, seed=5)
    positions = torch.arange(K + 1).expand(B, K + 1)
    want_p, want_r = expected_logprobs(logits, positions, out, temperature, top_k, top_p)
    assert_logprobs(processed, want_p)
    assert_logprobs(raw, want_r)
    for b in range(B):  # padding: exactly the slots after the emitted token
        assert torch.isfinite(processed[b, :int(n[b]) + 1]).all()
        assert (processed[b, int(n[b]) + 1:] == NEG_INF).all() and (raw[b, int(n[b]) + 1:] == NEG_INF).all()
    assert torch.equal(processed[2], raw[2])  # greedy row: processed is raw


def test_verify_logprobs_after_rejection_are_the_targets(fast_backend):
    """Many seeds so that rows stop at a rejection: the token emitted there gets the target's
    log-probability (not the residual's), at temperatures != 1 (processed != raw)."""
    B, K, V = 8, 3, 64
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(B, K + 1, V, generator=g) * 3
    q = torch.softmax(torch.randn(B, K, V, generator=g) * 3, -1)
    drafts = torch.multinomial(q.view(-1, V), 1, generator=g).view(B, K)
    temperature = torch.linspace(0.5, 1.5, B)
    rejected = 0
    for seed in range(6):
        out, n, processed, raw = verify_both(fast_backend, logits, drafts, q, temperature=temperature,
                                             seed=seed, top_k=10)
        rejected += int((n < K).sum())
        positions = torch.arange(K + 1).expand(B, K + 1)
        want_p, want_r = expected_logprobs(logits, positions, out, temperature, torch.full((B,), 10),
                                           torch.ones(B))
        assert_logprobs(processed, want_p)
        assert_logprobs(raw, want_r)
        assert not torch.equal(processed, raw)
    assert rejected > 10  # the case under test happened


def test_verify_logprobs_large_vocab(fast_backend):
    """A vocabulary of several C++ chunks (16384 ids each) and temperature 1 (the sum reused)."""
    B, K, V = 2, 2, 40000
    logits, drafts, q = ragged_case(B, K, V, torch.bfloat16, seed=4)
    temperature = torch.tensor([1.0, 0.6])
    out, n, processed, raw = verify_both(fast_backend, logits, drafts, q, temperature=temperature, seed=2)
    positions = torch.arange(K + 1).expand(B, K + 1)
    want_p, want_r = expected_logprobs(logits, positions, out, temperature, torch.zeros(B, dtype=torch.long),
                                       torch.ones(B))
    assert_logprobs(processed, want_p)
    assert_logprobs(raw, want_r)
    assert torch.equal(processed[0], raw[0])  # T = 1, no filter: the same distribution


def test_verify_logprobs_void_rows(backend):
    """A row with no finite logit where its token is drawn, and a NaN temperature: all -inf.
    Non-finite logits elsewhere count as -inf (never a NaN logprob)."""
    B, K, V = 3, 2, 50
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(B, K + 1, V, generator=g)
    logits[0, 0] = NEG_INF  # row 0: nothing finite at its first position
    logits[2, :, :5] = float("nan")
    logits[2, :, 5] = float("inf")
    drafts = torch.full((B, K), -1)
    temperature = torch.tensor([1.0, float("nan"), 0.8])
    out, n, processed, raw = verify_both(backend, logits, drafts, None, temperature=temperature, seed=1)
    assert (out[:2] == -1).all()
    assert (processed[:2] == NEG_INF).all() and (raw[:2] == NEG_INF).all()
    want_p, want_r = expected_logprobs(logits, torch.zeros(B, K + 1, dtype=torch.long), out, torch.ones(B) * 0.8,
                                       torch.zeros(B, dtype=torch.long), torch.ones(B))
    assert_logprobs(processed[2:], want_p[2:])
    assert_logprobs(raw[2:], want_r[2:])
    assert not torch.isnan(processed).any() and not torch.isnan(raw).any()


def test_verify_tree_logprobs_match_float64(backend):
    B, N, V = 3, 5, 300
    g = torch.Generator().manual_seed(21)
    logits = torch.randn(B, N + 1, V, generator=g) * 2
    parents = torch.tensor([[-1, -1, 0, 0, 2], [-1, 0, 1, 2, 3], [-1, 0, -1, 1, -1]])
    # the target's argmax at every node for some children: long accepted paths happen
    argmax = logits.argmax(-1)
    tokens = torch.randint(0, V, (B, N), generator=g)
    parent_row = (parents + 1).clamp(min=0)
    tokens = torch.where(torch.rand(B, N, generator=g) < 0.7, argmax.gather(1, parent_row), tokens)
    tokens[2, 4] = -1  # an unused slot
    q = torch.softmax(torch.randn(B, N, V, generator=g), -1)
    temperature = torch.tensor([0.0, 0.9, 1.2])
    top_k = torch.tensor([0, 0, 30])
    top_p = torch.tensor([1.0, 0.85, 1.0])
    dev = device_for(backend)
    for draft_probs in (q, None):
        args = (logits.to(dev), tokens.to(dev), parents.to(dev), None if draft_probs is None else draft_probs.to(dev))
        kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=7, max_depth=4, backend=backend)
        plain = ops.verify_tree(*args, **kw)
        assert len(plain) == 3
        out, n, nodes, processed, raw = (t.cpu() for t in ops.verify_tree(*args, return_logprobs=True, **kw))
        for a, b in zip(plain, (out, n, nodes)):
            assert torch.equal(a.cpu(), b)
        assert processed.shape == raw.shape == (B, 5) and processed.dtype == torch.float32
        positions = torch.cat([torch.zeros(B, 1, dtype=torch.long), (nodes + 1).clamp(min=0)], 1)
        want_p, want_r = expected_logprobs(logits, positions, out, temperature, top_k, top_p)
        assert_logprobs(processed, want_p)
        assert_logprobs(raw, want_r)
        assert torch.equal(processed[0], raw[0])  # greedy row
        assert int(n.max()) >= 2  # paths below the root were checked


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sample_logprobs_match_float64(backend, dtype):
    B, V = 5, 300
    logits = (torch.randn(B, V, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)
    logits[4] = NEG_INF  # no finite logit: token -1, logprobs -inf
    temperature = torch.tensor([0.0, 0.5, 1.0, 2.0, 1.0])
    top_k = torch.tensor([3, 0, 40, 0, 0])
    top_p = torch.tensor([1.0, 0.7, 1.0, 0.95, 1.0])
    dev = device_for(backend)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=3, backend=backend)
    tok0, probs0 = ops.sample(logits.to(dev), **kw)
    tok, probs, processed, raw = (t.cpu() for t in ops.sample(logits.to(dev), return_logprobs=True, **kw))
    assert torch.equal(tok, tok0.cpu()) and torch.equal(probs, probs0.cpu())
    assert processed.shape == raw.shape == (B,) and processed.dtype == torch.float32
    want_p, want_r = expected_logprobs(logits[:, None], torch.zeros(B, 1, dtype=torch.long), tok[:, None],
                                       temperature, top_k, top_p)
    assert_logprobs(processed, want_p[:, 0])
    assert_logprobs(raw, want_r[:, 0])
    assert processed[0] == raw[0] and processed[4] == NEG_INF and raw[4] == NEG_INF
    # processed agrees with the returned distribution where float32 holds it
    assert math.isclose(math.exp(float(processed[1])), float(probs[1, tok[1]]), rel_tol=1e-4)


def test_sample_logprobs_do_not_underflow(backend):
    """A token far in the tail keeps a finite logprob (log(probs) would be -inf in float32)."""
    V = 64
    logits = torch.zeros(1, V)
    logits[0, 0] = 200.0  # raw logprob of the others: about -200
    dev = device_for(backend)
    tok, _, processed, raw = ops.sample(logits.to(dev), temperature=1.0, seed=0, backend=backend,
                                        return_logprobs=True)
    assert int(tok) == 0
    greedy = ops.verify(logits[:, None].expand(1, 2, V).contiguous().to(dev), torch.tensor([[5]]).to(dev),
                        temperature=0.0, backend=backend, return_logprobs=True)
    # the greedy rejection emits the argmax; the slot after it is padding
    assert greedy[2][0, 0].item() == pytest.approx(-math.log1p((V - 1) * math.exp(-200.0)), abs=1e-6)
    assert float(raw[0]) == pytest.approx(0.0, abs=1e-6) and float(processed[0]) == pytest.approx(0.0, abs=1e-6)
    tail = torch.zeros(1, 2, V)
    tail[0, :, 0] = 200.0
    out, n, processed, raw = ops.verify(tail.to(dev), torch.tensor([[7]]).to(dev), torch.zeros(1, 1, V).to(dev),
                                        temperature=1.0, seed=0, backend=backend, return_logprobs=True)
    # q(7) = 0 < p(7): the draft is accepted, with logprob ~ -200 (float32 p underflows there)
    assert int(n[0]) == 1 and int(out[0, 0]) == 7
    assert float(raw[0, 0]) == pytest.approx(-200.0, abs=1e-3)
    assert float(processed[0, 0]) == pytest.approx(-200.0, abs=1e-3)


def test_custom_ops_fake_shapes_and_opcheck():
    """The custom ops always return the logprob tensors: [B, K+1] / [B, D+1] / [B] float32 when
    asked, empty otherwise; fake (meta) implementations agree with the real ones."""
    B, K, V = 2, 2, 50
    g = torch.Generator().manual_seed(8)
    vargs = (torch.randn(B, K + 1, V, generator=g), torch.randint(0, V, (B, K), generator=g),
             torch.softmax(torch.randn(B, K, V, generator=g), -1), torch.ones(B) * 0.8,
             torch.zeros(B, dtype=torch.int64), torch.ones(B), torch.arange(B), torch.zeros(B, dtype=torch.int64))
    targs = (vargs[0], vargs[1], torch.tensor([[-1, 0], [-1, -1]]), vargs[2], *vargs[3:], 2)
    sargs = (vargs[0][:, 0], *vargs[3:])
    for backend in ("reference", "cpp"):
        if not backend_available(backend):
            continue
        for flag in (False, True):
            torch.library.opcheck(torch.ops.specdec.verify.default, (*vargs, backend, flag))
            torch.library.opcheck(torch.ops.specdec.verify_tree.default, (*targs, backend, flag))
            torch.library.opcheck(torch.ops.specdec.sample.default, (*sargs, backend, flag))
    meta = lambda args: tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)  # noqa: E731
    for flag, w in ((False, 0), (True, 1)):
        out = torch.ops.specdec.verify(*meta(vargs), "reference", flag)
        assert [tuple(t.shape) for t in out[2:]] == [(B, (K + 1) * w)] * 2
        out = torch.ops.specdec.verify_tree(*meta(targs), "reference", flag)
        assert [tuple(t.shape) for t in out[3:]] == [(B, 3 * w)] * 2
        out = torch.ops.specdec.sample(*meta(sargs), "reference", flag)
        assert [tuple(t.shape) for t in out[2:]] == [(B * w,)] * 2
        assert all(t.dtype == torch.float32 for t in out[2:])


def test_compile_with_logprobs():
    B, K, V = 2, 2, 50
    g = torch.Generator().manual_seed(1)
    logits, drafts = torch.randn(B, K + 1, V, generator=g), torch.randint(0, V, (B, K), generator=g)

    def step(logits, drafts):
        return ops.verify(logits, drafts, temperature=0.7, seed=3, backend="reference", return_logprobs=True)

    got = torch.compile(step, backend="aot_eager", fullgraph=True)(logits, drafts)
    want = step(logits, drafts)
    assert len(got) == 4
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_triton_logprobs_compile_for_sm90(tmp_path):
    """The interpreter accepts code the compiler rejects: record the launches of the three ops with
    return_logprobs=True (raw sums in the statistics pass, the logprobs kernel) and compile each for
    sm_90 in a child process with the interpreter off (tests/triton_compile.py)."""
    if not backend_available("triton") or torch.cuda.is_available():
        pytest.skip("needs triton through the interpreter")
    import json

    from triton_compile import compile_in_child, record_launches


    g = torch.Generator().manual_seed(5)
    B, K, V = 2, 2, 300
    with record_launches() as launches:
        for dtype in (torch.float32, torch.bfloat16):
            logits = torch.randn(B, K + 1, V, generator=g).to(dtype)
            drafts = torch.randint(0, V, (B, K), generator=g)
            kw = dict(temperature=torch.tensor([0.0, 0.8]), seed=1, backend="triton", return_logprobs=True)
            ops.verify(logits, drafts, None, top_p=0.9, **kw)
            ops.verify_tree(logits, drafts, torch.tensor([[-1, 0], [-1, -1]]), **kw)
            ops.sample(logits[:, 0], **kw)
    names = {json.loads(k)[1] for k in launches}
    assert {"softmax_stats_kernel", "_token_logprobs_kernel"} <= names
    ok, out = compile_in_child([json.loads(k) for k in launches], tmp_path)
    assert ok, out
