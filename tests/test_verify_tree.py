"""specdec.ops.verify_tree: the same suite over every backend (reference, C++, Triton).

Exact cases are asserted exactly (token for token against the reference, and against the chain op
on chains); sampling is checked with chi-square tests per depth on fixed seeds: the first emitted
token against the target at the root, each later one against the target's conditional
distribution given the token before it (the target logits of a node depend only on its token, so
that conditional is known). test_sabotaged_residual_fails shows the tests can fail."""
import numpy as np
import pytest
import torch
from scipy import stats as sstats

from specdec import ops, reference
from stats import ALPHA, biased, chi2_pvalue
from conftest import backend_available, device_for

pytestmark = pytest.mark.usefixtures("one_thread")


def run(backend, logits, tokens, parents, draft_probs=None, **kw):
    dev = device_for(backend)
    out, n, nodes = ops.verify_tree(logits.to(dev), tokens.to(dev), parents.to(dev),
                                    None if draft_probs is None else draft_probs.to(dev),
                                    backend=backend, **kw)
    B, N1 = logits.shape[:2]
    D = N1 - 1 if kw.get("max_depth") is None else kw["max_depth"]
    assert out.dtype == torch.int64 and n.dtype == torch.int32 and nodes.dtype == torch.int64
    assert out.shape == (B, D + 1) and n.shape == (B,) and nodes.shape == (B, D)
    return out.cpu(), n.cpu(), nodes.cpu()


def check_layout(out, n, nodes, tokens, parents):
    """The accepted path is a root-to-node path of the tree whose tokens are output; then exactly
    one token, then -1."""
    for b in range(out.shape[0]):
        k = int(n[b])
        path = nodes[b, :k].tolist()
        assert (nodes[b, k:] == -1).all()
        prev = -1
        for i, node in enumerate(path):
            assert parents[b, node] == prev and out[b, i] == tokens[b, node]
            prev = node
        assert out[b, k] >= 0 and (out[b, k + 1:] == -1).all()


def per_row(B, **kw):
    """The reference's per-row tensors for the keyword arguments of ops.verify_tree."""
    spec = (("temperature", torch.float32, 1.0), ("top_k", torch.int64, 0), ("top_p", torch.float32, 1.0),
            ("seed", torch.int64, 0), ("offset", torch.int64, 0))
    return [ops._per_row(kw.get(k, d), B, t, "cpu", k) for k, t, d in spec]


def random_tree(B, N, V, g, ragged=True):
    """Random parents (each an earlier node or the root) and tokens; row 0 has unused tail slots
    and row 1 an unused slot in the middle (with no children) when ``ragged``."""
    parents = torch.full((B, N), -1, dtype=torch.int64)
    for i in range(1, N):
        parents[:, i] = torch.randint(-1, i, (B,), generator=g)
    tokens = torch.randint(0, V, (B, N), generator=g)
    if ragged and N > 3:
        tokens[0, N - 2:] = -1
        parents[0, N - 2:] = -1
        if B > 1:
            tokens[1, 2] = -1
            parents[1, 3:] = torch.where(parents[1, 3:] == 2, -1, parents[1, 3:])
    return tokens, parents


def draw_tree(shape, B, V, root_q, child_q, g, replacement=True):
    """A drafter's tree of the given shape (list of parents) per row: node i's token is drawn from
    root_q [V] (child of the root) or child_q[parent's token] ([V, V]); without replacement,
    siblings exclude the earlier siblings' tokens and q is that conditional distribution.
    Returns (tokens [B, N], draft_probs [B, N, V], parents [B, N])."""
    N = len(shape)
    tokens = torch.zeros(B, N, dtype=torch.int64)
    q = torch.zeros(B, N, V)
    rows = torch.arange(B)
    for i, p in enumerate(shape):
        base = root_q.expand(B, V).clone() if p == -1 else child_q[tokens[:, p]].clone()
        if not replacement:
            for s in range(i):
                if shape[s] == p:
                    base[rows, tokens[:, s]] = 0.0
            base = base / base.sum(-1, keepdim=True)
        q[:, i] = base
        tokens[:, i] = torch.multinomial(base, 1, replacement=True, generator=g)[:, 0]
    return tokens, q, torch.tensor(shape).expand(B, N).clone()


# ---------------------------------------------------------------- exact: greedy


def test_greedy_follows_the_argmax_path(backend):
    """Root -> a (argmax) -> b (argmax) is in the tree with decoys around it; the walk takes the
    first child equal to the argmax (a duplicate later sibling is never chosen)."""
    V = 111
    logits = torch.randn(2, 7, V, generator=torch.Generator().manual_seed(1))
    am = logits.argmax(-1)
    # nodes: 0 decoy, 1 = argmax of root, 2 = argmax of root again (duplicate), 3 child of 1 = argmax
    # of node 1, 4 decoy child of 1, 5 child of 3 (decoy), root logits index 0, node i at i + 1
    parents = torch.tensor([[-1, -1, -1, 1, 1, 3]] * 2)
    tokens = torch.stack([
        torch.tensor([(am[b, 0] + 1) % V, am[b, 0], am[b, 0], am[b, 2], (am[b, 2] + 3) % V, (am[b, 4] + 1) % V])
        for b in range(2)])
    out, n, nodes = run(backend, logits, tokens, parents, temperature=0.0)
    assert n.tolist() == [2, 2]
    assert nodes.tolist() == [[1, 3, -1, -1, -1, -1]] * 2
    for b in range(2):
        assert out[b].tolist() == [int(am[b, 0]), int(am[b, 2]), int(am[b, 4]), -1, -1, -1, -1]


def test_greedy_ignores_draft_probs_and_filters(backend):
    logits = torch.randn(2, 4, 111, generator=torch.Generator().manual_seed(2))
    am = logits.argmax(-1)
    parents = torch.tensor([[-1, 0, 1]] * 2)
    q = torch.zeros(2, 3, 111)  # q(x) = 0 would always accept in a sampled row
    out, n, nodes = run(backend, logits, am[:, :3].int(), parents.int(), q, temperature=0.0, top_k=3, top_p=0.5)
    assert torch.equal(out, am) and n.tolist() == [3, 3] and nodes.tolist() == [[0, 1, 2]] * 2


def test_no_nodes_and_max_depth(backend):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 1, 111, generator=g)
    empty = torch.empty(3, 0, dtype=torch.int64)
    out, n, nodes = run(backend, logits, empty, empty, temperature=0.0)
    assert torch.equal(out[:, 0], logits[:, 0].argmax(-1)) and (n == 0).all() and nodes.shape == (3, 0)
    # a chain of 3 argmax nodes: max_depth 1 accepts one node and emits the argmax after it
    logits = torch.randn(3, 4, 111, generator=g)
    am = logits.argmax(-1)
    parents = torch.tensor([[-1, 0, 1]] * 3)
    out, n, nodes = run(backend, logits, am[:, :3], parents, temperature=0.0, max_depth=1)
    assert out.tolist() == am[:, :2].tolist() and n.tolist() == [1] * 3 and nodes.tolist() == [[0]] * 3
    out, n, nodes = run(backend, logits, am[:, :3], parents, temperature=0.0, max_depth=0)
    assert out.tolist() == am[:, :1].tolist() and n.tolist() == [0] * 3
    out, n, nodes = run(backend, logits, am[:, :3], parents, temperature=0.0, max_depth=5)
    assert out[:, :4].tolist() == am.tolist() and (out[:, 4:] == -1).all() and (nodes[:, 3:] == -1).all()


# ---------------------------------------------------------------- exact: agreement


CASES = [  # B, N, V, dtype, with_q, filters
    (3, 6, 111, torch.float32, True, False),
    (3, 6, 300, torch.bfloat16, True, True),
    (1, 8, 300, torch.float32, False, False),
    (3, 8, 111, torch.float32, False, True),
    (3, 5, 111, torch.float16, True, False),
]


@pytest.mark.parametrize("B,N,V,dtype,with_q,filters", CASES)
def test_backend_matches_reference(backend, B, N, V, dtype, with_q, filters):
    """Random ragged trees; children often equal the target's argmax or are drawn from a draft
    close to the target, so paths go deep and siblings get rejected one after another."""
    if backend == "reference":
        pytest.skip("the reference is what the others are compared with")
    g = torch.Generator().manual_seed(B * N + V)
    logits = (torch.randn(B, N + 1, V, generator=g) * 2).to(dtype)
    tokens, parents = random_tree(B, N, V, g)
    p = torch.softmax(logits.float() / 0.8, -1)
    q = torch.softmax(torch.log(p[:, 1:]) + 0.5 * torch.randn(B, N, V, generator=g), -1)
    for b in range(B):  # half of the nodes: a draw from q at the parent, so acceptances happen
        for i in range(0, N, 2):
            if tokens[b, i] >= 0:
                tokens[b, i] = torch.multinomial(p[b, parents[b, i] + 1], 1, generator=g)[0]
    Vd = V - 4 if with_q and V > 200 else V  # a smaller draft vocabulary: ids >= Vd rejected
    draft_probs = q[..., :Vd] / q[..., :Vd].sum(-1, keepdim=True) if with_q else None
    kw = dict(temperature=torch.tensor([0.8, 0.0, 1.1])[:B],
              top_k=torch.tensor([20, 0, 0])[:B] if filters else 0,
              top_p=torch.tensor([0.9, 1.0, 0.85])[:B] if filters else 1.0, offset=5)
    for seed in (3, 4):
        kw["seed"] = torch.tensor([seed, seed + 10, seed + 20])[:B]
        want = reference.verify_tree(logits, tokens, parents, draft_probs, *per_row(B, **kw), N)
        got = run(backend, logits, tokens, parents, draft_probs, **kw)
        for w, x in zip(want, got):
            assert torch.equal(w, x), (want, got)
        check_layout(*got, tokens, parents)


@pytest.mark.parametrize("mode", ["greedy", "sample_compare", "draft_probs"])
def test_chain_equals_verify(backend, mode):
    """On a chain (parent of node i = i - 1) verify_tree gives verify's tokens and counts."""
    B, K, V = 4, 4, 111
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(B, K + 1, V, generator=g) * 2
    p = torch.softmax(logits, -1)
    drafts = torch.stack([torch.multinomial(p[:, i], 1, generator=g)[:, 0] for i in range(K)], 1)
    drafts[:, 1] = logits[:, 1].argmax(-1)
    drafts[1, 2:] = -1  # a ragged chain
    drafts[2, 3] = V + 5  # an id outside the vocabulary: rejected
    q = torch.softmax(logits[:, :K] + torch.randn(B, K, V, generator=g), -1) if mode == "draft_probs" else None
    parents = torch.arange(K).expand(B, K) - 1
    t = 0.0 if mode == "greedy" else torch.tensor([1.0, 0.7, 1.0, 1.3])
    for seed in range(2):
        kw = dict(temperature=t, seed=torch.arange(B) + 7 * seed, offset=torch.tensor([0, 5, 9, 2**40]),
                  top_k=torch.tensor([0, 30, 0, 0]), top_p=torch.tensor([1.0, 1.0, 0.9, 1.0]))
        dev = device_for(backend)
        want = ops.verify(logits.to(dev), drafts.to(dev), None if q is None else q.to(dev), backend=backend, **kw)
        out, n, nodes = run(backend, logits, drafts, parents, q, **kw)
        assert torch.equal(out, want[0].cpu()) and torch.equal(n, want[1].cpu())
        for b in range(B):
            assert nodes[b].tolist() == [i if i < n[b] else -1 for i in range(K)]


# ---------------------------------------------------------------- edge cases


def test_no_finite_logit_voids_only_where_the_token_is_drawn(backend):
    V = 111
    logits = torch.randn(3, 4, V, generator=torch.Generator().manual_seed(5))
    am = logits.argmax(-1)
    parents = torch.tensor([[-1, 0, -1]] * 3)
    tokens = torch.stack([am[:, 0], am[:, 1], (am[:, 0] + 1) % V], 1)
    logits[0, 0] = float("nan")  # the root: row 0 emits nothing
    logits[1, 2] = -torch.inf  # node 1 is reached greedily (0 -> 1): row 1 emits nothing
    logits[2, 3] = -torch.inf  # node 2 is never reached (node 0 is accepted first)
    for q in (None, torch.softmax(torch.randn(3, 3, V), -1)):
        out, n, nodes = run(backend, logits, tokens, parents, q, temperature=0.0)
        assert out[0].tolist() == [-1] * 4 and out[1].tolist() == [-1] * 4 and n[:2].tolist() == [0, 0]
        assert (nodes[:2] == -1).all()
        assert n[2] == 2 and out[2, 2] >= 0
    with pytest.raises(ValueError, match="row 0"):
        ops.verify_tree(logits, tokens, parents, temperature=0.0, check=True)


def test_bad_temperature_voids_the_row(backend):
    logits = torch.randn(2, 3, 111, generator=torch.Generator().manual_seed(6))
    tokens = logits.argmax(-1)[:, :2]
    parents = torch.tensor([[-1, 0]] * 2)
    out, n, nodes = run(backend, logits, tokens, parents, temperature=torch.tensor([float("nan"), 0.0]))
    assert out[0].tolist() == [-1] * 3 and n.tolist() == [0, 2] and nodes[0].tolist() == [-1, -1]


def test_garbage_trees_stay_in_bounds(backend):
    """check=False with nonsense parents and tokens: no crash, nothing read out of bounds, ids in
    range or -1, and the result is still the reference's (invalid nodes are never children)."""
    B, N, V, Vd = 3, 8, 111, 100
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(B, N + 1, V, generator=g)
    parents = torch.randint(-6, N + 6, (B, N), generator=g)
    parents[:, :3] = torch.tensor([-1, 0, 0])
    tokens = torch.randint(-4, V + 6, (B, N), generator=g)
    tokens[:, 0] = logits[:, 0].argmax(-1)
    tokens[0, 1] = -1  # node 2's parent 0 is used; node 1 unused
    parents[1, 4] = 4  # its own parent
    parents[2, 5] = 1  # a parent that may be an unused slot
    tokens[2, 1] = -1
    q = torch.softmax(torch.randn(B, N, Vd, generator=g), -1)
    for draft_probs, t in ((q, 1.0), (None, 1.0), (q, 0.0)):
        kw = dict(temperature=t, seed=torch.tensor([1, 2, 3]))
        out, n, nodes = run(backend, logits, tokens, parents, draft_probs, **kw)
        assert ((out >= -1) & (out < V)).all() and ((nodes >= -1) & (nodes < N)).all()
        assert ((n >= 0) & (n <= N)).all()
        want = reference.verify_tree(logits, tokens, parents, draft_probs, *per_row(B, **kw), N)
        assert all(torch.equal(w, x) for w, x in zip(want, (out, n, nodes)))
        check_layout(out, n, nodes, tokens, parents)


def test_tree_structure_rules():
    tokens = torch.tensor([[5, 6, -1, 7, 8, 9, 10]])
    parents = torch.tensor([[-1, 0, 0, 2, 4, 1, -3]])
    valid, depth = reference.tree_structure(tokens, parents, 2)
    # node 2 unused -> 3 invalid; 4 is its own parent; 5 at depth 3 > 2; 6 has parent -3
    assert valid.tolist() == [[True, True, False, False, False, False, False]]
    assert depth.tolist() == [[1, 2, 0, 0, 0, 0, 0]]


# ---------------------------------------------------------------- bad input


def test_bad_input_raises_clear_errors():
    L = torch.randn(2, 4, 50)
    t = torch.zeros(2, 3, dtype=torch.int64)
    p = torch.tensor([[-1, 0, 1], [-1, -1, 0]])
    cases = [
        (dict(target_logits=L[0], tree_token_ids=t, tree_parents=p), ValueError, "target_logits must be"),
        (dict(target_logits=L.long(), tree_token_ids=t, tree_parents=p), TypeError, "target_logits must be float"),
        (dict(target_logits=L, tree_token_ids=t.float(), tree_parents=p), TypeError, "tree_token_ids must be int"),
        (dict(target_logits=L, tree_token_ids=t, tree_parents=p.float()), TypeError, "tree_parents must be int"),
        (dict(target_logits=L, tree_token_ids=t[:, :2], tree_parents=p), ValueError, r"tree_token_ids must be \[B, N\]"),
        (dict(target_logits=L, tree_token_ids=t, tree_parents=p[:1]), ValueError, r"tree_parents must be \[B, N\]"),
        (dict(target_logits=L, tree_token_ids=t, tree_parents=p, draft_probs=torch.rand(2, 3, 60)), ValueError, "Vd=60"),
        (dict(target_logits=L, tree_token_ids=t, tree_parents=p, draft_probs=torch.rand(2, 4, 50)), ValueError, "draft_probs must be"),
        (dict(target_logits=L, tree_token_ids=t, tree_parents=p, draft_probs=-torch.rand(2, 3, 50)), ValueError, ">= 0"),
        (dict(target_logits=L, tree_token_ids=t, tree_parents=p.to("meta")), ValueError, "is on meta"),
        (dict(target_logits=L, tree_token_ids=torch.tensor([[1, 50, 0], [0, 0, 0]]), tree_parents=p), ValueError,
         r"tree_token_ids\[0, 1\] = 50 is outside"),
        (dict(target_logits=L, tree_token_ids=torch.tensor([[1, -2, 0], [0, 0, 0]]), tree_parents=p), ValueError,
         r"tree_token_ids\[0, 1\] = -2"),
        (dict(target_logits=L, tree_token_ids=t, tree_parents=torch.tensor([[-1, 1, 1], [-1, -1, 0]])), ValueError,
         r"tree_parents\[0, 1\] = 1: .*earlier node"),
        (dict(target_logits=L, tree_token_ids=t, tree_parents=torch.tensor([[-1, 0, -7], [-1, -1, 0]])), ValueError,
         r"tree_parents\[0, 2\] = -7"),
        (dict(target_logits=L, tree_token_ids=torch.tensor([[3, -1, 4], [0, 0, 0]]), tree_parents=p), ValueError,
         r"tree_parents\[0, 2\] = 1 is an unused slot"),
        (dict(target_logits=L, tree_token_ids=t, tree_parents=p, max_depth=2), ValueError, "max_depth=2"),
        (dict(target_logits=L, tree_token_ids=t, tree_parents=p, max_depth=-1), ValueError, "max_depth must be >= 0"),
        (dict(target_logits=L, tree_token_ids=t, tree_parents=p, max_depth=2.0), TypeError, "max_depth must be an int"),
        (dict(target_logits=L, tree_token_ids=t, tree_parents=p, temperature=float("nan")), ValueError, "temperature"),
        (dict(target_logits=L, tree_token_ids=t, tree_parents=p, top_p=0.0), ValueError, "top_p"),
        (dict(target_logits=L, tree_token_ids=t, tree_parents=p, top_k=-2), ValueError, "top_k"),
        (dict(target_logits=L, tree_token_ids=t, tree_parents=p, seed=1.5), TypeError, "seed"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            ops.verify_tree(**kw, check=True)
    # valid: unused slots anywhere, their parent entries ignored
    ops.verify_tree(L, torch.tensor([[3, -1, 4], [0, 0, -1]]), torch.tensor([[-1, 9, 0], [-1, 0, 5]]), check=True)
    with pytest.raises(ValueError, match="backend must be"):
        ops.verify_tree(L, t, p, backend="cuda-magic")


def test_opcheck_and_compile():
    B, N, V = 2, 3, 50
    g = torch.Generator().manual_seed(8)
    args = (torch.randn(B, N + 1, V, generator=g), torch.randint(0, V, (B, N), generator=g),
            torch.tensor([[-1, 0, 0], [-1, -1, 1]]), torch.softmax(torch.randn(B, N, V, generator=g), -1),
            torch.ones(B), torch.zeros(B, dtype=torch.int64), torch.ones(B), torch.arange(B),
            torch.zeros(B, dtype=torch.int64), N)
    for backend in ("reference", "cpp"):
        if backend_available(backend):
            torch.library.opcheck(torch.ops.specdec.verify_tree.default, (*args, backend))
            torch.library.opcheck(torch.ops.specdec.verify_tree.default, (*args[:3], None, *args[4:], backend))

    def step(logits, tokens, parents, q):
        return ops.verify_tree(logits, tokens, parents, q, temperature=0.7, seed=3, max_depth=2,
                               backend="reference")

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = compiled(*args[:4])
    want = step(*args[:4])
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and got[0].shape == (B, 3)


# ---------------------------------------------------------------- statistics


def target_probs(logits, temperature, top_k, top_p):
    """The exact target distribution per row of logits [R, V], float64, written independently of
    the library: sort, cut, renormalise."""
    out = []
    for row in logits.double():
        vals, idx = (row / temperature).sort(descending=True)
        keep = torch.ones_like(vals, dtype=torch.bool)
        if top_k:
            keep[top_k:] = False
        p = torch.softmax(vals.masked_fill(~keep, -torch.inf), -1)
        if top_p < 1:
            keep &= (p.cumsum(0) - p) < top_p
        p = torch.softmax(vals.masked_fill(~keep, -torch.inf), -1)
        out.append(torch.zeros_like(p).scatter(0, idx, p))
    return torch.stack(out)


def conditional_chi2_pvalue(prev, nxt, cond):
    """p-value of "given prev = a, nxt is drawn from cond[a]" (cond [V, V], rows sum to 1): a
    chi-square per value a (bins with expected count below 5 merged), statistics and degrees of
    freedom summed. A token outside its row's support makes it 0."""
    prev, nxt = prev.numpy(), nxt.numpy()
    cond = cond.double().numpy()
    stat, dof = 0.0, 0
    for a in np.unique(prev):
        sel = nxt[prev == a]
        probs = cond[a] / cond[a].sum()
        counts = np.bincount(sel, minlength=len(probs)).astype(np.float64)
        if len(counts) > len(probs) or counts[probs == 0].sum() > 0:
            return 0.0
        expected = len(sel) * probs
        big = expected >= 5
        obs, exp = list(counts[big]), list(expected[big])
        if (~big).any() and expected[~big].sum() > 0:
            obs.append(counts[~big].sum())
            exp.append(expected[~big].sum())
        if len(obs) < 2:
            continue
        obs, exp = np.array(obs), np.array(exp)
        stat += float(((obs - exp) ** 2 / exp).sum())
        dof += len(obs) - 1
    return 1.0 if dof == 0 else float(sstats.chi2.sf(stat, dof))


CHAIN3 = [-1, 0, 1]
STAR4 = [-1, -1, -1, -1]
BINARY2 = [-1, -1, 0, 0, 1, 1]
STATS = {  # shape, V, draft_probs?, replacement, temperature, top_k, top_p, drafter
    "chain": (CHAIN3, 16, True, True, 1.0, 0, 1.0, "close"),
    "chain_no_q": (CHAIN3, 16, False, True, 1.0, 0, 1.0, "close"),
    "star_with_replacement": (STAR4, 16, True, True, 1.0, 0, 1.0, "close"),
    "star_without_replacement": (STAR4, 16, True, False, 0.8, 0, 1.0, "close"),
    "star_duplicates_no_q": (STAR4, 16, False, True, 1.0, 0, 1.0, "peaked"),
    "binary_without_replacement_filtered": (BINARY2, 40, True, False, 0.7, 8, 0.9, "close"),
    "binary_with_replacement_top_p": (BINARY2, 16, True, True, 1.0, 0, 0.8, "close"),
    "binary_argmax_tree_no_q": (BINARY2, 16, False, False, 1.0, 6, 1.0, "argmax"),
    "trap_confident_and_wrong": ([-1, -1, -1, 0, 0], 16, True, False, 1.0, 0, 1.0, "trap"),
    "trap_with_replacement": ([-1, -1, 0, 2], 16, True, True, 1.0, 0, 1.0, "trap"),
}


def stats_case(name, S, seed=0):
    """Inputs of a statistical case: S rows, each an independent draw (own tree, own seed). Node
    logits depend only on the node's token (F[token]; the root: L0), so the target's
    distribution of the token after x is target_probs(F)[x] at every depth."""
    shape, V, with_q, replacement, temperature, top_k, top_p, drafter = STATS[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)) + seed)
    L0 = torch.randn(V, generator=g) * 1.5
    F = torch.randn(V, V, generator=g) * 1.5
    if drafter == "close":  # a draft distribution near the target's: deep paths, some rejections
        root_q = torch.softmax(L0 / temperature + 0.7 * torch.randn(V, generator=g), -1)
        child_q = torch.softmax(F / temperature + 0.7 * torch.randn(V, V, generator=g), -1)
    elif drafter == "peaked":  # sharp drafts: duplicates among siblings are frequent
        root_q = torch.softmax(3 * L0, -1)
        child_q = torch.softmax(3 * F, -1)
    elif drafter == "trap":  # confident and wrong: 90% on the target's least likely token
        def trap(logits):
            q = torch.full_like(logits, 0.1 / (V - 1))
            q.scatter_(-1, logits.argmin(-1, keepdim=True), 0.9)
            return q
        root_q, child_q = trap(L0), trap(F)
    else:  # argmax tree: deterministic children (the target's own top tokens), no q
        root_q = torch.softmax(L0 / temperature, -1)
        child_q = torch.softmax(F / temperature, -1)
    if drafter == "argmax":
        N = len(shape)
        top = lambda x: x.topk(2).indices  # noqa: E731
        tokens = torch.zeros(S, N, dtype=torch.int64)
        for i, p in enumerate(shape):
            rank = sum(1 for s in range(i) if shape[s] == p)
            cand = top(L0).expand(S, 2) if p == -1 else top(F)[tokens[:, p]]
            tokens[:, i] = cand[:, rank]
        q, parents = None, torch.tensor(shape).expand(S, N).clone()
    else:
        tokens, q, parents = draw_tree(shape, S, V, root_q, child_q, g, replacement)
    logits = torch.cat([L0.expand(S, 1, V), F[tokens]], 1)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=torch.arange(S) * 7919 + seed + 1,
              offset=torch.randint(0, 1000, (S,), generator=g))
    p_root = target_probs(L0[None], temperature, top_k, top_p)[0]
    cond = target_probs(F, temperature, top_k, top_p)
    return logits, tokens, parents, (q if with_q else None), kw, p_root, cond


def assert_follows_target(out, n, p_root, cond, max_depth, min_samples=1500):
    pv = chi2_pvalue(out[:, 0], p_root)
    assert pv > ALPHA, f"depth 0: chi-square p-value {pv:.2e}"
    for d in range(1, max_depth + 1):
        rows = n >= d
        if int(rows.sum()) < min_samples:
            continue
        assert (out[rows, d] >= 0).all()
        pv = conditional_chi2_pvalue(out[rows, d - 1], out[rows, d], cond)
        assert pv > ALPHA, f"depth {d}: conditional chi-square p-value {pv:.2e} ({int(rows.sum())} rows)"


@pytest.mark.parametrize("name", list(STATS))
def test_emitted_tokens_follow_target(fast_backend, name):
    S = 40_000
    logits, tokens, parents, q, kw, p_root, cond = stats_case(name, S)
    out, n, nodes = run(fast_backend, logits, tokens, parents, q, **kw)
    depth = max(reference.tree_structure(tokens[:1], parents[:1], 99)[1][0].tolist())
    assert int((n >= 1).sum()) > 3000, "too few accepted paths for the depth-1 test"
    assert_follows_target(out, n, p_root, cond, depth)
    if fast_backend == "cpp" and name in ("star_without_replacement", "binary_without_replacement_filtered"):
        want = ops.verify_tree(logits[:4000], tokens[:4000], parents[:4000], None if q is None else q[:4000],
                               backend="reference", **{k: (v[:4000] if torch.is_tensor(v) else v)
                                                       for k, v in kw.items()})
        assert all(torch.equal(w, x[:4000]) for w, x in zip(want, (out, n, nodes)))


def test_conditional_chi2_has_power():
    """The per-depth check fails a sampler whose conditional distributions are each 1% biased
    (stats.biased), at 10k rows, fewer than most depth-1 tests above get."""
    V, M = 16, 10_000
    g = torch.Generator().manual_seed(2)
    p0 = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)
    cond = torch.softmax(torch.randn(V, V, generator=g) * 1.5, -1).double()
    unfair = torch.stack([biased(cond[a], 0.01) for a in range(V)])
    prev = torch.multinomial(p0, M, replacement=True, generator=g)
    u = torch.rand(M, 1, generator=g, dtype=torch.float64)
    draw = lambda c: (c[prev].cumsum(-1) < u).sum(-1).clamp(max=V - 1)  # noqa: E731  inverse CDF
    assert conditional_chi2_pvalue(prev, draw(cond), cond) > ALPHA
    assert conditional_chi2_pvalue(prev, draw(unfair), cond) < ALPHA


def test_sabotaged_residual_fails(monkeypatch):
    """Skip the residual update (p_cur stays p after a rejected sibling): the same test fails."""
    S = 40_000
    logits, tokens, parents, q, kw, p_root, cond = stats_case("star_with_replacement", S)
    monkeypatch.setattr(reference, "_residual", lambda p_cur, q_: (p_cur, torch.ones(len(p_cur), dtype=torch.bool)))
    out, n, _ = run("reference", logits, tokens, parents, q, **kw)
    assert chi2_pvalue(out[:, 0], p_root) < ALPHA
    with pytest.raises(AssertionError, match="depth 0"):
        assert_follows_target(out, n, p_root, cond, 1)


def test_triton_matches_cpp_on_a_statistical_case():
    """The interpreter is too slow for chi-square sample sizes: hold Triton to the C++ backend
    token for token on a slice of the statistical cases instead."""
    for b in ("triton", "cpp"):
        if not backend_available(b):
            pytest.skip(f"backend {b} unavailable")
    for name in ("star_without_replacement", "binary_argmax_tree_no_q", "trap_confident_and_wrong"):
        logits, tokens, parents, q, kw, _, _ = stats_case(name, 16)
        want = run("cpp", logits, tokens, parents, q, **kw)
        got = run("triton", logits, tokens, parents, q, **kw)
        assert all(torch.equal(w, x) for w, x in zip(want, got)), name


# ---------------------------------------------------------------- Triton compiles for a GPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile the kernels")
def test_triton_compiles_for_sm90(tmp_path):
    """The interpreter accepts code that the compiler rejects: record the launches of a few
    verify_tree calls and compile each for sm_90 with the interpreter off (tests/triton_compile.py)."""
    import json

    if not backend_available("triton"):
        pytest.skip("triton unavailable")
    from specdec.kernels import verify_tree as kvt
    from triton_compile import compile_in_child, record_launches

    g = torch.Generator().manual_seed(9)
    B, N, V = 2, 3, 600
    t, seed, offset = torch.tensor([0.0, 1.0]), torch.tensor([1, 2]), torch.tensor([0, 3])
    parents = torch.tensor([[-1, 0, -1], [-1, -1, 1]])
    with record_launches() as launches:
        for dtype in (torch.float32, torch.bfloat16):
            logits = torch.randn(B, N + 1, V, generator=g).to(dtype)
            q = torch.softmax(torch.randn(B, N, V, generator=g), -1)
            tokens = torch.randint(0, V, (B, N), generator=g)
            for draft_probs in (q, None):
                for top_k, top_p in ((None, None), (torch.tensor([0, 5]), torch.tensor([1.0, 0.9]))):
                    kvt.verify_tree(logits, tokens, parents, draft_probs, t, top_k, top_p, seed, offset, N)
    assert len(launches) >= 4
    ok, out = compile_in_child([json.loads(k) for k in launches], tmp_path)
    assert ok, out
