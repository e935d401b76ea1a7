"""The draft-length policy (acceptance and forward-cost estimates, the width it picks) and the
generator's behaviour under any width schedule: greedy stays the target's greedy output, sampled
stays the target's distribution, the prefill verifies drafts from the prompt."""
import numpy as np
import pytest
import torch

from specdec.generator import AcceptanceModel, DraftLengthPolicy, ForwardCostModel, SpeculativeGenerator
from _tiny_models import PROMPTS, hf_greedy, min_greedy_margin, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


# -- acceptance model --------------------------------------------------------------------------------

def test_acceptance_prior_and_counts():
    m = AcceptanceModel(max_drafts=6, prior=0.5, weight=2.0)
    assert np.allclose(m.survival("a"), 0.5 ** np.arange(1, 7))  # nothing seen: prior rate per position
    m.observe("a", drafted=4, accepted=2)  # positions 0, 1 accepted, 2 tried and rejected, 3 never reached
    acc, reached = m.counts["a"]
    assert acc.tolist() == [1, 1, 0, 0, 0, 0] and reached.tolist() == [1, 1, 1, 0, 0, 0]
    m.observe("a", drafted=3, accepted=3)  # all accepted: positions 0..2 reached and accepted
    assert m.counts["a"][0].tolist() == [2, 2, 1, 0, 0, 0] and m.counts["a"][1].tolist() == [2, 2, 2, 0, 0, 0]
    m.observe("a", drafted=0, accepted=0)  # no drafts: nothing to count
    assert m.counts["a"][1].tolist() == [2, 2, 2, 0, 0, 0]
    # the estimate follows the counts: rate_0 = (2 + 2 * 0.5) / (2 + 2)
    assert m.survival("a")[0] == pytest.approx(0.75)


def test_acceptance_learns_classes_and_borrows_depth():
    m = AcceptanceModel(max_drafts=10)
    for _ in range(50):
        m.observe("copy", drafted=3, accepted=3)
        m.observe("miss", drafted=3, accepted=0)
    good, bad = m.survival("copy"), m.survival("miss")
    assert good[2] > 0.9 and bad[0] < 0.05
    # positions 3.. were never reached: they borrow the rate of position 2, not the 0.5 prior
    assert good[3] / good[2] > 0.9 and good[9] > 0.5
    assert np.all(np.diff(good) <= 0) and np.all(np.diff(bad) <= 0)


# -- forward cost model ------------------------------------------------------------------------------

def test_cost_model_prior_interpolation_and_extrapolation():
    c = ForwardCostModel("cpu", knee=10.0, alpha=0.5)
    assert c.predict(10) / c.predict(0) == pytest.approx(2.0)  # the prior shape before any measurement
    c.observe(10, 1.0)  # prior(10) = 2
    c.observe(30, 3.0)  # prior(30) = 4
    assert c.predict(10) == 1.0 and c.predict(30) == 3.0
    # between: the measured/prior ratio interpolated (0.5 -> 0.75), times the prior
    assert c.predict(20) == pytest.approx((0.5 + 0.5 * (0.75 - 0.5)) * 3.0)
    assert c.predict(50) == pytest.approx(0.75 * 6.0)  # above: the last ratio with the prior's slope
    assert c.predict(1) == pytest.approx(0.5 * 1.1)  # below: the first ratio
    c.observe(10, 2.0)  # a moving average
    assert c.predict(10) == pytest.approx(1.5)
    assert ForwardCostModel("cuda").knee > ForwardCostModel("cpu").knee


# -- the width --------------------------------------------------------------------------------------

def _policy(cost_fn, ns=range(1, 100)):
    p = DraftLengthPolicy("cpu")
    for n in ns:
        p.cost.observe(n, cost_fn(n))
    return p


def _brute_force(policy, available, keys, remaining):
    """The objective written out row by row and step by step (no vectorisation): the projected time to
    finish every row, holding the width, as rows leave the batch."""
    best, best_w = None, 0
    for w in range(int(available.max()) + 1):
        steps = []
        for a, k, r in zip(available, keys, remaining):
            expected = 1 + policy.acceptance.survival(int(k))[: min(w, a)].sum()
            steps.append(r / expected)
        total, done = 0.0, 0.0
        for i, s in enumerate(sorted(steps)):
            rows_left = len(steps) - i
            total += (s - done) * (policy.cost.predict(rows_left * (w + 1)) + w * policy.draft_cost)
            done = s
        if best is None or total < best - 1e-12:
            best, best_w = total, w
    return best_w


def test_width_follows_costs_and_acceptance():
    cpu_like = lambda n: 0.1 if n == 1 else 0.15 + 0.006 * n  # noqa: E731  (2-core CPU: ~2x for q=11 at B=1)
    p = _policy(cpu_like)
    for _ in range(30):
        p.acceptance.observe(33, 10, 10)  # a row that copies: accepts everything
        p.acceptance.observe(11, 10, 0)  # a row whose drafts always fail
    # flat costs: draft all the available tokens of a confident row
    flat = _policy(lambda n: 1.0)
    flat.acceptance = p.acceptance
    assert flat.width(np.array([7]), np.array([33])) == 7
    # batch 1 on the CPU: confident row -> long draft; hopeless row -> none (q=1 is much cheaper)
    assert p.width(np.array([10]), np.array([33])) == 10
    assert p.width(np.array([10]), np.array([11])) == 0
    assert p.width(np.array([0]), np.array([33])) == 0
    # batch 8 where one row copies and seven fail: each drafted position costs 8 tokens, for one row's gain
    wide = p.width(np.array([10] * 8), np.array([33] + [11] * 7))
    assert wide < p.width(np.array([10]), np.array([33]))
    rng = np.random.default_rng(0)
    for _ in range(20):
        batch = int(rng.integers(1, 9))
        avail = rng.integers(0, 11, batch)
        keys = rng.choice([33, 11, 10], batch)
        remaining = rng.integers(1, 65, batch)
        assert p.width(avail, keys, remaining) == _brute_force(p, avail, keys, remaining)


def test_certain_drafts_count_as_accepted():
    """Grammar-forced drafts (``certain``): survival 1 for the first certain[b] drafts, the row class's
    after them; the width then drafts the certain text of a row whose class never accepts."""
    cpu_like = lambda n: 0.1 if n == 1 else 0.15 + 0.006 * n  # noqa: E731
    p = _policy(cpu_like)
    for _ in range(30):
        p.acceptance.observe(11, 10, 0)  # drafts of this class always fail
    surv = p.acceptance.survival(11)
    exp = p.expected_tokens(np.array([6, 6]), np.array([11, 11]), 6, certain=np.array([4, 0]))
    np.testing.assert_allclose(exp[0], 1 + np.concatenate([[0], np.cumsum(np.r_[np.ones(4), surv[:2]])]))
    np.testing.assert_allclose(exp[1], 1 + np.concatenate([[0], np.cumsum(surv[:6])]))
    assert p.width(np.array([6]), np.array([11])) == 0
    assert p.width(np.array([6]), np.array([11]), certain=np.array([6])) == 6
    # batch 8: all rows with 10 certain drafts -> all of them; one such row among seven hopeless ones ->
    # not worth widening every row's forward (the batch ends with its slowest rows)
    keys, rem = np.array([11] * 8), np.full(8, 40)
    assert p.width(np.array([10] * 8), keys, rem, certain=np.full(8, 10)) == 10
    assert p.width(np.array([10] * 8), keys, rem, certain=np.array([10] + [0] * 7)) < 10


def test_tree_nodes_keep_the_likely_nodes_where_they_pay():
    """Tree steps: node i's acceptance is estimated as survival[depth_i] * share_i; each row keeps its n
    most likely nodes, n chosen for the most expected tokens per predicted second."""
    # a star of three siblings (shares 0.6, 0.3, 0.1) and a chain of two under the first
    depth = np.array([[0, 0, 0, 1, 2]])
    share = np.array([[0.6, 0.3, 0.1, 0.6, 0.6]])
    keys = np.array([0])
    p = _policy(lambda n: 1.0 + 0.25 * (n - 1))
    p.acceptance.survival = lambda key: np.ones(32)  # every depth reached: P = share
    # gains 1, 1.6, 2.2, 2.8, 3.1, 3.2 over costs 1, 1.25, ..., 2.25: three nodes, the chain
    assert p.tree_nodes(depth, share, keys).tolist() == [[True, False, False, True, True]]
    flat = _policy(lambda n: 1.0)  # a forward over more tokens costs nothing more: every node
    flat.acceptance.survival = p.acceptance.survival
    assert flat.tree_nodes(depth, share, keys).all()
    steep = _policy(lambda n: float(n))  # each token costs a whole forward: nothing pays
    steep.acceptance.survival = p.acceptance.survival
    assert not steep.tree_nodes(depth, share, keys).any()
    # deeper nodes count less as the row's survival falls: the chain's tail loses to the 0.3 sibling
    # (P = 0.6, 0.3, 0.1, 0.24, 0.06; with each token at a tenth of a forward the best is three nodes)
    cheaper = _policy(lambda n: 1.0 + 0.1 * (n - 1))
    cheaper.acceptance.survival = lambda key: np.array([1.0, 0.4, 0.1] + [0.05] * 29)
    assert cheaper.tree_nodes(depth, share, keys).tolist() == [[True, True, False, True, False]]
    assert not p.tree_nodes(np.full((2, 3), -1), np.zeros((2, 3)), np.array([0, 1])).any()


def test_tree_nodes_random_trees_closed_and_optimal():
    """On n-gram trees of random texts with random survivals and batches: the kept nodes form a tree
    (every kept node's parent is kept), each row keeps a prefix of its P-ranking, and the count is the
    best one, by brute force over every count."""
    from specdec.drafters import NGramDrafter
    from specdec.drafters.base import _tree_depths

    rng = np.random.default_rng(0)
    d = NGramDrafter()
    p = _policy(lambda n: 0.1 if n == 1 else 0.15 + 0.006 * n)
    for trial in range(40):
        batch = int(rng.integers(1, 5))
        trees = [d._tree(rng.integers(0, 4, int(rng.integers(8, 40))), 6, 12) for _ in range(batch)]
        N = max(t[0].size for t in trees)
        par = np.full((batch, N), -1)
        share = np.zeros((batch, N))
        used = np.zeros((batch, N), dtype=bool)
        for b, (ids, pa, _, sh) in enumerate(trees):
            par[b, : ids.size], share[b, : ids.size], used[b, : ids.size] = pa, sh, True
        depth = _tree_depths(par, used)
        keys = rng.integers(0, 3, batch)
        survs = {k: np.cumprod(rng.uniform(0.2, 1.0, 32)) for k in range(3)}
        p.acceptance.survival = lambda key: survs[key]
        keep = p.tree_nodes(depth, share, keys)
        assert not (keep & ~used).any()
        assert all(par[b, i] < 0 or keep[b, par[b, i]] for b, i in zip(*np.nonzero(keep)))
        P = np.where(used, np.array([survs[k] for k in keys])[np.arange(batch)[:, None], np.maximum(depth, 0)] * share,
                     -1.0)
        def rate(n):
            gain = sum(1 + np.sort(np.maximum(P[b], 0))[::-1][:n].sum() for b in range(batch))
            return gain / p.cost.predict(batch * (n + 1))
        n = int(keep.sum(1).max())
        assert rate(n) >= max(rate(m) for m in range(N + 1)) - 1e-12
        for b in range(batch):  # a prefix of the row's ranking: nothing left out is likelier than what is kept
            if keep[b].any() and (used[b] & ~keep[b]).any():
                assert P[b][keep[b]].min() >= P[b][used[b] & ~keep[b]].max()


def test_width_charges_model_drafter_time():
    p = _policy(lambda n: 1.0)
    for _ in range(30):
        p.acceptance.observe(0, 4, 2)
    assert p.width(np.array([4]), np.array([0])) > 0
    p.observe_draft_time(2, 4.0)  # 2 s per drafted position against a 1 s forward: never worth it
    assert p.draft_cost == 2.0
    assert p.width(np.array([4]), np.array([0])) == 0


def test_observe_returns_previous_outcomes():
    p = DraftLengthPolicy()
    prev = p.observe(np.array([1, 2, 3, 4]), np.array([0, 3, 3, 3]), np.array([0, 0, 1, 3]))
    assert prev.tolist() == [p.NO_DRAFT, p.REJECTED, p.PARTIAL, p.ALL]
    keys = p.keys(True, np.array([0, 2, 5]), np.array([0, 1, 3]))
    assert keys.tolist() == [100, 121, 153]


# -- the generator under any width schedule ----------------------------------------------------------

class RandomWidths(DraftLengthPolicy):
    """Picks a random width in 0..max(available) every step, or a random node count of a tree (and records it)."""

    def __init__(self, seed=0):
        super().__init__("cpu")
        self.rng = np.random.default_rng(seed)
        self.widths = []

    def width(self, available, keys, remaining=None):
        w = int(self.rng.integers(0, int(available.max(initial=0)) + 1))
        self.widths.append(w)
        return w

    def tree_nodes(self, node_depth, share, keys, min_nodes=0):
        """A random number of each row's first nodes (index order puts parents first)."""
        used = node_depth >= 0
        n = max(min_nodes, int(self.rng.integers(0, int(used.sum(1).max(initial=0)) + 1)))
        self.widths.append(n)
        return used & (np.cumsum(used, axis=1) <= n)


@pytest.fixture(scope="module")
def llama():
    for seed in range(10):
        target = tiny_model("llama", seed=seed, layers=2)
        prompts = _ragged_prompts()
        refs = [hf_greedy(target, p, 24) for p in prompts]
        if min_greedy_margin(target, prompts, refs) > 1e-3:
            return target, prompts, refs
    pytest.fail("no seed without greedy near-ties")


def _ragged_prompts():
    """Eight prompts of different lengths, with repeats for the n-gram drafter."""
    out = []
    for i in range(8):
        base = [(7 * i + 3 * j) % 90 + 3 for j in range(3 + i)]
        out.append([1] + base + base[: 2 + i % 3] + base)
    return out


@pytest.mark.parametrize("drafter", ["ngram", "model"])
def test_greedy_exact_under_any_width_schedule_batch8(llama, drafter):
    target, prompts, refs = llama
    small = tiny_model("llama", seed=50, layers=1, hidden_size=32) if drafter == "model" else "ngram"
    gen = SpeculativeGenerator(target, small, num_draft_tokens=6)
    gen.policy = RandomWidths(seed=1)
    eos = refs[2][9]  # some rows stop early at this id
    result = gen.generate(prompts, max_new_tokens=24, eos_token_id=eos)
    for row, ref in enumerate(refs):
        expected = ref[: ref.index(eos) + 1] if eos in ref else ref
        assert result.sequences[row] == expected
    widths = gen.policy.widths
    assert len(set(widths)) >= 3 and 0 in widths and result.stats.drafted_tokens > 0
    # the default policy: same tokens
    gen.policy = DraftLengthPolicy("cpu")
    assert gen.generate(prompts, max_new_tokens=24, eos_token_id=eos).sequences == result.sequences


def test_prefill_verifies_drafts_from_the_prompt(llama):
    target, prompts, refs = llama
    gen = SpeculativeGenerator(target, "ngram", num_draft_tokens=4, adaptive=False)
    chunks = []
    result = gen.generate(prompts, max_new_tokens=24, eos_token_id=None, callback=chunks.append)
    assert result.sequences == refs
    first = chunks[: len(prompts)]  # the first step's chunks, one per row
    assert sorted(c.row for c in first) == list(range(len(prompts)))
    assert any(c.num_drafted > 0 for c in first)  # the prompts repeat themselves: drafts at the prefill
    # every forward is counted, the prefill included: plain decoding gains exactly one token per step
    plain = SpeculativeGenerator(target, "none").generate(prompts[:1], max_new_tokens=5, eos_token_id=None)
    assert plain.stats.target_steps == 5 and plain.stats.tokens_per_step == 1.0
    assert plain.sequences[0] == refs[0][:5]


def test_sampled_distribution_under_random_widths():
    scipy_stats = pytest.importorskip("scipy.stats")
    V = 12
    target = tiny_model("llama", seed=0, layers=2, vocab_size=V, initializer_range=0.1)
    prompt = [1, 5, 6, 7, 5, 6, 7, 5, 6]
    temperature, n = 0.9, 6000
    with torch.no_grad():
        first = target(torch.tensor([prompt])).logits[0, -1].double()
        p1 = torch.softmax(first / temperature, -1)
        p2 = torch.softmax(target(torch.tensor([prompt + [v] for v in range(V)])).logits[:, -1].double()
                           / temperature, -1)
    joint = (p1[:, None] * p2).flatten().numpy()
    counts = np.zeros(V * V)
    drafted = 0
    for seed in range(3):  # three width schedules, 2000 rows each
        gen = SpeculativeGenerator(target, "ngram", num_draft_tokens=2)
        gen.policy = RandomWidths(seed=seed)
        result = gen.generate([prompt] * (n // 3), max_new_tokens=2, temperature=temperature, seed=11 + seed,
                              eos_token_id=None)
        drafted += result.stats.drafted_tokens
        for a, b in result.sequences:
            counts[a * V + b] += 1
    assert drafted > 0
    expected = joint * n
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    _, pvalue = scipy_stats.chisquare(obs, exp)
    assert pvalue > 1e-3, pvalue


# -- a batch whose prompts share a prefix ------------------------------------------------------------

SYSTEM = [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]  # 12 shared tokens, like a chat template's system prompt


def _shared_prefix_prompts():
    return [SYSTEM + p[1:] for p in _ragged_prompts()]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prefix_greedy_exact(monkeypatch, attn):
    from specdec.cache import RaggedCache

    for seed in range(10):
        target = tiny_model("llama", seed=seed, layers=2)
        target.set_attn_implementation(attn)
        prompts = _shared_prefix_prompts()
        refs = [hf_greedy(target, p, 20) for p in prompts]
        if min_greedy_margin(target, prompts, refs) > 1e-3:
            break
    sizes, make = [], RaggedCache.from_model.__func__

    def spy(cls, model, batch_size, *args, **kwargs):
        sizes.append(batch_size)
        return make(cls, model, batch_size, *args, **kwargs)

    monkeypatch.setattr(RaggedCache, "from_model", classmethod(spy))
    gen = SpeculativeGenerator(target, "ngram", num_draft_tokens=5)
    gen.policy = RandomWidths(seed=3)
    eos = refs[5][7]
    result = gen.generate(prompts, max_new_tokens=20, eos_token_id=eos)
    assert sizes == [1]  # the prefix was prefilled once, then copied to the 8 rows
    for row, ref in enumerate(refs):
        assert result.sequences[row] == (ref[: ref.index(eos) + 1] if eos in ref else ref)
    assert result.stats.drafted_tokens > 0 and "eos" in result.finish_reasons
    sizes.clear()
    off = SpeculativeGenerator(target, "ngram", num_draft_tokens=5, share_prefix=False)
    assert off.generate(prompts, max_new_tokens=20, eos_token_id=eos).sequences == result.sequences
    assert sizes == [8]


def test_shared_prefix_sampled_rows_match_batch_of_one():
    """Sampling is sensitive to every logit, not only the argmax: with a fixed K, each row of a batch
    with a shared prefix (holes in its cache) gives the tokens it gives alone (no sharing)."""
    target = tiny_model("qwen3", seed=0, layers=2)
    prompts = _shared_prefix_prompts()
    gen = SpeculativeGenerator(target, "ngram", num_draft_tokens=3, adaptive=False)
    opts = dict(max_new_tokens=12, temperature=1.0, seed=5, eos_token_id=None)
    together = gen.generate(prompts, **opts)
    alone = gen.generate(prompts, batch_size=1, **opts)
    assert together.sequences == alone.sequences
    assert together.stats.drafted_tokens > 0


def test_fixed_costs_make_the_policy_independent_of_timing(monkeypatch):
    """With fixed forward and draft costs, the widths (so greedy statistics) are a function of the
    inputs only: two runs agree even when every measured time differs wildly."""
    fixed = ForwardCostModel("cpu", fixed="prior")
    fixed.observe(4, 123.0)  # ignored
    assert fixed.predict(4) == pytest.approx(1 + 4 / 16) and fixed.seconds == {}
    with pytest.raises(TypeError, match="fixed"):
        ForwardCostModel("cpu", fixed=3.0)

    target = tiny_model("llama", seed=0, layers=2)
    small = tiny_model("llama", seed=1, layers=1, hidden_size=32)
    clock = iter(np.cumsum(np.random.default_rng(0).exponential(1.0, 100_000)))
    import specdec.generator.step as generator_mod

    runs = []
    for drafter in ("ngram", small, "ngram", small):
        policy = DraftLengthPolicy("cpu", forward_cost=lambda n: 1 + n / 500, draft_cost=0.01)
        gen = SpeculativeGenerator(target, drafter, num_draft_tokens=6, policy=policy)
        # (random tiny models seldom repeat themselves: the n-gram drafter's row is the repetitive
        # prompt alone, where its drafts decide how soon the batch finishes)
        prompts = PROMPTS[2:3] if drafter == "ngram" else PROMPTS
        # a clock that jumps at random: measured forward and draft times are noise
        monkeypatch.setattr(generator_mod.time, "perf_counter", lambda: float(next(clock)))
        result = gen.generate(prompts, max_new_tokens=20, eos_token_id=None)
        monkeypatch.undo()
        runs.append((result.sequences, result.stats.drafted_per_position, result.stats.accepted_per_position,
                     result.stats.target_steps))
        assert policy.draft_cost == 0.01 and policy.cost.seconds == {}
    assert runs[0] == runs[2] and runs[1] == runs[3]
    assert sum(runs[0][1]) > 0 and sum(runs[1][1]) > 0  # the policy did draft


def test_tree_path_accepted_to_a_leaf_is_no_rejection(llama):
    """A tree whose accepted path ends at a leaf while another branch goes deeper: the policy counts
    the accepted depth as all there was to try (like a chain accepted in full), not a rejection one
    level further, which would teach it that rows like this one fail there."""
    from specdec.drafters import Drafter, DraftTree

    target, prompts, refs = llama
    prompt, ref = prompts[0], refs[0]

    class Fork(Drafter):
        """Step 2: a leaf child that is the target's next greedy token, and a wrong 3-node branch."""
        cheap, supports_tree = True, True

        def propose(self, state):
            from specdec.drafters.base import _empty_draft
            return _empty_draft(state.lengths.shape[0], state.device)

        def propose_tree(self, state, max_nodes):
            n = int(state.lengths[0]) - len(prompt)  # tokens generated so far
            good, bad = ref[n], (ref[n] + 1) % 100
            ids = np.array([[bad, bad, bad, good]])
            par = np.array([[-1, 0, 1, -1]])
            return DraftTree(torch.from_numpy(ids), torch.from_numpy(par), None, np.array([4]), ids, par,
                             np.array([1]), np.ones((1, 4)))

    class Recording(DraftLengthPolicy):
        def __init__(self):
            super().__init__("cpu", forward_cost=lambda n: 1.0)  # flat: every node with a chance is kept
            self.seen = []

        def observe(self, keys, drafted, accepted):
            self.seen.append((drafted.tolist(), accepted.tolist()))
            return super().observe(keys, drafted, accepted)

    gen = SpeculativeGenerator(target, Fork(), num_draft_tokens=4, policy=Recording())
    out = gen.generate([prompt], max_new_tokens=4, eos_token_id=None)
    assert out.sequences[0] == ref[:4]
    tree_steps = [seen for seen in gen.policy.seen if seen[0] != [0]]  # the prefill drafted nothing
    assert tree_steps and all(seen == ([1], [1]) for seen in tree_steps), gen.policy.seen  # not ([3], [1])


@pytest.mark.parametrize("tree", [True, False])
def test_idle_rows_get_a_probe(llama, tree):
    """When drafting never pays by the policy's estimates (here every token of a forward costs a whole
    forward), a row that could draft gets one draft after EXPLORE_AFTER steps without any, so a wrong
    estimate (a measured cost spike, an unlucky class) cannot stop drafting for good."""
    import specdec.generator.step as generator_mod

    target, _, _ = llama
    prompt = [1] + [5, 6, 7, 8] * 6  # always a match: drafts are available every step
    gen = SpeculativeGenerator(target, "ngram", tree=tree, policy=DraftLengthPolicy(forward_cost=lambda n: float(n)))
    drafted = []
    out = gen.generate([prompt], max_new_tokens=30, eos_token_id=None,
                       callback=lambda chunk: drafted.append(chunk.num_drafted))
    assert out.sequences[0] == hf_greedy(target, prompt, 30)
    every = generator_mod.EXPLORE_AFTER + 1
    assert drafted[0] == 0 and 0 < sum(d > 0 for d in drafted) <= len(drafted) // every + 1
    assert all(d == 0 for d in drafted[:every - 1])  # the first probe comes after EXPLORE_AFTER idle steps
    assert max(drafted) == 1
