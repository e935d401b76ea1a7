"""specdec.ops.verify(..., method="block"): block verification (Sun et al., "Block Verification
Accelerates Speculative Decoding", ICLR 2025) on every backend.

Exact: a chi-square test on the joint of the first 2 and 3 emitted tokens, each row completed with
exact draws from the target, whose logits are a function of the whole prefix (a table per prefix
over a tiny vocabulary), so the target's joint distribution is known; with top-k / top-p, ragged
chains and greedy rows in the same call. Never worse: on tiny vocabularies the expected accepted
length of both methods is computed exactly by enumerating every drafted chain (block >= token),
and the backends' accepted lengths follow that enumeration. The backends agree with the reference
token for token. test_joint_check_has_power shows the exactness check can fail."""
import itertools

import pytest
import torch

from specdec import ops, reference
from stats import ALPHA, chi2_pvalue
from conftest import backend_available, device_for
from test_verify import target_probs

pytestmark = pytest.mark.usefixtures("one_thread")


def run(backend, logits, drafts, draft_probs=None, **kw):
    dev = device_for(backend)
    out, n = ops.verify(logits.to(dev), drafts.to(dev), None if draft_probs is None else draft_probs.to(dev),
                        backend=backend, method="block", **kw)
    assert out.dtype == torch.int64 and n.dtype == torch.int32 and out.shape == logits.shape[:2]
    return out.cpu(), n.cpu()


def per_row(B, **kw):
    """The reference's per-row tensors for ops.verify's keyword arguments."""
    spec = (("temperature", torch.float32, 1.0), ("top_k", torch.int64, 0), ("top_p", torch.float32, 1.0),
            ("seed", torch.int64, 0), ("offset", torch.int64, 0))
    return [ops._per_row(kw.get(k, d), B, t, "cpu", k) for k, t, d in spec]


# ---------------------------------------------------------------- a target with a known joint


class PrefixModel:
    """Target logits and draft probabilities over V tokens that depend on the whole prefix: one
    table row per prefix of length 0..L (row code(prefix)). Some target logits are -inf and some
    draft probabilities 0, so zero-probability drafts and q(x) = 0 < p(x) both occur."""

    def __init__(self, V, L, g):
        self.V = V
        self.start = [sum(V**k for k in range(n)) for n in range(L + 2)]
        rows = self.start[L + 1]
        self.logits = torch.randn(rows, V, generator=g) * 1.5
        banned = torch.rand(rows, V, generator=g) < 0.15
        banned[torch.arange(rows), torch.randint(0, V, (rows,), generator=g)] = False  # one token stays
        self.logits[banned] = -torch.inf
        # a drafter that half agrees with the target, with a few impossible tokens
        q = 0.5 * torch.softmax(self.logits, -1) + 0.5 * torch.softmax(torch.randn(rows, V, generator=g) * 2, -1)
        impossible = torch.rand(rows, V, generator=g) < 0.1
        impossible[torch.arange(rows), q.argmax(-1)] = False  # one token stays
        q[impossible] = 0.0
        self.q = q / q.sum(-1, keepdim=True)

    def code(self, prefix: torch.Tensor) -> torch.Tensor:
        """[N, l] token ids -> [N] table rows."""
        n, l = prefix.shape
        weights = torch.tensor([self.V ** (l - 1 - i) for i in range(l)], dtype=torch.int64)
        return self.start[l] + (prefix.long() * weights).sum(1) if l else torch.zeros(n, dtype=torch.int64)

    def probs(self, temperature, top_k, top_p):
        """The processed target distribution of every table row (greedy: one-hot at the argmax)."""
        if temperature <= 0:
            return torch.nn.functional.one_hot(self.logits.argmax(-1), self.V).double()
        return target_probs(self.logits, temperature, top_k, top_p)

    def draft(self, N, K, g):
        """N chains of K drafts, each drawn from q of its prefix: (drafts [N, K], draft_probs
        [N, K, V], target logits [N, K+1, V])."""
        drafts = torch.zeros(N, K, dtype=torch.int64)
        q = torch.zeros(N, K, self.V)
        for i in range(K):
            q[:, i] = self.q[self.code(drafts[:, :i])]
            drafts[:, i] = torch.multinomial(q[:, i], 1, generator=g)[:, 0]
        logits = torch.stack([self.logits[self.code(drafts[:, :j])] for j in range(K + 1)], 1)
        return drafts, q, logits


def complete(model, probs, out, n, m, g):
    """The first m tokens of each row: the emitted ones, then exact draws from the target
    (``probs``: the model's processed table). Returns [N, m]."""
    N = out.shape[0]
    seq = torch.full((N, m), -1, dtype=torch.int64)
    have = (n.long() + 1).clamp(max=m)
    for j in range(m):
        emitted = j < have
        draw = torch.multinomial(probs[model.code(seq[:, :j].clamp(min=0))].float(), 1, generator=g)[:, 0]
        seq[:, j] = torch.where(emitted, out[:, min(j, out.shape[1] - 1)], draw)
    return seq


def joint(model, probs, m):
    """The target's exact joint of the first m tokens, over all V^m sequences (lexicographic)."""
    out = []
    for seq in itertools.product(range(model.V), repeat=m):
        pr = 1.0
        for i in range(m):
            pr *= float(probs[model.code(torch.tensor([seq[:i]], dtype=torch.int64))[0], seq[i]])
        out.append(pr)
    return torch.tensor(out, dtype=torch.float64)


GROUPS = [  # (temperature, top_k, top_p, drafts per row): one call, rows of every group mixed
    (1.0, 0, 1.0, 3),
    (0.8, 3, 1.0, 2),  # ragged: the third draft is -1
    (1.2, 0, 0.8, 3),
    (0.0, 0, 1.0, 3),  # greedy
]


def joint_pvalues(backend, model, drafts, q, logits, n_per_group, g, method="block"):
    """p-values of the first 2 and 3 emitted tokens of each group against the target's joint."""
    G = len(GROUPS)
    N = n_per_group * G
    group = torch.arange(N) % G
    temperature = torch.tensor([GROUPS[k][0] for k in group.tolist()])
    top_k = torch.tensor([GROUPS[k][1] for k in group.tolist()])
    top_p = torch.tensor([GROUPS[k][2] for k in group.tolist()])
    drafts = drafts.clone()
    for k, (_, _, _, kk) in enumerate(GROUPS):
        drafts[group == k, kk:] = -1
    dev = device_for(backend)
    out, n = ops.verify(logits.to(dev), drafts.to(dev), q.to(dev), temperature=temperature.to(dev),
                        top_k=top_k.to(dev), top_p=top_p.to(dev), seed=(torch.arange(N) * 7 + 1).to(dev),
                        offset=3, method=method, backend=backend)
    out, n = out.cpu(), n.cpu()
    pvalues = {}
    for k, (t, tk, tp, _) in enumerate(GROUPS):
        rows = group == k
        probs = model.probs(t, tk, tp)
        for m in (2, 3):
            seq = complete(model, probs, out[rows], n[rows], m, g)
            index = (seq * torch.tensor([model.V ** (m - 1 - i) for i in range(m)])).sum(1)
            pvalues[(k, m)] = chi2_pvalue(index, joint(model, probs, m))
    return pvalues, n, group


def test_joint_of_first_tokens_follows_target(fast_backend):
    V, K, per_group = 4, 3, 12_000
    g = torch.Generator().manual_seed(2025)
    model = PrefixModel(V, K, g)
    drafts, q, logits = model.draft(per_group * len(GROUPS), K, g)
    pvalues, n, group = joint_pvalues(fast_backend, model, drafts, q, logits, per_group, g)
    for key, pv in pvalues.items():
        assert pv > ALPHA, f"group {GROUPS[key[0]]}, first {key[1]} tokens: chi-square p-value {pv:.2e}"
    assert (n[group == 1] <= 2).all() and n.float().mean() > 0.8  # ragged rows; deep positions reached


def test_joint_check_has_power():
    """The same check fails a verifier told the wrong draft distribution (drafts drawn from one q,
    another passed as draft_probs): the acceptance test is then wrong by the ratio of the two."""
    V, K, per_group = 4, 3, 12_000
    g = torch.Generator().manual_seed(2025)
    model = PrefixModel(V, K, g)
    drafts, q, logits = model.draft(per_group * len(GROUPS), K, g)
    wrong = torch.softmax(torch.log(q + 1e-3) * 0.5, -1)  # flatter than the q the drafts came from
    pvalues, _, _ = joint_pvalues("reference", model, drafts, wrong, logits, per_group, g)
    assert min(pvalues[(k, m)] for k in range(3) for m in (2, 3)) < ALPHA


# ---------------------------------------------------------------- never worse, by enumeration


def exact_accepted(p_tab, q_tab, model, K):
    """Exact distributions of the accepted length under token and block verification, written
    from the algorithms (not the library): [K+1] float64 each, summed over every drafted chain
    weighted by its draft probability. p_tab, q_tab: the model's target and draft table."""
    token = torch.zeros(K + 1, dtype=torch.float64)
    block = torch.zeros(K + 1, dtype=torch.float64)
    p_tab, q_tab = p_tab.double(), q_tab.double()
    q_tab = q_tab / q_tab.sum(-1, keepdim=True)  # a float32 table sums to 1 only within its rounding
    for chain in itertools.product(range(model.V), repeat=K):
        rows = [int(model.code(torch.tensor([chain[:i]], dtype=torch.int64))[0]) for i in range(K + 1)]
        weight = 1.0
        for i in range(K):
            weight *= float(q_tab[rows[i], chain[i]])
        if weight == 0:
            continue
        ratio = [float(p_tab[rows[i], chain[i]] / q_tab[rows[i], chain[i]]) for i in range(K)]
        # token: accept draft i with probability min(1, ratio[i]), stop at the first rejection
        reach = 1.0
        for i in range(K):
            token[i] += weight * reach * (1 - min(1.0, ratio[i]))
            reach *= min(1.0, ratio[i])
        token[K] += weight * reach
        # block: w_i = min(1, w_{i-1} ratio), h_i (h_K = w_K), P(tau = i) = h_i prod_{k > i} (1 - h_k)
        w = [1.0]
        for i in range(K):
            w.append(min(1.0, w[-1] * ratio[i]))
        h = [0.0] * (K + 1)
        for i in range(1, K):
            resid = float((w[i] * p_tab[rows[i]] - q_tab[rows[i]]).clamp(min=0).sum())
            h[i] = resid / (resid + 1 - w[i]) if resid + 1 - w[i] > 0 else 1.0
        h[K] = w[K]
        rest = 1.0
        for i in range(K, 0, -1):
            block[i] += weight * rest * h[i]
            rest *= 1 - h[i]
        block[0] += weight * rest
    return token, block


def test_enumeration_reproduces_the_papers_example():
    """Sun et al.'s example: V = {a, b}, target (1/3, 2/3), drafter (2/3, 1/3) in every context,
    two drafts: 10/9 accepted tokens per step for token verification, 11/9 for block verification."""
    model = PrefixModel(2, 2, torch.Generator().manual_seed(0))
    p_tab = torch.tensor([[1 / 3, 2 / 3]], dtype=torch.float64).expand(len(model.logits), 2)
    q_tab = torch.tensor([[2 / 3, 1 / 3]], dtype=torch.float64).expand(len(model.logits), 2)
    token, block = exact_accepted(p_tab, q_tab, model, 2)
    lengths = torch.arange(3, dtype=torch.float64)
    assert abs(float(token @ lengths) - 10 / 9) < 1e-12 and abs(float(block @ lengths) - 11 / 9) < 1e-12


def test_block_is_never_worse_on_random_cases():
    g = torch.Generator().manual_seed(11)
    gains = []
    for case in range(40):
        V, K = (2, 3) if case % 2 else (3, 2)
        model = PrefixModel(V, K, g)
        temperature = [1.0, 0.7, 1.5][case % 3]
        p_tab = model.probs(temperature, 0, 1.0)
        token, block = exact_accepted(p_tab, model.q, model, K)
        assert abs(float(token.sum()) - 1) < 1e-9 and abs(float(block.sum()) - 1) < 1e-9
        lengths = torch.arange(K + 1, dtype=torch.float64)
        gain = float(block @ lengths) - float(token @ lengths)
        assert gain >= -1e-12, f"case {case}: block accepts {gain:.3e} fewer tokens than token verification"
        gains.append(gain)
    assert sum(x > 1e-6 for x in gains) >= 10  # often strictly better, not just equal


def test_one_hot_drafts_gain_nothing():
    """A deterministic drafter (one-hot q): every prefix is already accepted with its target
    probability, so both methods accept the same number of drafts in distribution (why
    draft_probs=None runs token verification under method="block")."""
    g = torch.Generator().manual_seed(12)
    for case in range(10):
        V, K = (3, 3) if case % 2 else (4, 2)
        model = PrefixModel(V, K, g)
        one_hot = torch.nn.functional.one_hot(torch.randint(0, V, (len(model.logits),), generator=g), V)
        token, block = exact_accepted(model.probs(1.0, 0, 1.0), one_hot.double(), model, K)
        assert torch.allclose(token, block, atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", ["block", "token"])
def test_accepted_lengths_follow_the_enumeration(fast_backend, method):
    """The backends' accepted lengths have the enumerated distribution (so the implementation is
    the algorithm whose expectation was compared above), and block's differs from token's."""
    V, K, N = 3, 3, 30_000
    g = torch.Generator().manual_seed(1)  # a case where block gains 0.18 accepted tokens per step
    model = PrefixModel(V, K, g)
    drafts, q, logits = model.draft(N, K, g)
    token, block = exact_accepted(model.probs(1.0, 0, 1.0), model.q, model, K)
    out, n = ops.verify(logits.to(device_for(fast_backend)), drafts, q, seed=torch.arange(N) * 3 + 2,
                        method=method, backend=fast_backend)
    want, other = (block, token) if method == "block" else (token, block)
    assert chi2_pvalue(n.cpu().long(), want) > ALPHA
    assert chi2_pvalue(n.cpu().long(), other) < ALPHA
    assert (float(block @ torch.arange(K + 1.0, dtype=torch.float64))
            > float(token @ torch.arange(K + 1.0, dtype=torch.float64)) + 0.1)


# ---------------------------------------------------------------- exact cases and agreement


@pytest.mark.parametrize("B,K,V,Vd,dtype", [
    (4, 3, 16, 16, torch.float32),
    (4, 4, 300, 290, torch.bfloat16),
    (3, 2, 700, 700, torch.float16),
])
def test_backend_matches_reference(backend, B, K, V, Vd, dtype):
    if backend == "reference":
        pytest.skip("the reference is what the others are compared with")
    g = torch.Generator().manual_seed(B * K + V)
    logits = (torch.randn(B, K + 1, V, generator=g) * 2).to(dtype)
    logits[0, 1, : V // 3] = -torch.inf
    q = torch.softmax(torch.randn(B, K, Vd, generator=g) * 2, -1)
    q[:, :, ::5] = 0.0
    drafts = torch.stack([torch.multinomial(q[:, i], 1, generator=g)[:, 0] for i in range(K)], 1)
    drafts[1, 0] = logits[1, 0, :Vd].float().argmax()
    drafts[-1, K // 2:] = -1  # ragged
    kw = dict(temperature=torch.tensor([1.0, 0.0, 0.7, 1.3])[:B], top_k=torch.tensor([0, 0, 5, 0])[:B],
              top_p=torch.tensor([1.0, 1.0, 1.0, 0.85])[:B], offset=torch.arange(B) * 10)
    for seed in range(3):
        kw["seed"] = torch.arange(B) + 10 * seed
        want = reference.verify_block(logits, drafts, q, *per_row(B, **kw))
        got = run(backend, logits, drafts, q, **kw)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_edge_cases(backend):
    """p(draft) = 0: nothing from it on is kept and the positions after it are never read (a
    dead one does not void the row); an out-of-range id ends the chain like a -1; no drafts: the
    bonus; q(x) = 0 < p(x) with p >= q elsewhere: every draft kept."""
    V = 50
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 4, V, generator=g)
    q = torch.softmax(torch.randn(4, 3, V, generator=g), -1)
    drafts = torch.tensor([[5, 6, 7], [5, 6, 7], [1, V + 3, 2], [-1, -1, -1]])
    logits[0, 1, 6] = -torch.inf  # p(draft 1) = 0 in row 0
    logits[0, 2:] = -torch.inf  # ... and nothing finite after it
    for seed in range(4):
        seed = torch.arange(4) + 10 * seed
        out, n = run(backend, logits, drafts, q, seed=seed)
        assert n[0] <= 1 and out[0, n[0]] >= 0 and (out[0, n[0] + 1:] == -1).all()
        assert n[2] <= 1 and (out[2, 2:] == -1).all() and out[2, n[2]] >= 0
        assert n[3] == 0 and out[3, 0] >= 0 and (out[3, 1:] == -1).all()
        want = reference.verify_block(logits, drafts, q, *per_row(4, seed=seed))
        assert torch.equal(out, want[0]) and torch.equal(n, want[1])
    # the target's own sample is the bonus: no drafts gives the sample op's token
    tok, _ = ops.sample(logits[:, 0], seed=9, backend="reference")
    out, n = run(backend, logits, torch.full((4, 3), -1), q, seed=9)
    assert torch.equal(out[:, 0], tok)
    # q(x) = 0 < p(x) at every draft: w stays 1 and the chain's tests all hold
    q0 = q.clone()
    q0[torch.arange(4)[:, None], torch.arange(3)[None], drafts.clamp(0, V - 1)] = 0.0
    target = torch.zeros(2, 4, V)  # a uniform target: p(x) = 1/V > 0 = q(x)
    out, n = run(backend, target, drafts[:2], q0[:2], seed=1)
    assert n.tolist() == [3, 3] and out[:, :3].tolist() == drafts[:2].tolist()


def test_without_draft_probs_and_greedy_rows_block_is_token(backend):
    """With a one-hot q (draft_probs None) block and token verification coincide, and greedy rows
    follow the argmax: method="block" returns method="token"'s tokens there."""
    dev = device_for(backend)
    g = torch.Generator().manual_seed(4)
    B, K, V = 4, 3, 111
    logits = torch.randn(B, K + 1, V, generator=g)
    q = torch.softmax(torch.randn(B, K, V, generator=g), -1)
    drafts = torch.randint(0, V, (B, K), generator=g)
    drafts[:2] = logits[:2, :K].argmax(-1)
    drafts[1, 1] = (drafts[1, 1] + 1) % V
    for draft_probs, temperature in ((None, 1.0), (None, torch.tensor([0.0, 1.0, 0.5, 0.0])), (q, 0.0)):
        args = (logits.to(dev), drafts.to(dev), None if draft_probs is None else draft_probs.to(dev))
        a = ops.verify(*args, temperature=temperature, seed=8, method="block", backend=backend)
        b = ops.verify(*args, temperature=temperature, seed=8, method="token", backend=backend)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_default_method_is_token_and_bad_method_raises():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 3, 40, generator=g)
    q = torch.softmax(torch.randn(3, 2, 40, generator=g), -1)
    drafts = torch.randint(0, 40, (3, 2), generator=g)
    for backend in ("reference", "cpp"):
        if backend_available(backend):
            a = ops.verify(logits, drafts, q, seed=1, backend=backend)
            b = ops.verify(logits, drafts, q, seed=1, backend=backend, method="token")
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match='method must be "token" or "block"'):
        ops.verify(logits, drafts, q, method="tree")


def test_rows_independent_and_keyed_by_seed_and_offset(backend):
    B, K, V = 4, 3, 111
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(B, K + 1, V, generator=g)
    q = torch.softmax(torch.randn(B, K, V, generator=g), -1)
    drafts = torch.multinomial(q.view(-1, V), 1, generator=g).view(B, K)
    seeds = torch.tensor([1, 2, 3, 4])
    a = run(backend, logits, drafts, q, seed=seeds, offset=5)
    assert torch.equal(a[0], run(backend, logits, drafts, q, seed=seeds, offset=5)[0])
    other = run(backend, torch.randn(B, K + 1, V, generator=g), (drafts + 1) % V, q, seed=seeds, offset=5)
    alone = run(backend, logits[2:3], drafts[2:3], q[2:3], seed=seeds[2:3], offset=5)
    flipped = run(backend, logits.flip(0), drafts.flip(0), q.flip(0), seed=seeds.flip(0), offset=5)
    assert torch.equal(alone[0][0], a[0][2]) and torch.equal(flipped[0].flip(0), a[0])
    assert not torch.equal(other[0], a[0])
    outs = {tuple(run(backend, logits, drafts, q, seed=seeds, offset=o)[0].flatten().tolist()) for o in range(6)}
    assert len(outs) > 1


def test_opcheck_and_compile():
    B, K, V = 2, 2, 50
    args = (torch.randn(B, K + 1, V), torch.randint(0, V, (B, K)), torch.softmax(torch.randn(B, K, V), -1),
            torch.ones(B), torch.zeros(B, dtype=torch.int64), torch.ones(B), torch.arange(B),
            torch.zeros(B, dtype=torch.int64))
    for backend in ("reference", "cpp"):
        if backend_available(backend):
            torch.library.opcheck(torch.ops.specdec.verify_block.default, (*args, backend))

    def step(logits, drafts, q):
        return ops.verify(logits, drafts, q, temperature=0.7, seed=3, method="block", backend="reference")

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(*args[:3])[0], step(*args[:3])[0])


def test_triton_kernel_compiles_for_sm90(tmp_path):
    """The interpreter accepts code that the compiler rejects: record the block kernel's launches
    (fp32 and bf16 logits, with and without top-k/top-p, greedy and sampled rows) and compile each
    for sm_90 in a child process with the interpreter off (tests/triton_compile.py)."""
    import json
    import os

    if torch.cuda.is_available():
        pytest.skip("on a GPU the other tests compile the kernel already")
    if not backend_available("triton") or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs triton under its interpreter")
    import specdec.kernels.verify_block as kvb
    from triton_compile import compile_in_child, record_launches


    g = torch.Generator().manual_seed(5)
    B, K, V = 2, 2, 600
    t, _, _, seed, offset = per_row(B, temperature=torch.tensor([0.0, 0.8]), seed=torch.tensor([1, 2]))
    with record_launches() as launches:
        for dtype in (torch.float32, torch.bfloat16):
            logits = torch.randn(B, K + 1, V, generator=g).to(dtype)
            q = torch.softmax(torch.randn(B, K, V, generator=g), -1)
            drafts = torch.randint(0, V, (B, K), generator=g)
            for top_k, top_p in ((None, None), (torch.tensor([0, 5]), torch.tensor([1.0, 0.9]))):
                kvb.verify_block(logits, drafts, q, t, top_k, top_p, seed, offset)
    assert any("_verify_block_kernel" in k for k in launches)
    ok, out = compile_in_child([json.loads(k) for k in launches], tmp_path)
    assert ok, out
