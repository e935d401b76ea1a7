"""SpeculativeGenerator and drafters on tiny HF models: exactness, distribution, per-row behaviour."""
import numpy as np
import pytest
import torch

from specdec.cache import RaggedCache
from specdec.drafters import DraftState, EarlyExitDrafter, ModelDrafter, NGramDrafter, truncated_model
from specdec.generator import SpeculativeGenerator
from specdec.hf_compat import cache_kwargs
from _tiny_models import PROMPTS, hf_greedy, min_greedy_margin, tiny_model

N_NEW = 16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def family_setup(request):
    family = request.param
    # the exactness tests assert equality: use the first seed whose greedy path has no near-tie
    for seed in range(10):
        target = tiny_model(family, seed=seed, layers=3)
        refs = [hf_greedy(target, p, N_NEW) for p in PROMPTS]
        if min_greedy_margin(target, PROMPTS, refs) > 1e-3:
            break
    else:
        pytest.fail(f"no {family} seed without greedy near-ties")
    drafter = tiny_model(family, seed=100 + seed, layers=1, hidden_size=32)
    return family, target, drafter, refs


@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "fixed"])
@pytest.mark.parametrize("kind", ["ngram", "model", "self", "early-exit", "none"])
def test_greedy_equals_target_generate(family_setup, kind, adaptive):
    family, target, small, refs = family_setup
    drafter = {"ngram": "ngram", "model": small, "self": target, "early-exit": "early-exit", "none": None}[kind]
    gen = SpeculativeGenerator(target, drafter, num_draft_tokens=3, early_exit_layers=2, adaptive=adaptive)
    result = gen.generate(PROMPTS, max_new_tokens=N_NEW, eos_token_id=None)
    assert result.sequences == refs
    assert result.finish_reasons == ["length"] * len(PROMPTS)
    stats = result.stats
    assert stats.generated_tokens == N_NEW * len(PROMPTS)
    if kind == "self":  # the target drafting for itself: every draft accepted (of a tree: its argmax
        # path, which need not be its deepest one)
        if gen.tree:
            assert stats.tree_steps > 0 and stats.accepted_tokens > 0.8 * stats.drafted_tokens
        else:
            assert stats.acceptance_rate == 1.0
    if kind != "none" and not adaptive:  # (the adaptive policy may rightly draft nothing for a tiny model;
        assert stats.drafted_tokens > 0  # tests/test_draft_policy.py forces widths)


def test_no_adaptive_keeps_k(family_setup):
    _, target, _, refs = family_setup
    gen = SpeculativeGenerator(target, target, num_draft_tokens=2, adaptive=False)
    result = gen.generate(PROMPTS, max_new_tokens=N_NEW, eos_token_id=None)
    assert result.sequences == refs
    assert len(result.stats.drafted_per_position) == 2


def test_rows_stop_at_eos_independently(family_setup):
    _, target, small, refs = family_setup
    eos = refs[1][3]  # row 1 emits this id within its first four tokens
    gen = SpeculativeGenerator(target, small, num_draft_tokens=3)
    chunks = []
    result = gen.generate(PROMPTS, max_new_tokens=N_NEW, eos_token_id=eos, callback=chunks.append)
    for row, ref in enumerate(refs):
        expected = ref[: ref.index(eos) + 1] if eos in ref else ref
        assert result.sequences[row] == expected
        assert result.finish_reasons[row] == ("eos" if eos in ref else "length")
    assert len(result.sequences[1]) <= 4
    assert max(map(len, result.sequences)) > 4  # the other rows went on
    # streaming: the chunks of each row concatenate to its sequence, and the last one says finished
    for row in range(len(PROMPTS)):
        mine = [c for c in chunks if c.row == row]
        assert sum((c.token_ids for c in mine), []) == result.sequences[row]
        assert mine[-1].finished and not any(c.finished for c in mine[:-1])


def test_input_ids_with_left_padding(family_setup):
    _, target, _, refs = family_setup
    width = max(map(len, PROMPTS))
    ids = torch.zeros(len(PROMPTS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(PROMPTS):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    gen = SpeculativeGenerator(target, "ngram")
    result = gen.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N_NEW, eos_token_id=None)
    assert result.sequences == refs


@pytest.mark.parametrize("kind", ["model", "ngram"])
def test_batch_of_one_equals_batch_of_eight(kind):
    target = tiny_model("llama", seed=0, layers=2)
    drafter = tiny_model("llama", seed=1, layers=1, hidden_size=32) if kind == "model" else "ngram"
    prompts = (PROMPTS * 2)[:8]
    # fixed K: a row's drafts depend on its own tokens only (the adaptive width is the batch's)
    gen = SpeculativeGenerator(target, drafter, num_draft_tokens=3, adaptive=False)
    opts = dict(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=1234, eos_token_id=None)
    together = gen.generate(prompts, **opts).sequences
    alone = gen.generate(prompts, batch_size=1, **opts).sequences
    assert together == alone
    # same prompt, different rows of the user's list: different seeds, (almost surely) different tokens
    assert together[0] != together[4]
    assert gen.generate(prompts, **{**opts, "seed": 99}).sequences != together


def _two_token_distribution(model, prompt, temperature):
    """Exact joint distribution of the target's next two tokens: [V, V] float64."""
    with torch.no_grad():
        first = model(torch.tensor([prompt])).logits[0, -1].double()
        p1 = torch.softmax(first / temperature, -1)
        V = p1.shape[0]
        batch = torch.tensor([prompt + [v] for v in range(V)])
        p2 = torch.softmax(model(batch).logits[:, -1].double() / temperature, -1)
    return p1[:, None] * p2


@pytest.mark.parametrize("kind", ["model", "ngram"])
def test_sampled_two_tokens_match_target_distribution(kind):
    scipy_stats = pytest.importorskip("scipy.stats")
    V = 12
    target = tiny_model("llama", seed=0, layers=2, vocab_size=V, initializer_range=0.1)
    drafter = tiny_model("llama", seed=3, layers=1, vocab_size=V, hidden_size=32, initializer_range=0.1)
    prompt = [1, 5, 6, 7, 5, 6, 7, 5, 6]  # repetitive: the n-gram drafter proposes drafts
    temperature, n = 0.9, 6000
    joint = _two_token_distribution(target, prompt, temperature).flatten().numpy()
    # fixed K: over 6000 rows the adaptive policy would (rightly) draft nothing
    gen = SpeculativeGenerator(target, drafter if kind == "model" else "ngram", num_draft_tokens=2, adaptive=False)
    result = gen.generate([prompt] * n, max_new_tokens=2, temperature=temperature, seed=7, eos_token_id=None)
    assert result.stats.drafted_tokens > 0 and 0 < result.stats.accepted_tokens < result.stats.drafted_tokens
    counts = np.zeros(V * V)
    for a, b in result.sequences:
        counts[a * V + b] += 1
    expected = joint * n
    big = expected >= 5  # pool the rare cells so the chi-square approximation holds
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    _, pvalue = scipy_stats.chisquare(obs, exp)
    assert pvalue > 1e-3, pvalue


def test_ngram_lookup():
    d = NGramDrafter(max_ngram=3, min_ngram=1)
    t = np.array([1, 2, 3, 4, 9, 2, 3, 4, 7, 2, 3])
    # [2, 3] occurs at 1 and 5: the later one's continuation stops at the end (4 tokens), the earlier
    # one's does not: the longest continuation wins
    assert d.lookup(t, 5).tolist() == [4, 9, 2, 3, 4]
    assert d.match(t, 5) == (3, 2)
    # both continuations are full length: the most recent wins (earliest with prefer="earliest")
    assert d.lookup(t, 3).tolist() == [4, 7, 2]
    assert NGramDrafter(prefer="earliest").lookup(t, 3).tolist() == [4, 9, 2]
    assert d.lookup(t, 1).tolist() == [4]
    assert d.lookup(np.array([5, 6, 7]), 4).tolist() == []
    assert d.match(np.array([5, 6, 7]), 4) == (-1, 0)
    assert d.lookup(t, 0).tolist() == []
    # a longer matching n-gram beats a more recent shorter one
    t2 = np.array([5, 1, 2, 3, 8, 8, 9, 2, 3, 6, 1, 2, 3])
    assert d.match(t2, 2) == (4, 3) and d.lookup(t2, 2).tolist() == [8, 8]
    assert NGramDrafter(max_ngram=2).lookup(t2, 2).tolist() == [6, 1]
    with pytest.raises(ValueError):
        NGramDrafter(prefer="latest")


def test_ngram_propose_reports_matches():
    d = NGramDrafter()
    rows = [[1, 2, 3, 4, 9, 2, 3], [7, 8, 9], [5, 6, 5, 6, 5]]
    tokens = np.zeros((3, 16), dtype=np.int64)
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = r
    state = DraftState(tokens, np.array([7, 3, 5]), np.array([4, 4, 1]), 0.0, 0, 1.0, torch.zeros(3), 0,
                       torch.device("cpu"), 16)
    draft = d.propose(state)
    assert draft.num_drafted.tolist() == [4, 0, 1]
    assert draft.match.tolist() == [2, 0, 3]
    assert draft.token_ids.tolist() == [[4, 9, 2, 3], [-1, -1, -1, -1], [6, -1, -1, -1]]
    cut = draft.truncate(2)
    assert cut.token_ids.tolist() == [[4, 9], [-1, -1], [6, -1]] and cut.num_drafted.tolist() == [2, 0, 1]


def test_truncated_model_shares_weights():
    target = tiny_model("qwen3", seed=0, layers=3)
    view = truncated_model(target, 1)
    assert len(view.model.layers) == 1 and len(target.model.layers) == 3
    assert view.lm_head.weight is target.lm_head.weight
    assert view.model.layers[0].mlp.up_proj.weight is target.model.layers[0].mlp.up_proj.weight
    assert target.config.num_hidden_layers == 3
    ids = torch.tensor([[1, 2, 3]])
    assert view(ids).logits.shape == target(ids).logits.shape
    assert isinstance(SpeculativeGenerator(target, "early-exit").drafter, EarlyExitDrafter)
    assert isinstance(SpeculativeGenerator(target, target).drafter, ModelDrafter)


def test_early_exit_drafter_shares_the_target_cache(monkeypatch):
    """The early-exit drafter allocates no cache (one RaggedCache per batch: the target's), reads its
    drafts from the target's cache and leaves that cache's lengths as they were."""
    target = tiny_model("llama", seed=0, layers=3)
    created, init = [], RaggedCache.__init__

    def counting_init(self, *args, **kwargs):
        created.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(RaggedCache, "__init__", counting_init)
    gen = SpeculativeGenerator(target, "early-exit", num_draft_tokens=3, early_exit_layers=1)
    result = gen.generate(PROMPTS, max_new_tokens=8, eos_token_id=None)
    assert len(created) == 1 and result.stats.drafted_tokens > 0
    assert result.sequences == [hf_greedy(target, p, 8) for p in PROMPTS]

    # one proposal by hand, over the target's cache in the generator's state (all but the pending token)
    drafter, k = gen.drafter, 4
    lengths = np.array([len(p) for p in PROMPTS])
    tokens = np.zeros((len(PROMPTS), 32), dtype=np.int64)
    for b, p in enumerate(PROMPTS):
        tokens[b, : len(p)] = p
    cache = RaggedCache.from_model(target, batch_size=len(PROMPTS), max_length=32)
    width = int(lengths.max()) - 1
    with torch.no_grad():
        target(input_ids=torch.from_numpy(tokens[:, :width]), position_ids=cache.position_ids(width),
               attention_mask=cache.attention_mask(width), use_cache=True, **cache_kwargs(target, cache))
    cache.rollback(torch.from_numpy(lengths - 1).to(torch.int32))
    state = DraftState(tokens, lengths, np.full(len(PROMPTS), k), 0.0, 0, 1.0, torch.zeros(len(PROMPTS)), 0,
                       torch.device("cpu"), 32, cache=cache)
    drafter.start(state)
    draft = drafter.propose(state)
    assert cache.lengths.tolist() == (lengths - 1).tolist() and cache.get_seq_length() == width
    # the drafts are the truncated model's own greedy continuation
    assert draft.token_ids.tolist() == [hf_greedy(drafter.model, p, k) for p in PROMPTS]
    with pytest.raises(ValueError, match="cache"):
        drafter.start(DraftState(tokens, lengths, state.max_drafts, 0.0, 0, 1.0, state.seeds, 0, state.device, 32))


def test_padded_drafter_vocabulary():
    target = tiny_model("llama", seed=0, layers=2)
    drafter = tiny_model("llama", seed=1, layers=1, hidden_size=32, vocab_size=128)  # padded head
    refs = [hf_greedy(target, p, 8) for p in PROMPTS[:2]]
    gen = SpeculativeGenerator(target, drafter, num_draft_tokens=3)
    assert gen.generate(PROMPTS[:2], max_new_tokens=8, eos_token_id=None).sequences == refs
    sampled = gen.generate(PROMPTS[:2], max_new_tokens=8, temperature=1.0, seed=0, eos_token_id=None)
    assert all(0 <= t < 96 for s in sampled.sequences for t in s)


def test_bad_arguments():
    target = tiny_model("llama", seed=0, layers=1)
    gen = SpeculativeGenerator(target, "ngram")
    with pytest.raises(ValueError):
        gen.generate([[1, 2]], max_new_tokens=0)
    with pytest.raises(ValueError):
        gen.generate([[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="tokenizer"):
        gen.generate(["text"], max_new_tokens=2)
    with pytest.raises(ValueError):
        SpeculativeGenerator(target, "bogus")


def test_bad_generate_inputs_name_the_argument():
    target = tiny_model("llama", seed=0, layers=1)
    vocab = target.get_input_embeddings().num_embeddings
    gen = SpeculativeGenerator(target, "ngram")
    cases = [
        (dict(prompts=[]), ValueError, "prompts is empty"),
        (dict(prompts=[[1, 2]], batch_size=-1), ValueError, "batch_size"),
        (dict(prompts=[[1, 2]], batch_size=0), ValueError, "batch_size"),
        (dict(prompts=[[1, 2]], eos_token_id="12"), TypeError, "eos_token_id"),
        (dict(prompts=[[1, 2]], temperature=float("nan")), ValueError, "temperature"),
        (dict(prompts=[[1, 2]], temperature=float("inf")), ValueError, "temperature"),
        (dict(prompts=[[1, 2]], top_k=2.5), ValueError, "top_k"),
        (dict(prompts=[[1, vocab]]), ValueError, "outside the vocabulary"),
        (dict(prompts=[[-1, 3]]), ValueError, "outside the vocabulary"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            gen.generate(max_new_tokens=2, **kw)
    too_long = [1] * (target.config.max_position_embeddings + 1)
    with pytest.warns(UserWarning, match="maximum"):
        try:
            gen.generate([too_long], max_new_tokens=1, eos_token_id=None)
        except Exception:  # noqa: BLE001  the model may refuse to run past its positions; the warning came first
            pass
    assert gen.generate([[1, 2]], max_new_tokens=2, eos_token_id=[5, 7]).sequences[0]


def test_chat_switch_matches_the_cli_encoding():
    """generate(chat=None) wraps text prompts in the chat template when the tokenizer has one, as
    the CLI does; chat=False is raw completion; chat=True without a template is an error."""
    from _tiny_models import word_tokenizer

    from specdec.cli import _encode
    from specdec.generator import encode_prompt

    tok = word_tokenizer([f"w{i}" for i in range(60)])
    assert encode_prompt(tok, "w1 w2", None) == encode_prompt(tok, "w1 w2", False)  # no template: raw
    with pytest.raises(ValueError, match="chat template"):
        encode_prompt(tok, "w1 w2", True)
    tok.chat_template = "{% for m in messages %}w7 {{ m['content'] }} w8{% endfor %}"
    chat_ids = encode_prompt(tok, "w1 w2", None)
    assert chat_ids == encode_prompt(tok, "w1 w2", True) != encode_prompt(tok, "w1 w2", False)
    assert _encode(tok, ["w1 w2"], raw=False) == [chat_ids]
    assert _encode(tok, ["w1 w2"], raw=True) == [encode_prompt(tok, "w1 w2", False)]
    gen = SpeculativeGenerator(tiny_model("llama", seed=0, layers=1, vocab_size=len(tok)), "ngram", tok)
    assert gen.generate(["w1 w2"], max_new_tokens=1).prompt_ids[0] == chat_ids
    assert gen.generate(["w1 w2"], max_new_tokens=1, chat=False).prompt_ids[0] == encode_prompt(tok, "w1 w2", False)


@pytest.mark.parametrize("kind", ["ngram", "model", "early-exit"])
def test_caches_grow_on_demand(monkeypatch, kind):
    """Caches start with room for GROW_STEP new tokens and grow as rows do: the output is the
    target's greedy output across several growths, and a huge max_new_tokens allocates nothing
    up front."""
    import specdec.generator.step as generator_mod

    monkeypatch.setattr(generator_mod, "GROW_STEP", 4)
    target = tiny_model("llama", seed=0, layers=2, max_position_embeddings=1 << 20)
    small = tiny_model("llama", seed=1, layers=1, hidden_size=32, max_position_embeddings=1 << 20)
    drafter = {"ngram": "ngram", "model": small, "early-exit": "early-exit"}[kind]
    sizes = []
    real = RaggedCache.from_model.__func__

    def spy(cls, model, batch_size, max_length, **kw):
        sizes.append(max_length)
        return real(cls, model, batch_size, max_length, **kw)

    monkeypatch.setattr(RaggedCache, "from_model", classmethod(spy))
    grown = []
    real_grow = RaggedCache.grow
    monkeypatch.setattr(RaggedCache, "grow", lambda self, n: (grown.append(n), real_grow(self, n))[1])
    gen = SpeculativeGenerator(target, drafter, num_draft_tokens=3, early_exit_layers=1, adaptive=False)
    n_new = 120
    refs = [hf_greedy(target, p, n_new) for p in PROMPTS[:2]]
    assert gen.generate(PROMPTS[:2], max_new_tokens=n_new, eos_token_id=None).sequences == refs
    assert grown and max(sizes) < 100  # started small, grew on the way
    # 10^6 new tokens asked, 3 generated: nothing sized for the million
    sizes.clear()
    eos = refs[0][2]
    out = gen.generate(PROMPTS[:1], max_new_tokens=1_000_000, eos_token_id=eos).sequences[0]
    assert out == refs[0][: refs[0].index(eos) + 1]
    assert max(sizes) < 100


def test_big_trees_fit_the_cache(monkeypatch):
    """Trees of up to 64 nodes (K = 32, max_tree_nodes = 2K) on a short generation: every step has
    room for the pending token and all the nodes, past what MAX_DRAFT_TOKENS drafts would need."""
    import specdec.generator.step as generator_mod

    monkeypatch.setattr(generator_mod, "GROW_STEP", 4)
    target = tiny_model("llama", seed=0, layers=1, vocab_size=6)
    rng = np.random.default_rng(3)
    prompt = rng.integers(0, 6, 90).tolist()  # 6 symbols: every n-gram has many continuations
    gen = SpeculativeGenerator(target, "ngram", num_draft_tokens=32, adaptive=False)
    assert gen.max_tree_nodes == 64
    nodes = []
    out = gen.generate([prompt], max_new_tokens=6, eos_token_id=None,
                       callback=lambda chunk: nodes.append(chunk.num_drafted))
    assert out.sequences[0] == hf_greedy(target, prompt, 6)
    assert max(nodes) > generator_mod.MAX_DRAFT_TOKENS + 2


@pytest.mark.parametrize("kind", ["ngram", "model"])
def test_tree_steps_equal_chain_steps_greedy(monkeypatch, kind):
    """Tree steps (the default for drafters that propose trees) give the target's greedy output,
    like chain steps, and really go through verify_tree and the tree cache path."""
    from specdec import ops

    target = tiny_model("llama", seed=0, layers=2)
    drafter = tiny_model("llama", seed=1, layers=1, hidden_size=32) if kind == "model" else "ngram"
    prompts = PROMPTS + [[1, 5, 6, 7, 5, 6, 8, 5, 6, 7, 5, 6]]  # several continuations of "5 6"
    refs = [hf_greedy(target, p, N_NEW) for p in prompts]
    calls = []
    real = ops.verify_tree
    monkeypatch.setattr(ops, "verify_tree", lambda *a, **k: (calls.append(a[1].shape), real(*a, **k))[1])
    tree = SpeculativeGenerator(target, drafter, num_draft_tokens=4, adaptive=False)
    assert tree.tree
    chunks = []
    result = tree.generate(prompts, max_new_tokens=N_NEW, eos_token_id=None, callback=chunks.append)
    assert result.sequences == refs
    assert calls and max(n for _, n in calls) > 1  # trees of several nodes were verified
    # streaming: a tree chunk says whether its last token is the bonus (the path ended at a leaf)
    # or a resample; rejected chunks drafted more than they accepted
    tree_chunks = [c for c in chunks if c.leaf is not None]
    assert tree_chunks and all(c.is_bonus == c.leaf for c in tree_chunks)
    assert all(c.num_drafted > c.num_accepted for c in tree_chunks if not c.is_bonus)
    assert any(not c.is_bonus for c in tree_chunks)
    chain = SpeculativeGenerator(target, drafter, num_draft_tokens=4, adaptive=False, tree=False)
    assert chain.generate(prompts, max_new_tokens=N_NEW, eos_token_id=None).sequences == refs
    with pytest.raises(ValueError, match="tree"):
        SpeculativeGenerator(target, "early-exit", tree=True)


def test_tree_depths_and_node_budget():
    """Host helpers of tree steps: node depths, and a node budget that keeps the first-child path
    first, then the other nodes in index order whose parent is kept."""
    from specdec.drafters.base import _tree_depths
    from specdec.generator.trees import _over_budget

    parents = np.array([[-1, -1, 0, 1, 2, 0, -1], [-1, 0, 1, 2, -1, -1, -1]])
    used = np.array([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0]], dtype=bool)
    assert _tree_depths(parents, used).tolist() == [[0, 0, 1, 1, 2, 1, -1], [0, 1, 2, 3, -1, -1, -1]]
    drop = _over_budget(parents, used, 4)
    assert np.flatnonzero(drop[0]).tolist() == [3, 5]  # kept: path 0-2-4, then node 1
    assert not drop[1].any()  # within budget
    assert np.flatnonzero(_over_budget(parents, used, 2)[1]).tolist() == [2, 3]


@pytest.mark.parametrize("kind", ["model", "ngram"])
def test_sampled_tree_steps_match_target_distribution(kind):
    """Three sampled tokens: rows whose prefill emitted one token draft trees for the next ones
    (the model drafter: several children drawn without replacement, with their probabilities; the
    n-gram drafter: a trie of continuations). The joint of tokens 2 and 3 follows the target."""
    scipy_stats = pytest.importorskip("scipy.stats")
    V, temperature, n = 12, 0.9, 6000
    target = tiny_model("llama", seed=0, layers=2, vocab_size=V, initializer_range=0.1)
    drafter = tiny_model("llama", seed=3, layers=1, vocab_size=V, hidden_size=32, initializer_range=0.1)
    prompt = [1, 5, 6, 7, 5, 6, 8, 5, 6, 9, 5, 6]  # "5 6" has three continuations: an n-gram tree
    with torch.no_grad():
        p1 = torch.softmax(target(torch.tensor([prompt])).logits[0, -1].double() / temperature, -1)
        two = torch.tensor([prompt + [a] for a in range(V)])
        p2 = torch.softmax(target(two).logits[:, -1].double() / temperature, -1)  # [V, V]
        three = torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])
        p3 = torch.softmax(target(three).logits[:, -1].double() / temperature, -1).view(V, V, V)
    joint23 = (p1[:, None, None] * p2[:, :, None] * p3).sum(0).flatten().numpy()  # tokens 2 and 3
    gen = SpeculativeGenerator(target, drafter if kind == "model" else "ngram", num_draft_tokens=2,
                               adaptive=False, max_tree_nodes=6)
    result = gen.generate([prompt] * n, max_new_tokens=3, temperature=temperature, seed=11, eos_token_id=None)
    assert result.stats.tree_steps > 0 and result.stats.draft_nodes > result.stats.drafted_tokens
    counts = np.zeros(V * V)
    for _, b, c in result.sequences:
        counts[b * V + c] += 1
    expected = joint23 * n
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    _, pvalue = scipy_stats.chisquare(obs, exp)
    assert pvalue > 1e-3, pvalue


def _logprobs_by_full_forward(target, prompt, generated, temperature):
    """float64 log-softmax of the target's logits over prompt + generated, at each generated token:
    (processed at ``temperature``, raw)."""
    ids = torch.tensor([prompt + generated])
    with torch.no_grad():
        logits = target(input_ids=ids).logits[0, len(prompt) - 1: -1].double()
    tok = torch.tensor(generated)[:, None]
    raw = torch.log_softmax(logits, -1).gather(1, tok)[:, 0]
    proc = raw if temperature == 0 else torch.log_softmax(logits / temperature, -1).gather(1, tok)[:, 0]
    return proc, raw


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("kind", ["ngram", "model"])
def test_generate_logprobs_match_a_full_forward(family_setup, kind, temperature):
    """generate(logprobs=True): the tokens do not change, and each token's logprobs are the target's
    at its position (drafted-and-accepted, resampled or bonus alike), cut at the length limit."""
    _, target, small, _ = family_setup
    drafter = {"ngram": "ngram", "model": small}[kind]
    # fixed widths: with a sampled model drafter the text depends on the drafts (only its
    # distribution does not), and the adaptive policy's widths depend on measured time
    gen = SpeculativeGenerator(target, drafter, num_draft_tokens=3, adaptive=False)
    plain = gen.generate(PROMPTS, max_new_tokens=N_NEW - 3, temperature=temperature, seed=7, eos_token_id=None)
    chunks = []
    res = gen.generate(PROMPTS, max_new_tokens=N_NEW - 3, temperature=temperature, seed=7, eos_token_id=None,
                       logprobs=True, callback=chunks.append)
    assert res.sequences == plain.sequences and plain.logprobs is None
    for i, (prompt, seq) in enumerate(zip(PROMPTS, res.sequences)):
        assert len(res.logprobs[i]) == len(res.raw_logprobs[i]) == len(seq) == N_NEW - 3
        proc, raw = _logprobs_by_full_forward(target, prompt, seq, temperature)
        torch.testing.assert_close(torch.tensor(res.raw_logprobs[i], dtype=torch.float64), raw, atol=2e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(res.logprobs[i], dtype=torch.float64), proc, atol=2e-4, rtol=0)
        if temperature == 0:
            assert res.logprobs[i] == res.raw_logprobs[i]
        streamed = [p for c in chunks if c.row == i for p in c.logprobs]
        assert [p for p, _ in streamed] == res.logprobs[i]


def test_verify_method_block_reaches_the_op(family_setup, monkeypatch):
    """generate(verify_method="block") verifies chain steps with method="block" (greedy: the same
    tokens as the target's own; sampled with a model drafter: runs, rows complete) and refuses an
    unknown method."""
    from specdec import ops

    _, target, small, refs = family_setup
    gen = SpeculativeGenerator(target, small, num_draft_tokens=3, adaptive=False, tree=False)
    seen = []
    real = ops.verify

    def spy(*args, **kwargs):
        seen.append(kwargs.get("method"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "verify", spy)
    greedy = gen.generate(PROMPTS, max_new_tokens=N_NEW, eos_token_id=None, verify_method="block")
    assert greedy.sequences == refs and seen and set(seen) == {"block"}
    sampled = gen.generate(PROMPTS, max_new_tokens=N_NEW, eos_token_id=None, temperature=1.0, seed=3,
                           verify_method="block")
    assert all(len(s) == N_NEW for s in sampled.sequences) and sampled.stats.drafted_tokens > 0
    with pytest.raises(ValueError, match="verify_method"):
        gen.generate(PROMPTS, max_new_tokens=2, verify_method="joint")
