"""Tree drafters (specdec.drafters): the n-gram trie and the model drafter's EAGLE-2 style top-k tree.

Tree encoding (as ``specdec.verify_tree`` and ``RaggedCache`` tree steps): per row up to N nodes, node i's
parent ``parents[b, i]`` is -1 (a child of the root, the row's pending token) or an earlier node; unused
slots have token -1. The model-drafter tests hold every node's children to a fresh, cache-free forward
of the drafter over prompt + root-to-node path, which also proves the tree attention in the drafter's
cache; after ``accept_tree`` the next proposal must equal a fresh drafter's on the extended text.
"""
import numpy as np
import pytest
import torch

from specdec import ops
from specdec.drafters import (Draft, Drafter, DraftState, DraftTree, EarlyExitDrafter, ModelDrafter,
                              NGramDrafter)

from _tiny_models import PROMPTS, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def inference_mode():
    """The generator drives drafters under torch.inference_mode (their caches are inference tensors)."""
    with torch.inference_mode():
        yield


def _state(seqs, max_drafts, *, temperature=0.0, top_k=0, top_p=1.0, width=64, seed=7):
    B = len(seqs)
    tokens = np.zeros((B, width), dtype=np.int64)
    for b, s in enumerate(seqs):
        tokens[b, : len(s)] = s
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    seeds = ops.row_seeds(seed, B)
    return DraftState(tokens, lengths, np.asarray(max_drafts, dtype=np.int64), temperature, top_k, top_p, seeds, 0,
                      CPU, 32)


def _path(parents, node):
    out = []
    while node >= 0:
        out.append(node)
        node = int(parents[node])
    return out[::-1]


def _check_structure(tree: DraftTree, max_drafts, max_nodes):
    B, N = tree.host_token_ids.shape
    assert tree.token_ids.tolist() == tree.host_token_ids.tolist()
    assert tree.parents.tolist() == tree.host_parents.tolist()
    assert tree.token_ids.dtype == torch.int64 and tree.parents.dtype == torch.int64
    assert N <= max_nodes and (tree.num_nodes <= max_nodes).all()
    depths = tree.depths()
    for b in range(B):
        n = int(tree.num_nodes[b])
        assert (tree.host_token_ids[b, :n] >= 0).all() and (tree.host_token_ids[b, n:] == -1).all()
        assert (tree.host_parents[b, n:] == -1).all()
        for i in range(n):
            assert -1 <= tree.host_parents[b, i] < i
        if n:
            assert depths[b, :n].max() < max_drafts[b]
        # no two siblings with the same token (they would be the same path)
        pairs = {(int(tree.host_parents[b, i]), int(tree.host_token_ids[b, i])) for i in range(n)}
        assert len(pairs) == n


# ------------------------------------------------------------------------------------------------------
# n-gram trie

def _slow_ngram_tree(d: NGramDrafter, tokens, max_depth, max_nodes):
    """Reference: every occurrence by a Python loop, the trie as a dict of prefixes, scores as documented."""
    tokens = [int(t) for t in tokens]
    L = len(tokens)
    depth = min(max_depth, max_nodes)
    if depth <= 0:
        return [], [], 0
    occ = []
    for s in range(1, L):
        n = 0
        while n < d.max_ngram and s - n - 1 >= 0 and tokens[s - n - 1] == tokens[L - n - 1]:
            n += 1
        if n >= d.min_ngram:
            occ.append((s, n))
    if not occ:
        return [], [], 0
    decay = d.tree_decay ** np.arange(depth, dtype=np.float64)
    nodes = {}  # prefix tuple -> [weighted count, recency]
    for s, n in occ:
        w = float(d.tree_weight) ** (n - d.min_ngram)
        for k in range(1, min(depth, L - s) + 1):
            key = tuple(tokens[s: s + k])
            c = nodes.setdefault(key, [0.0, None])
            c[0] += w
            rec = s if d.prefer == "recent" else -s
            c[1] = rec if c[1] is None else max(c[1], rec)
    ranked = sorted(nodes, key=lambda p: (-(nodes[p][0] * decay[len(p) - 1]), -nodes[p][1], len(p)))[:max_nodes]
    index = {p: i for i, p in enumerate(ranked)}
    return [p[-1] for p in ranked], [index[p[:-1]] if len(p) > 1 else -1 for p in ranked], max(n for _, n in occ)


def test_ngram_tree_hand_made():
    d = NGramDrafter()
    # "2 3" occurs three times: followed by 7 8 9 2, 7 8 5 2 and (most recent) 4 2 3
    t = np.array([1, 2, 3, 7, 8, 9, 2, 3, 7, 8, 5, 2, 3, 4, 2, 3])
    ids, par, m = d.tree(t, 4, 32)
    assert m == 2
    # 7 (two occurrences) first, then 7-8 (score 2 * 0.8), then 4 (one, most recent), 4-2, then depth 2 ...
    assert ids.tolist() == [7, 8, 4, 2, 3, 5, 9, 2, 2]
    assert par.tolist() == [-1, 0, -1, 2, 3, 1, 1, 5, 6]
    # each node's share of the occurrences (all three match "2 3", so they weigh the same)
    assert np.allclose(d._tree(t, 4, 32)[3], [2 / 3, 2 / 3] + [1 / 3] * 7)
    # budget: the best 3 nodes; a long continuation does not take it all when the next tokens disagree
    ids, par, _ = d.tree(t, 4, 3)
    assert ids.tolist() == [7, 8, 4] and par.tolist() == [-1, 0, -1]
    # depth limit
    ids, par, _ = d.tree(t, 1, 32)
    assert ids.tolist() == [7, 4] and par.tolist() == [-1, -1]
    # prefer="earliest": ties go to the earliest occurrence (7 8 9 before 7 8 5 before 4 2 3)
    ids, par, _ = NGramDrafter(prefer="earliest").tree(t, 4, 32)
    assert ids.tolist() == [7, 8, 4, 2, 9, 5, 3, 2, 2] and par.tolist() == [-1, 0, -1, 2, 1, 1, 3, 4, 5]
    # a longer n-gram match outweighs shorter ones: "9 2 3" -> 7 beats the two "2 3" continuations
    t2 = np.array([9, 2, 3, 7, 5, 2, 3, 4, 6, 2, 3, 4, 9, 2, 3])
    ids, par, m = d.tree(t2, 2, 4)
    assert m == 3 and ids.tolist() == [7, 5, 4, 9] and par.tolist() == [-1, 0, -1, 2]
    # no match / nothing allowed
    assert d.tree(np.array([5, 6, 7]), 4, 8)[0].size == 0
    assert d.tree(t, 0, 8)[0].size == 0 and d.tree(t, 4, 0)[0].size == 0
    # a self-overlapping suffix: the continuation may be the pending token itself
    ids, par, m = d.tree(np.array([5, 5, 5]), 4, 8)
    assert ids.tolist() == [5, 5] and par.tolist() == [-1, 0] and m == 2


def test_ngram_propose_tree_ragged_rows():
    d = NGramDrafter()
    rows = [[1, 2, 3, 7, 8, 9, 2, 3, 7, 8, 5, 2, 3, 4, 2, 3], [7, 8, 9], [5, 6, 5, 6, 5], [4, 1, 4, 2, 4]]
    state = _state(rows, [4, 4, 1, 0])
    tree = d.propose_tree(state, 6)
    assert tree.probs is None
    assert tree.num_nodes.tolist() == [6, 0, 1, 0]
    assert tree.match.tolist() == [2, 0, 3, 0]  # row 3 has a match but may not draft
    assert tree.host_token_ids.tolist() == [[7, 8, 4, 2, 3, 5], [-1] * 6, [6, -1, -1, -1, -1, -1], [-1] * 6]
    assert tree.host_parents.tolist() == [[-1, 0, -1, 2, 3, 1], [-1] * 6, [-1] * 6, [-1] * 6]
    # shares: row 0 as in the hand-made test; row 2's one continuation has share 1; unused slots 0
    assert np.allclose(tree.host_share, [[2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3], [0] * 6, [1] + [0] * 5, [0] * 6])
    _check_structure(tree, state.max_drafts, 6)
    state.max_drafts[:] = 0
    empty = d.propose_tree(state, 6)
    assert empty.token_ids.shape == (4, 0) and empty.num_nodes.tolist() == [0] * 4
    assert d.propose_tree(_state(rows, [4, 4, 4, 4]), 0).num_nodes.tolist() == [0] * 4


@pytest.mark.parametrize("prefer", ["recent", "earliest"])
def test_ngram_tree_equals_slow_reference(prefer):
    rng = np.random.default_rng(0 if prefer == "recent" else 1)
    configs = [NGramDrafter(prefer=prefer), NGramDrafter(max_ngram=4, min_ngram=2, prefer=prefer),
               NGramDrafter(max_ngram=2, prefer=prefer, tree_weight=1, tree_decay=0.5)]
    for trial in range(150):
        d = configs[trial % len(configs)]
        vocab = int(rng.integers(2, 8))
        t = rng.integers(0, vocab, int(rng.integers(1, 60)))
        depth, budget = int(rng.integers(0, 9)), int(rng.integers(0, 40))
        ids, par, m = d.tree(t, depth, budget)
        ref = _slow_ngram_tree(d, t, depth, budget)
        assert (ids.tolist(), par.tolist(), m if ids.size else 0) == (ref[0], ref[1], ref[2] if ref[0] else 0), \
            (t.tolist(), depth, budget)


# ------------------------------------------------------------------------------------------------------
# model drafter

SEQS = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[3] + [40, 41]]


@pytest.fixture(scope="module")
def drafter_model():
    return tiny_model("llama", seed=1, layers=2)


def _fresh_logits(model, seq):
    with torch.no_grad():
        return model(input_ids=torch.tensor([list(seq)])).logits[0, -1].float()


def _children(tree, b, node):
    return [i for i in range(int(tree.num_nodes[b])) if tree.host_parents[b, i] == node]


def _expanded(tree, model, b, seq):
    """(children, the drafter's fresh last logits after the node's root-to-node path) for every
    node of row b (the root included) that has children."""
    for node in [-1] + list(range(int(tree.num_nodes[b]))):
        kids = _children(tree, b, node)
        if kids:
            path = [] if node < 0 else tree.host_token_ids[b, _path(tree.host_parents[b], node)].tolist()
            yield node, kids, _fresh_logits(model, seq + path)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_model_tree_greedy_children_are_the_drafters_top_k(arch):
    model = tiny_model(arch, seed=1, layers=2)
    d = ModelDrafter(model, tree_children=3, tree_expand=2)
    max_drafts = np.array([3, 5, 1, 4])
    state = _state(SEQS, max_drafts)
    d.start(state)
    for max_nodes in (12, 5):  # a second proposal on the same cache state (nothing accepted in between)
        d._tree_step = None
        d.cached = state.lengths - 1
        d.cache.rollback(torch.from_numpy(d.cached).to(torch.int32))
        tree = d.propose_tree(state, max_nodes)
        assert tree.probs is None
        _check_structure(tree, max_drafts, max_nodes)
        assert tree.num_nodes.sum() > 0
        for b, seq in enumerate(SEQS):
            for node, kids, logits in _expanded(tree, model, b, seq):
                top = logits.topk(3).indices.tolist()
                assert tree.host_token_ids[b, kids].tolist() == top[: len(kids)], (b, node)
    # the first child of the root is the chain's first draft
    chain = ModelDrafter(model)
    chain.start(state)
    assert chain.propose(state).token_ids[:, 0].tolist() == tree.token_ids[:, 0].tolist()


def test_model_tree_sampled_distributions(drafter_model):
    model = drafter_model
    d = ModelDrafter(model, tree_children=3, tree_expand=2)
    max_drafts = np.array([3, 4, 2, 4])
    kw = dict(temperature=0.9, top_k=0, top_p=1.0)
    state = _state(SEQS, max_drafts, **kw)
    d.start(state)
    tree = d.propose_tree(state, 10)
    _check_structure(tree, max_drafts, 10)
    probs = tree.probs
    assert probs is not None and probs.shape[:2] == tree.token_ids.shape and probs.dtype == torch.float32
    for b, seq in enumerate(SEQS):
        for node, kids, logits in _expanded(tree, model, b, seq):
            for j, c in enumerate(kids):  # siblings in drawing order, each without the earlier ones
                row = probs[b, c]
                assert abs(float(row.sum()) - 1) < 1e-5 and float(row.min()) >= 0
                assert float(row[tree.host_token_ids[b, c]]) > 0
                earlier = tree.host_token_ids[b, kids[:j]]
                assert float(row[earlier].sum()) == 0
                masked = logits.clone()
                masked[earlier] = float("-inf")
                _, expect = ops.sample(masked[None], **kw, seed=0)
                torch.testing.assert_close(row, expect[0], rtol=1e-4, atol=1e-5)
    for i in range(tree.token_ids.shape[1]):  # unused slots carry no distribution
        unused = tree.token_ids[:, i] < 0
        assert float(probs[unused, i].abs().sum()) == 0
    # seeded: the same tree again; the best first child uses the chain's random numbers
    again = ModelDrafter(model, tree_children=3, tree_expand=2)
    again.start(state)
    tree2 = again.propose_tree(state, 10)
    assert tree2.host_token_ids.tolist() == tree.host_token_ids.tolist()
    chain = ModelDrafter(model)
    chain.start(state)
    assert chain.propose(state).token_ids[:, 0].tolist() == tree.token_ids[:, 0].tolist()


def _random_path(tree, b, rng):
    n = int(tree.num_nodes[b])
    if n == 0 or rng.random() < 0.2:
        return []
    return _path(tree.host_parents[b], int(rng.integers(0, n)))


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_model_tree_accept_continues_like_a_fresh_drafter(drafter_model, temperature):
    model = drafter_model
    rng = np.random.default_rng(int(temperature * 10))
    kw = dict(temperature=temperature, top_k=20 if temperature else 0, top_p=1.0)
    seqs = [list(s) for s in SEQS]
    max_drafts = np.array([3, 4, 2, 4])
    d = ModelDrafter(model, tree_children=3, tree_expand=3)
    state = _state(seqs, max_drafts, **kw)
    d.start(state)
    for step in range(3):
        tree = d.propose_tree(state, 9)
        B = len(seqs)
        accepted = np.full((B, 4), -1, dtype=np.int64)
        num = np.zeros(B, dtype=np.int64)
        for b in range(B):
            path = _random_path(tree, b, rng)
            accepted[b, : len(path)] = path
            num[b] = len(path)
            seqs[b] += tree.host_token_ids[b, path].tolist() + [int(rng.integers(3, 96))]  # + bonus token
        d.accept_tree(accepted, num)
        state = _state(seqs, max_drafts, **kw)
        fresh = ModelDrafter(model, tree_children=3, tree_expand=3)
        fresh.start(state)
        if step < 2:  # the next tree equals a fresh drafter's on the extended text
            mine, ref = d.propose_tree(state, 9), fresh.propose_tree(state, 9)
            assert mine.host_token_ids.tolist() == ref.host_token_ids.tolist()
            assert mine.host_parents.tolist() == ref.host_parents.tolist()
            if temperature:
                torch.testing.assert_close(mine.probs, ref.probs, rtol=1e-4, atol=1e-5)
            # accept the same random path in both, keep going with `d`
            accepted = np.full((B, 4), -1, dtype=np.int64)
            num = np.zeros(B, dtype=np.int64)
            for b in range(B):
                path = _random_path(mine, b, rng)
                accepted[b, : len(path)] = path
                num[b] = len(path)
                seqs[b] += mine.host_token_ids[b, path].tolist() + [int(rng.integers(3, 96))]
            d.accept_tree(accepted, num)
            state = _state(seqs, max_drafts, **kw)
        else:  # the chain path continues from a tree step too
            mine, ref = d.propose(state), fresh.propose(state)
            assert mine.token_ids.tolist() == ref.token_ids.tolist()
            if temperature:
                torch.testing.assert_close(mine.probs, ref.probs, rtol=1e-4, atol=1e-5)
    # and a tree after a chain step
    d.accept(np.array([1, 0, 2, 3]))
    kept = [min(a, int(n)) for a, n in zip([1, 0, 2, 3], mine.num_drafted)]
    for b in range(len(seqs)):
        seqs[b] += mine.token_ids[b, : kept[b]].tolist() + [5]
    state = _state(seqs, max_drafts, **kw)
    fresh = ModelDrafter(model, tree_children=3, tree_expand=3)
    fresh.start(state)
    assert d.propose_tree(state, 9).host_token_ids.tolist() == fresh.propose_tree(state, 9).host_token_ids.tolist()


def test_model_tree_budget_and_depth(drafter_model):
    d = ModelDrafter(drafter_model, tree_children=4, tree_expand=4)
    state = _state(SEQS, [8, 2, 0, 1])
    d.start(state)
    tree = d.propose_tree(state, 8)
    _check_structure(tree, state.max_drafts, 8)
    depths = tree.depths()
    # a budget of 8 over depth 8 is a chain; depth 2: 4 + 4; no drafts; depth 1: the top 4
    assert tree.num_nodes.tolist() == [8, 8, 0, 4]
    assert depths[0].tolist() == list(range(8)) and sorted(depths[1].tolist()) == [0] * 4 + [1] * 4
    d.accept_tree(np.full((4, 1), -1), np.zeros(4, dtype=np.int64))
    assert d.propose_tree(state, 0).num_nodes.tolist() == [0] * 4
    d.accept_tree(np.zeros((4, 0), dtype=np.int64), np.zeros(4, dtype=np.int64))  # nothing to compact


# ------------------------------------------------------------------------------------------------------
# chains as trees, interface defaults

def test_draft_to_tree_round_trip(drafter_model):
    rows = [[1, 2, 3, 4, 9, 2, 3], [7, 8, 9], [5, 6, 5, 6, 5]]
    draft = NGramDrafter().propose(_state(rows, [4, 4, 1]))
    tree = draft.to_tree()
    assert tree.host_token_ids.tolist() == [[4, 9, 2, 3], [-1] * 4, [6, -1, -1, -1]]
    assert tree.host_parents.tolist() == [[-1, 0, 1, 2], [-1] * 4, [-1] * 4]
    assert tree.parents.tolist() == tree.host_parents.tolist() and tree.token_ids.tolist() == tree.host_token_ids.tolist()
    assert tree.num_nodes.tolist() == [4, 0, 1] and tree.match.tolist() == draft.match.tolist()
    assert tree.depths().tolist() == [[0, 1, 2, 3], [-1] * 4, [0, -1, -1, -1]]
    assert tree.is_chain()
    back = tree.to_draft()
    assert back.token_ids.tolist() == draft.token_ids.tolist() and back.num_drafted.tolist() == [4, 0, 1]
    # with probabilities and garbage past num_drafted (normalised to -1), host ids given
    state = _state(SEQS, [3, 1, 2, 3], temperature=1.0)
    m = ModelDrafter(drafter_model)
    m.start(state)
    sampled = m.propose(state)
    t2 = sampled.to_tree()
    assert t2.probs is sampled.probs and t2.num_nodes.tolist() == [3, 1, 2, 3]
    assert t2.to_draft().token_ids.tolist() == sampled.token_ids.tolist()
    raw = Draft(torch.tensor([[5, 6, 7]]), None, np.array([1]))
    t3 = raw.to_tree(host_token_ids=np.array([[5, 6, 7]]))
    assert t3.token_ids.tolist() == [[5, -1, -1]] and t3.parents.tolist() == [[-1, -1, -1]]
    # a real tree is not a chain
    star = DraftTree(torch.tensor([[3, 4]]), torch.tensor([[-1, -1]]), None, np.array([2]),
                     np.array([[3, 4]]), np.array([[-1, -1]]))
    assert not star.is_chain()
    with pytest.raises(ValueError):
        star.to_draft()


def test_tree_interface_defaults():
    assert Drafter.supports_tree is False and NGramDrafter.supports_tree and ModelDrafter.supports_tree
    assert EarlyExitDrafter.supports_tree is False
    with pytest.raises(NotImplementedError):
        Drafter().propose_tree(_state([[1, 2]], [2]), 4)
    Drafter().accept_tree(np.zeros((1, 0), dtype=np.int64), np.zeros(1, dtype=np.int64))
    target = tiny_model("llama", seed=0, layers=2)
    with pytest.raises(NotImplementedError):
        EarlyExitDrafter(target, 1).propose_tree(_state([[1, 2]], [2]), 4)


def test_generator_tree_keep_renumbers_densely():
    """_Tree.keep drops nodes without leaving empty slots (the forward would compute them), keeps parents
    before children, gathers the draft probabilities along, and maps the accepted path back to the
    drafter's numbering (what ModelDrafter.accept_tree needs)."""
    from specdec.generator.trees import _Tree

    # row 0: 0 -> {1, 2}, 1 -> 3, 2 -> 4; row 1: a chain 0 -> 1 -> 2 and an unused slot
    tokens = np.array([[10, 11, 12, 13, 14], [20, 21, 22, -1, -1]])
    parents = np.array([[-1, 0, 0, 1, 2], [-1, 0, 1, -1, -1]])
    V = 6
    probs = torch.arange(2 * 5 * V, dtype=torch.float32).reshape(2, 5, V)
    tree = _Tree.of(DraftTree(torch.from_numpy(tokens), torch.from_numpy(parents), probs, num_nodes=np.array([5, 3]),
                              host_token_ids=tokens, host_parents=parents, match=np.array([3, 1]),
                              host_share=np.ones((2, 5))))
    keep = np.array([[True, False, True, False, True], [True, True, False, False, False]])
    kept = tree.keep(keep, CPU)
    assert kept.host_tokens.tolist() == [[10, 12, 14], [20, 21, -1]]
    assert kept.host_parents.tolist() == [[-1, 0, 1], [-1, 0, -1]]
    assert kept.node_depth.tolist() == [[0, 1, 2], [0, 1, -1]]
    assert kept.token_ids.tolist() == kept.host_tokens.tolist() and kept.parents.tolist() == kept.host_parents.tolist()
    assert torch.equal(kept.probs[0], probs[0, [0, 2, 4]]) and torch.equal(kept.probs[1, :2], probs[1, :2])
    # accepted path in the kept tree's numbering -> the drafter's
    assert kept.drafter_nodes(np.array([[0, 1, 2], [0, 1, -1]])).tolist() == [[0, 2, 4], [0, 1, -1]]
    # keeping everything is the tree itself; keeping twice composes the maps
    assert tree.keep(tree.used, CPU) is tree and tree.drafter_nodes(np.array([[3]])).tolist() == [[3]]
    again = kept.keep(np.array([[True, True, False], [True, False, False]]), CPU)
    assert again.host_tokens.tolist() == [[10, 12], [20, -1]]
    assert again.drafter_nodes(np.array([[0, 1], [0, -1]])).tolist() == [[0, 2], [0, -1]]
