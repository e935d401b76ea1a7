"""specdec.ops.verify: the same suite over every backend (reference, C++, Triton).

Exact cases are asserted exactly; sampling is checked with a chi-square test per position on
fixed seeds, with enough samples that a 1% bias fails (test_chi2_has_power proves it)."""
import pytest
import torch

from specdec import ops, reference
from stats import ALPHA, biased, block_masses, chi2_pvalue
from conftest import backend_available, device_for


def run(backend, logits, drafts, draft_probs=None, **kw):
    dev = device_for(backend)
    out, n = ops.verify(logits.to(dev), drafts.to(dev),
                        None if draft_probs is None else draft_probs.to(dev), backend=backend, **kw)
    assert out.dtype == torch.int64 and n.dtype == torch.int32
    assert out.shape == (logits.shape[0], logits.shape[1]) and n.shape == (logits.shape[0],)
    return out.cpu(), n.cpu()


def check_layout(out, n, drafts):
    """Accepted drafts, then exactly one token, then -1; ids inside the vocabulary."""
    for b in range(out.shape[0]):
        k = int(n[b])
        assert torch.equal(out[b, :k], drafts[b, :k].long())
        assert out[b, k] >= 0
        assert (out[b, k + 1:] == -1).all()


# ---------------------------------------------------------------- exact: greedy


@pytest.mark.parametrize("B,K,V", [(1, 1, 111), (3, 4, 111), (5, 8, 1000)])
def test_greedy_all_accepted(backend, B, K, V):
    g = torch.Generator().manual_seed(B * 100 + K)
    logits = torch.randn(B, K + 1, V, generator=g)
    argmax = logits.argmax(-1)
    out, n = run(backend, logits, argmax[:, :K], temperature=0.0)
    assert torch.equal(n, torch.full((B,), K, dtype=torch.int32))
    assert torch.equal(out, argmax)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_first_mismatch(backend, dtype):
    B, K, V = 4, 5, 111
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(B, K + 1, V, generator=g).to(dtype)
    argmax = logits.float().argmax(-1)
    drafts = argmax[:, :K].clone()
    mismatch_at = [0, 2, 4, K]  # K: no mismatch
    for b, j in enumerate(mismatch_at):
        if j < K:
            drafts[b, j] = (drafts[b, j] + 1) % V
    out, n = run(backend, logits, drafts, temperature=0.0)
    for b, j in enumerate(mismatch_at):
        assert n[b] == j
        assert out[b, j] == argmax[b, j]
        assert torch.equal(out[b, :j], argmax[b, :j])
        assert (out[b, j + 1:] == -1).all()


def test_greedy_ragged_rows_and_ties(backend):
    V = 111
    logits = torch.randn(3, 4, V, generator=torch.Generator().manual_seed(3))
    logits[:, :, 40] = 50.0
    logits[:, :, 9] = 50.0  # a tie: the lowest id (9) is the argmax, like torch.argmax
    drafts = torch.tensor([[9, 9, -1], [9, -1, -1], [40, -1, -1]])
    out, n = run(backend, logits, drafts, temperature=0.0)
    assert n.tolist() == [2, 1, 0]
    assert out.tolist() == [[9, 9, 9, -1], [9, 9, -1, -1], [9, -1, -1, -1]]


def test_greedy_ignores_draft_probs_and_top_k(backend):
    logits = torch.randn(2, 3, 111, generator=torch.Generator().manual_seed(4))
    argmax = logits.argmax(-1)
    q = torch.zeros(2, 2, 111)  # q(x) = 0 would always accept in a sampled row
    out, n = run(backend, logits, argmax[:, :2], q, temperature=0.0, top_k=3, top_p=0.5)
    assert torch.equal(out, argmax) and n.tolist() == [2, 2]


def test_mixed_greedy_and_sampled_rows(backend):
    B, K, V = 4, 3, 111
    logits = torch.randn(B, K + 1, V, generator=torch.Generator().manual_seed(5)) * 3
    argmax = logits.argmax(-1)
    temperature = torch.tensor([0.0, 1.0, 0.0, 0.7])
    out, n = run(backend, logits, argmax[:, :K], temperature=temperature, seed=11)
    for b in (0, 2):
        assert n[b] == K and torch.equal(out[b], argmax[b])
    check_layout(out, n, argmax[:, :K])


def test_nan_logits_are_never_the_argmax(backend):
    logits = torch.randn(2, 2, 111, generator=torch.Generator().manual_seed(6))
    logits[:, :, 0] = float("nan")
    logits[:, :, 1] = float("inf")  # non-finite: treated as -inf
    want = torch.where(torch.isfinite(logits), logits, -torch.inf).argmax(-1)
    out, n = run(backend, logits, want[:, :1], temperature=0.0)
    assert torch.equal(out, want)
    out, n = run(backend, logits, want[:, :1], temperature=1.0, seed=1)
    assert ((out >= 2) | (out == -1)).all()


def test_tail_of_vocabulary_never_emitted(backend):
    # mass piled on the last ids: an unmasked padding tail would show up as ids >= V
    for V in (111, 130):
        logits = torch.full((3, 3, V), -30.0)
        logits[:, :, -1] = 0.0
        logits[:, :, -2] = 0.0
        out, n = run(backend, logits, torch.full((3, 2), 0), temperature=1.0, seed=2)
        assert out.max() < V and out[torch.arange(3), n.long()].min() >= V - 2


# ---------------------------------------------------------------- exact: sampled edge cases


def one_hot_logits(B, K1, V, ids):
    logits = torch.full((B, K1, V), float("-inf"))
    logits.scatter_(2, ids[..., None], 0.0)
    return logits


def test_one_hot_target(backend):
    V = 111
    ids = torch.tensor([[5, 6, 7], [5, 6, 7]])
    logits = one_hot_logits(2, 3, V, ids)
    drafts = torch.tensor([[5, 6], [5, 9]])
    q = torch.softmax(torch.randn(2, 2, V, generator=torch.Generator().manual_seed(1)), -1)
    for draft_probs in (q, None):
        out, n = run(backend, logits, drafts, draft_probs, temperature=1.0, seed=3)
        assert out.tolist() == [[5, 6, 7], [5, 6, -1]] and n.tolist() == [2, 1]


def test_zero_probability_draft_always_rejected_and_q_zero_accepted(backend):
    V, B = 16, 64
    logits = torch.randn(B, 2, V, generator=torch.Generator().manual_seed(2))
    logits[:, 0, 3] = -torch.inf  # p(3) = 0 at position 0
    q = torch.full((B, 1, V), 1.0 / (V - 1))
    q[:, 0, 4] = 0.0  # q(4) = 0 < p(4)
    seeds = torch.arange(B)
    out, n = run(backend, logits, torch.full((B, 1), 3), q, temperature=1.0, seed=seeds)
    assert (n == 0).all() and (out[:, 0] != 3).all()
    out, n = run(backend, logits, torch.full((B, 1), 4), q, temperature=1.0, seed=seeds)
    assert (n == 1).all()


def test_deterministic_draft_rejection_excludes_the_draft(backend):
    # draft_probs=None: after a rejection the token comes from p with the draft removed
    V, B = 16, 256
    logits = torch.zeros(B, 2, V)
    logits[:, 0, 7] = 2.0
    out, n = run(backend, logits, torch.full((B, 1), 7), None, temperature=1.0, seed=torch.arange(B))
    rejected = n == 0
    assert 0 < int(rejected.sum()) < B
    assert (out[rejected, 0] != 7).all()


def test_residual_zero_samples_from_target(backend):
    # q >= p everywhere (q is not normalised): the residual has no mass, so sample from p
    V, B = 16, 400
    logits = torch.full((B, 2, V), -torch.inf)
    logits[:, :, 1] = 0.0
    logits[:, :, 2] = 0.0
    q = torch.zeros(B, 1, V)
    q[:, 0, 1] = 1.0
    q[:, 0, 2] = 1.0
    out, n = run(backend, logits, torch.full((B, 1), 1), q, temperature=1.0, seed=torch.arange(B))
    rejected = n == 0
    emitted = out[rejected, 0]
    assert 100 < int(rejected.sum()) < 300  # accepted with probability 1/2
    assert set(emitted.tolist()) == {1, 2}


def test_out_of_range_draft_ids_are_rejected(backend):
    V, Vd = 111, 100
    logits = torch.randn(4, 3, V, generator=torch.Generator().manual_seed(8))
    q = torch.softmax(torch.randn(4, 2, Vd), -1)
    drafts = torch.tensor([[Vd, 1], [-5, 1], [V + 7, 2], [10**9, 3]])
    for draft_probs in (q, None):
        out, n = run(backend, logits, drafts, draft_probs, temperature=1.0, seed=1)
        assert (n == 0).all() and (out[:, 0] >= 0).all() and (out[:, 0] < V).all()
        assert (out[:, 1:] == -1).all()
    out, n = run(backend, logits, drafts, q, temperature=0.0)
    assert (n == 0).all() and torch.equal(out[:, 0], logits[:, 0].argmax(-1))


def test_no_finite_logit_emits_nothing(backend):
    logits = torch.randn(3, 3, 111, generator=torch.Generator().manual_seed(9))
    logits[1, 0] = float("nan")  # the first position is always reached: row 1 emits nothing
    logits[2, 2] = -torch.inf  # position 2 is not live for row 2 (its drafts end at 1)
    drafts = torch.tensor([[1, 2], [1, 2], [3, -1]])
    for t in (0.0, 1.0):
        out, n = run(backend, logits, drafts, temperature=t, seed=4)
        assert out[1].tolist() == [-1, -1, -1] and n[1] == 0
        assert out[0, n[0]] >= 0 and out[2, n[2]] >= 0
    with pytest.raises(ValueError, match="row 1"):
        ops.verify(logits, drafts, check=True)


def test_dead_position_after_the_stop_does_not_void_the_row(backend):
    """A grammar mask that bans everything past a rejection: the sequential algorithm stops at the
    rejection and emits its token; the all -inf positions after it are never looked at."""
    logits = torch.randn(2, 4, 111, generator=torch.Generator().manual_seed(10))
    drafts = torch.tensor([[5, 6, 7], [5, 6, 7]])
    logits[:, 0, 5] = -torch.inf  # p(draft) = 0 at position 0: rejected (sampled and greedy)
    logits[:, 1:] = -torch.inf
    for t in (0.0, 1.0):
        for q in (None, torch.softmax(torch.randn(2, 3, 111), -1)):
            out, n = run(backend, logits, drafts, q, temperature=t, seed=4)
            assert n.tolist() == [0, 0]
            assert (out[:, 0] >= 0).all() and (out[:, 0] != 5).all() and (out[:, 1:] == -1).all()
            ref = ops.verify(logits, drafts, q, temperature=t, seed=4, backend="reference")
            assert torch.equal(out.cpu(), ref[0])
    ops.verify(logits, drafts, temperature=1.0, seed=4, check=True)  # valid input: no error


def test_no_drafts_gives_a_sample_from_p(backend):
    logits = torch.randn(3, 1, 111)
    out, n = run(backend, logits, torch.empty(3, 0, dtype=torch.int64), temperature=0.0)
    assert torch.equal(out[:, 0], logits[:, 0].argmax(-1)) and (n == 0).all()


# ---------------------------------------------------------------- agreement between backends


@pytest.mark.parametrize("B,K,V,Vd,dtype,with_q", [
    (3, 4, 111, 111, torch.float32, True),
    (1, 1, 111, 100, torch.bfloat16, True),
    (3, 8, 333, 333, torch.float16, False),
    (2, 3, 32000, 31990, torch.float32, True),
])
def test_backend_matches_reference(backend, B, K, V, Vd, dtype, with_q):
    if backend == "reference":
        pytest.skip("the reference is what the others are compared with")
    g = torch.Generator().manual_seed(B * K + V)
    logits = (torch.randn(B, K + 1, V, generator=g) * 2).to(dtype)
    q = torch.softmax(torch.randn(B, K, Vd, generator=g) * 2, -1) if with_q else None
    # drafts: half from q-ish guesses, half the target's argmax, so both branches are taken
    drafts = torch.randint(0, Vd, (B, K), generator=g)
    drafts[:, ::2] = logits[:, :K:2].float().argmax(-1).clamp(max=Vd - 1)
    if B > 1:
        drafts[-1, K // 2:] = -1
    kw = dict(temperature=torch.tensor([0.0, 0.6, 1.0])[:B] if B > 1 else 0.8,
              top_k=torch.tensor([0, 20, 0])[:B] if B > 1 else 0,
              top_p=torch.tensor([1.0, 0.9, 0.8])[:B] if B > 1 else 0.95,
              seed=torch.tensor([5, 6, 7])[:B], offset=3)
    for seed_shift in range(3):
        kw["seed"] = kw["seed"] + seed_shift
        want = reference.verify(logits, drafts, q, *[ops._per_row(kw[k], B, d, "cpu", k) for k, d in (
            ("temperature", torch.float32), ("top_k", torch.int64), ("top_p", torch.float32),
            ("seed", torch.int64), ("offset", torch.int64))])
        got = run(backend, logits, drafts, q, **kw)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ---------------------------------------------------------------- seeding


def test_same_seed_same_tokens_and_rows_independent(backend):
    B, K, V = 4, 3, 111
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(B, K + 1, V, generator=g)
    q = torch.softmax(torch.randn(B, K, V, generator=g), -1)
    drafts = torch.multinomial(q.view(-1, V), 1, generator=g).view(B, K)
    seeds = torch.tensor([1, 2, 3, 4])
    a = run(backend, logits, drafts, q, seed=seeds, offset=5)
    b = run(backend, logits, drafts, q, seed=seeds, offset=5)
    assert torch.equal(a[0], b[0])
    # change the other rows: row 0 must not move; row 0 alone in a batch of 1: same tokens
    logits2, drafts2 = logits.clone(), drafts.clone()
    logits2[1:] = torch.randn(B - 1, K + 1, V, generator=g)
    drafts2[1:] = (drafts2[1:] + 1) % V
    c = run(backend, logits2, drafts2, q, seed=seeds, offset=5)
    d = run(backend, logits[:1], drafts[:1], q[:1], seed=seeds[:1], offset=5)
    assert torch.equal(a[0][0], c[0][0]) and torch.equal(a[0][0], d[0][0])
    # a different offset draws different numbers
    outs = {tuple(run(backend, logits, drafts, q, seed=seeds, offset=o)[0].flatten().tolist())
            for o in range(6)}
    assert len(outs) > 1


def test_int_seed_expands_per_row():
    seeds = ops.row_seeds(42, 8)
    assert seeds.dtype == torch.int64 and len(set(seeds.tolist())) == 8
    assert torch.equal(ops.row_seeds(42, 8)[3:5], ops.row_seeds(42, 2, first_row=3))


# ---------------------------------------------------------------- statistics


def target_probs(logits, temperature, top_k, top_p):
    """The exact target distribution per position, float64, written independently of the
    library: sort, cut, renormalise."""
    out = []
    for row in logits.double():
        s = row / temperature
        vals, idx = s.sort(descending=True)
        keep = torch.ones_like(vals, dtype=torch.bool)
        if top_k:
            keep[top_k:] = False
        p = torch.softmax(vals.masked_fill(~keep, -torch.inf), -1)
        if top_p < 1:
            c = p.cumsum(0)
            keep &= (c - p) < top_p
        p = torch.softmax(vals.masked_fill(~keep, -torch.inf), -1)
        out.append(torch.zeros_like(p).scatter(0, idx, p))
    return torch.stack(out)




@pytest.mark.parametrize("K,temperature,top_k,top_p,V", [
    (1, 1.0, 0, 1.0, 16),
    (3, 0.6, 0, 1.0, 40),
    (3, 1.0, 12, 1.0, 40),
    (3, 1.0, 0, 0.8, 40),
    (1, 0.6, 10, 0.9, 111),
])
def test_emitted_tokens_follow_target(fast_backend, K, temperature, top_k, top_p, V):
    N = 40_000
    g = torch.Generator().manual_seed(K * 1000 + V)
    logits = torch.randn(K + 1, V, generator=g) * 1.5
    p = target_probs(logits, temperature, top_k, top_p)
    # a draft distribution unlike the target (part reversed order of preference), on a slightly
    # smaller vocabulary: residual resampling does much of the work, yet deep positions are reached
    Vd = V - 3
    q = 0.6 * torch.softmax(logits[:K, :Vd] / temperature, -1) + 0.4 * torch.softmax(-logits[:K, :Vd] * 0.5, -1)
    drafts = torch.stack([torch.multinomial(q[i], N, replacement=True, generator=g) for i in range(K)], 1)
    out, n = run(fast_backend, logits.expand(N, K + 1, V), drafts, q.expand(N, K, Vd),
                 temperature=temperature, top_k=top_k, top_p=top_p, seed=torch.arange(N) * 7 + 1)
    for i in range(K + 1):
        emitted = out[:, i][out[:, i] >= 0]
        assert len(emitted) > 1000, f"position {i}: too few samples"
        pv = chi2_pvalue(emitted, p[i])
        assert pv > ALPHA, f"position {i}: chi-square p-value {pv:.2e}"


@pytest.mark.parametrize("with_q", [True, False])
def test_emitted_tokens_follow_target_across_race_blocks(fast_backend, with_q):
    """V = 700 spans three blocks of the two-level race (256, 256, 188 ids). The target puts most
    of its mass in the short last block and the draft most of its mass in the first, so a wrong
    block sum, block draw or tail handling shifts mass between blocks and fails the test."""
    N, K, V = 40_000, 1, 700
    g = torch.Generator().manual_seed(700 + with_q)
    logits = torch.randn(K + 1, V, generator=g)
    logits[:, 512:] += 2.5
    p = target_probs(logits, 1.0, 0, 1.0)
    q = torch.softmax(torch.randn(K, V, generator=g) + torch.where(torch.arange(V) < 256, 2.5, 0.0), -1)
    drafts = torch.stack([torch.multinomial(q[i], N, replacement=True, generator=g) for i in range(K)], 1)
    out, n = run(fast_backend, logits.expand(N, K + 1, V), drafts, q.expand(N, K, V) if with_q else None,
                 temperature=1.0, seed=torch.arange(N) * 5 + 3)
    for i in range(K + 1):
        emitted = out[:, i][out[:, i] >= 0]
        pv = chi2_pvalue(emitted, p[i])
        assert pv > ALPHA, f"position {i}: chi-square p-value {pv:.2e}"
        # per block as well: 1% of mass moved between blocks is invisible spread over 700 bins
        pv = chi2_pvalue(emitted // reference.RACE_BLOCK, block_masses(p[i], reference.RACE_BLOCK))
        assert pv > ALPHA, f"position {i}: chi-square p-value of the blocks {pv:.2e}"


def test_small_vocabulary_deterministic_draft_distribution(fast_backend):
    # draft_probs=None (n-gram drafter), drafts drawn from a distribution far from the target
    N, K, V = 40_000, 2, 16
    g = torch.Generator().manual_seed(99)
    logits = torch.randn(K + 1, V, generator=g) * 2
    p = target_probs(logits, 1.0, 0, 1.0)
    drafts = torch.randint(0, V, (N, K), generator=g)
    out, n = run(fast_backend, logits.expand(N, K + 1, V), drafts, None, temperature=1.0,
                 seed=torch.arange(N) + 10**6)
    for i in range(K + 1):
        emitted = out[:, i][out[:, i] >= 0]
        assert chi2_pvalue(emitted, p[i]) > ALPHA, f"position {i}"


def test_chi2_has_power():
    """The statistical checks above would fail a sampler with a 1% bias at their sample sizes."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(16, generator=g) * 1.5, -1)
    fair = torch.multinomial(p, 12_000, replacement=True, generator=g)
    unfair = torch.multinomial(biased(p, 0.01).float(), 12_000, replacement=True, generator=g)
    assert chi2_pvalue(fair, p) > ALPHA
    assert chi2_pvalue(unfair, p) < ALPHA


def test_block_chi2_has_power():
    """The per-block check above fails a two-level race that moves 1% of the mass between blocks."""
    g = torch.Generator().manual_seed(1)
    blocks = torch.tensor([0.15, 0.1, 0.75], dtype=torch.float64)
    fair = torch.multinomial(blocks, 40_000, replacement=True, generator=g)
    unfair = torch.multinomial(blocks + torch.tensor([0.0, -0.01, 0.01]), 40_000, replacement=True, generator=g)
    assert chi2_pvalue(fair, blocks) > ALPHA
    assert chi2_pvalue(unfair, blocks) < ALPHA


# ---------------------------------------------------------------- bad input


def test_bad_input_raises_clear_errors():
    L = torch.randn(2, 3, 50)
    d = torch.zeros(2, 2, dtype=torch.int64)
    cases = [
        (dict(target_logits=L[0], draft_token_ids=d), ValueError, "target_logits must be"),
        (dict(target_logits=L.long(), draft_token_ids=d), TypeError, "target_logits must be float"),
        (dict(target_logits=L, draft_token_ids=d.float()), TypeError, "draft_token_ids must be int"),
        (dict(target_logits=L, draft_token_ids=d[:, :1]), ValueError, r"\[B, K\] = \[2, 2\]"),
        (dict(target_logits=L, draft_token_ids=d, draft_probs=torch.rand(2, 2, 60)), ValueError, "Vd=60"),
        (dict(target_logits=L, draft_token_ids=d, draft_probs=torch.rand(2, 3, 50)), ValueError, "draft_probs must be"),
        (dict(target_logits=L, draft_token_ids=d, draft_probs=-torch.rand(2, 2, 50)), ValueError, ">= 0"),
        (dict(target_logits=L, draft_token_ids=d.to("meta")), ValueError, "is on meta"),
        (dict(target_logits=L, draft_token_ids=torch.tensor([[1, 50], [0, 0]])), ValueError, r"\[0, 50\)"),
        (dict(target_logits=L, draft_token_ids=torch.tensor([[-1, 3], [0, 0]])), ValueError, "follows a -1"),
        (dict(target_logits=L, draft_token_ids=d, temperature=float("nan")), ValueError, "temperature"),
        (dict(target_logits=L, draft_token_ids=d, top_p=0.0), ValueError, "top_p"),
        (dict(target_logits=L, draft_token_ids=d, top_p=1.5), ValueError, "top_p"),
        (dict(target_logits=L, draft_token_ids=d, top_k=-2), ValueError, "top_k"),
        (dict(target_logits=L, draft_token_ids=d, temperature=torch.ones(3)), ValueError, "temperature must be"),
        (dict(target_logits=L, draft_token_ids=d, temperature="hot"), TypeError, "temperature"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            ops.verify(**kw, check=True)
    with pytest.raises(ValueError, match="backend must be"):
        ops.verify(L, d, backend="cuda-magic")


def test_opcheck_and_compile():
    B, K, V = 2, 2, 50
    args = (torch.randn(B, K + 1, V), torch.randint(0, V, (B, K)), torch.softmax(torch.randn(B, K, V), -1),
            torch.ones(B), torch.zeros(B, dtype=torch.int64), torch.ones(B), torch.arange(B),
            torch.zeros(B, dtype=torch.int64))
    for backend in ("reference", "cpp"):
        if backend_available(backend):
            torch.library.opcheck(torch.ops.specdec.verify.default, (*args, backend))

    def step(logits, drafts, q):
        return ops.verify(logits, drafts, q, temperature=0.7, seed=3, backend="reference")

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = compiled(*args[:3])
    assert torch.equal(got[0], step(*args[:3])[0])
