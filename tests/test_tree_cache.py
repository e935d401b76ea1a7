"""Tree steps in the ragged KV cache (specdec.cache): tree position ids and attention masks drive stock HF
decoders (Llama, Qwen2, Mistral with a sliding window; sdpa and eager) so that the logits at every node of
a token tree equal a fresh forward of that node's root-to-node path; ``compact_tree`` keeps the accepted
path so that the next step equals a fresh prefill (C++ and PyTorch-fallback backends); the compaction is
memory-safe on garbage input; nothing waits for the device.

A tree step feeds ``[root, node 0, ..., node N-1]`` per row: the root is the pending token, node ``i``'s
parent is ``tree_parents[b, i]`` (-1 = the root), unused slots have ``tree_token_ids == -1``.
"""
import pytest
import torch

from specdec.hf_compat import cache_kwargs
from specdec import cache as C
from specdec.cache import RaggedCache, compact_tree_, tree_ancestors

from _tiny_models import VOCAB, tiny_model
from test_cache import _filled_store

BACKENDS = ["cpp", "torch"] if C.has_extension() else ["torch"]

N = 6  # nodes per tree in the model tests
TREES = {  # parents of N nodes; None = unused slot (token -1)
    "chain": [-1, 0, 1, 2, 3, 4],
    "star": [-1] * 6,
    "binary": [-1, -1, 0, 0, 1, 1],  # 2-level binary tree
    "ragged": [-1, 0, -1, 1, None, None],  # -1-padded tail
    "holes": [-1, None, 0, 0, None, 2],  # unused slots in the middle too
}


def _random_tree(g, n=N):
    parents = []
    for i in range(n):
        parents.append(int(torch.randint(-1, i, (1,), generator=g)))
    return parents


def _encode(trees, g):
    """trees: list of parent lists (None = unused) -> (token_ids [B, N], parents [B, N], valid [B, N])."""
    B = len(trees)
    parents = torch.full((B, N), -1, dtype=torch.int64)
    tokens = torch.full((B, N), -1, dtype=torch.int64)
    for b, tree in enumerate(trees):
        for i, p in enumerate(tree):
            if p is not None:
                parents[b, i] = p
                tokens[b, i] = int(torch.randint(3, VOCAB, (1,), generator=g))
    return tokens, parents, tokens >= 0


def _path(parents_row, node):
    """Node indices from the root's child down to ``node``."""
    path = []
    while node >= 0:
        path.append(node)
        node = int(parents_row[node])
    return path[::-1]


def _fresh_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def _assert_close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _tree_step(model, cache, roots, tokens, parents, valid):
    ids = torch.cat([roots[:, None], tokens.clamp(min=0)], 1)  # unused slots get any real id (masked)
    with torch.no_grad():
        return model(input_ids=ids, position_ids=cache.tree_position_ids(parents, valid),
                     attention_mask=cache.tree_attention_mask(parents, valid), **cache_kwargs(model, cache),
                     use_cache=True).logits


MODELS = [("llama", "sdpa"), ("qwen2", "sdpa"), ("mistral", "sdpa"), ("llama", "eager")]


def _model(arch, attn):
    extra = {"sliding_window": 6} if arch == "mistral" else {}  # small window: the tree mask must apply it
    return tiny_model(arch, attn_implementation=attn, **extra)


# ------------------------------------------------------------------------------------------------------
# through HF models: every node of a tree step, then compaction and a normal step

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch, attn", MODELS)
def test_tree_steps_and_compaction_match_fresh_forward(arch, attn, backend):
    model = _model(arch, attn)
    g = torch.Generator().manual_seed(MODELS.index((arch, attn)))
    prompt_lens = [5, 9, 3]
    B, T0 = len(prompt_lens), max(prompt_lens)
    seqs = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in prompt_lens]
    pad = [T0 - n for n in prompt_lens]
    cache = RaggedCache.from_model(model, batch_size=B, max_length=48, backend=backend)
    assert cache.sliding_window == (6 if arch == "mistral" else None)
    cache.set_left_padding(pad)
    with torch.no_grad():
        ids = torch.tensor([[0] * p + s for p, s in zip(pad, seqs)])
        model(input_ids=ids, position_ids=cache.position_ids(T0), attention_mask=cache.attention_mask(T0),
              **cache_kwargs(model, cache), use_cache=True)

    rounds = [[TREES["chain"], TREES["star"], TREES["binary"]],
              [TREES["ragged"], _random_tree(g), TREES["holes"]],
              [_random_tree(g), TREES["chain"], TREES["ragged"]]]
    for r, trees in enumerate(rounds):
        tokens, parents, valid = _encode(trees, g)
        roots = torch.randint(3, VOCAB, (B,), generator=g)
        before = cache.lengths.clone()
        logits = _tree_step(model, cache, roots, tokens, parents, valid)
        assert cache.lengths.tolist() == (before + N + 1).tolist()
        assert torch.isfinite(logits).all()  # unused slots too: no fully masked query row
        for b in range(B):
            fresh = _fresh_logits(model, seqs[b] + [int(roots[b])])
            _assert_close(logits[b, 0], fresh[-1])
            for i in range(N):
                if valid[b, i]:
                    path = tokens[b, _path(parents[b], i)].tolist()
                    _assert_close(logits[b, i + 1], _fresh_logits(model, seqs[b] + [int(roots[b])] + path)[-1])
        # accept a random root-to-node path per row (possibly empty), as verify_tree reports it
        accepted = torch.full((B, N), -1, dtype=torch.int64)
        num = torch.zeros(B, dtype=torch.int64)
        for b in range(B):
            used = valid[b].nonzero().flatten().tolist()
            pick = used[int(torch.randint(0, len(used), (1,), generator=g))] if b != r else -1
            path = _path(parents[b], pick)
            accepted[b, :len(path)] = torch.tensor(path, dtype=torch.int64)
            num[b] = len(path)
            seqs[b] += [int(roots[b])] + tokens[b, path].tolist()
        host = (before + 1 + num).to(torch.int64) if r % 2 == 0 else None  # with and without host copies
        cache.compact_tree(accepted, num, host_lengths=host)
        expect = [len(s) + p for s, p in zip(seqs, pad)]
        assert cache.lengths.tolist() == expect and cache.store.host_lengths.tolist() == expect

    nxt = torch.randint(3, VOCAB, (B, 2), generator=g)
    with torch.no_grad():
        logits = model(input_ids=nxt, position_ids=cache.position_ids(2), attention_mask=cache.attention_mask(2),
                       **cache_kwargs(model, cache), use_cache=True).logits
    for b in range(B):
        _assert_close(logits[b], _fresh_logits(model, seqs[b] + nxt[b].tolist())[-2:])


def test_chain_tree_equals_linear_step():
    """A chain is the special case: tree positions and mask equal the linear ones."""
    cache = RaggedCache(1, 3, 1, 4, 32, sliding_window=3)
    cache.set_left_padding([2, 0, 1])
    cache.store.append(torch.zeros(1, 3, 1, 5, 4), torch.zeros(1, 3, 1, 5, 4))
    cache.rollback(torch.tensor([5, 3, 4], dtype=torch.int32))
    chain = torch.tensor([[-1, 0, 1, 2]] * 3)
    assert torch.equal(cache.tree_position_ids(chain), cache.position_ids(5))
    assert torch.equal(cache.tree_attention_mask(chain, additive=False), cache.attention_mask(5, additive=False))
    add = cache.tree_attention_mask(chain, additive=True)
    assert add.dtype == torch.float32 and torch.equal(add, cache.attention_mask(5, additive=True))


def test_tree_mask_and_positions_by_hand():
    """The README picture: root r, children a (node 0) and b (node 1), grandchildren c (of a), d (of b)."""
    cache = RaggedCache(1, 2, 1, 4, 16)
    cache.set_left_padding([1, 0])
    cache.store.append(torch.zeros(1, 2, 1, 3, 4), torch.zeros(1, 2, 1, 3, 4))  # row 0: pad + 2 tokens
    parents = torch.tensor([[-1, -1, 0, 1], [-1, 0, -1, -1]])
    valid = torch.tensor([[True] * 4, [True, True, False, False]])  # row 1: a chain r-a-c, two unused slots
    assert cache.tree_position_ids(parents, valid).tolist() == [[2, 3, 3, 4, 4], [3, 4, 5, 3, 3]]
    m = cache.tree_attention_mask(parents, valid, additive=False)
    assert m.shape == (2, 1, 5, 8) and m.dtype == torch.bool
    assert m[0, 0].int().tolist() == [
        # pad p0 p1 r  a  b  c  d
        [0, 1, 1, 1, 0, 0, 0, 0],  # r
        [0, 1, 1, 1, 1, 0, 0, 0],  # a
        [0, 1, 1, 1, 0, 1, 0, 0],  # b
        [0, 1, 1, 1, 1, 0, 1, 0],  # c
        [0, 1, 1, 1, 0, 1, 0, 1]]  # d
    assert m[1, 0].int().tolist() == [
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 0],  # unused: only itself
        [0, 0, 0, 0, 0, 0, 0, 1]]


def test_tree_ancestors_closure_deep_and_garbage():
    g = torch.Generator().manual_seed(3)
    for n in (1, 2, 3, 5, 17, 64):
        parents = torch.stack([torch.tensor(_random_tree(g, n)) for _ in range(3)])
        parents[0] = torch.arange(n) - 1  # a chain: the deepest case
        anc = tree_ancestors(parents)
        for b in range(3):
            for i in range(n):
                expect = {0, i + 1} | {j + 1 for j in _path(parents[b], i)}
                assert set(anc[b, i + 1].nonzero().flatten().tolist()) == expect
    # parents outside [-1, i): clamped, no error, every row still sees itself
    anc = tree_ancestors(torch.tensor([[5, 2**40, -7, 3]]))
    assert anc.shape == (1, 5, 5) and anc.diagonal(dim1=1, dim2=2).all()
    assert tree_ancestors(torch.zeros(2, 0, dtype=torch.int64)).shape == (2, 1, 1)
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        tree_ancestors(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="int32/int64"):
        tree_ancestors(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="valid"):
        tree_ancestors(torch.zeros(1, 2, dtype=torch.int64), torch.ones(1, 3, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------------
# compaction kernel against an index reference, checks, memory safety

def _store(backend, lengths):
    return _filled_store(backend, B=len(lengths), D=4, lengths=lengths)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compact_tree_matches_index_reference(backend):
    n_nodes, lengths = 5, (11, 8, 6)  # rows hold a tree step of 6 slots at L_b = 5, 2, 0
    s = _store(backend, lengths)
    ref_k, ref_v = s.keys.clone(), s.values.clone()
    accepted = torch.tensor([[0, 2, 4], [3, -1, -1], [1, 0, 4]])  # any order; -1 padding past num_accepted
    num = torch.tensor([3, 1, 0])
    compact_tree_(s.keys, s.values, s.lengths, accepted, num, n_nodes, backend=backend)
    assert s.lengths.tolist() == [9, 4, 1]
    for b, L in enumerate(lengths):
        base = L - n_nodes - 1
        keep = list(range(base + 1)) + [base + 1 + int(x) for x in accepted[b, :num[b]]]
        assert torch.equal(s.keys[:, b, :, :len(keep)], ref_k[:, b, :, keep])
        assert torch.equal(s.values[:, b, :, :len(keep)], ref_v[:, b, :, keep])


def test_compact_tree_checks_and_host_copies():
    cache = RaggedCache(1, 2, 1, 4, 16)
    cache.store.append(torch.zeros(1, 2, 1, 2, 4), torch.zeros(1, 2, 1, 2, 4))
    parents = torch.tensor([[-1, 0, 0], [-1, -1, 1]])
    with pytest.raises(RuntimeError, match="no tree step"):
        cache.compact_tree(torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))
    cache.tree_attention_mask(parents)
    with pytest.raises(RuntimeError, match="not one tree step"):  # the step was not appended yet
        cache.compact_tree(torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))
    cache.store.append(torch.zeros(1, 2, 1, 4, 4), torch.zeros(1, 2, 1, 4, 4))
    acc = torch.tensor([[0, 2], [1, 2]])
    with pytest.raises(ValueError, match=r"row 1 num_accepted 3 outside \[0, 2\]"):
        cache.compact_tree(acc, torch.tensor([2, 3]))
    with pytest.raises(ValueError, match=r"row 0 accepted_nodes\[1\] = 3 outside"):
        cache.compact_tree(torch.tensor([[0, 3], [0, 0]]), torch.tensor([2, 0]))
    with pytest.raises(ValueError, match=r"row 1 host length 6 outside \[3, 5\]"):
        cache.compact_tree(acc, torch.tensor([2, 2]), host_lengths=torch.tensor([5, 6]))
    with pytest.raises(TypeError, match="host_lengths"):
        cache.compact_tree(acc, torch.tensor([2, 2]), host_lengths=[5, 5])
    assert cache.lengths.tolist() == [6, 6]  # nothing changed by a rejected call
    cache.compact_tree(acc, torch.tensor([2, 1]), host_lengths=torch.tensor([5, 4], dtype=torch.int32))
    assert cache.lengths.tolist() == [5, 4] and cache.get_seq_length() == 5
    with pytest.raises(RuntimeError, match="no tree step"):  # a step is compacted once
        cache.compact_tree(acc, torch.tensor([0, 0]))
    cache.store.append(torch.zeros(1, 2, 1, 3, 4), torch.zeros(1, 2, 1, 3, 4))  # explicit N: no mask needed
    cache.compact_tree(torch.tensor([[1], [0]]), torch.tensor([1, 0]), num_nodes=2)
    assert cache.lengths.tolist() == [7, 5]
    with pytest.raises(ValueError, match="row 1 holds 5 slots"):
        cache.compact_tree(acc, torch.tensor([0, 0]), num_nodes=5)


def test_compact_tree_refuses_inconsistent_steps():
    """num_nodes that contradicts the remembered step, host lengths that contradict num_accepted, and
    duplicate or out-of-order node indices are refused (nothing changes); the device lengths follow
    host_lengths."""
    def fresh():
        cache = RaggedCache(1, 2, 1, 4, 32)
        cache.store.append(torch.zeros(1, 2, 1, 2, 4), torch.zeros(1, 2, 1, 2, 4))
        cache.tree_attention_mask(torch.tensor([[-1, 0, 1, 1], [-1, 0, 0, 2]]))  # a step of N = 4 nodes
        cache.store.append(torch.zeros(1, 2, 1, 5, 4), torch.zeros(1, 2, 1, 5, 4))
        return cache

    cache = fresh()
    acc, num = torch.tensor([[0, 1, 3], [0, 2, 3]]), torch.tensor([3, 2])
    with pytest.raises(ValueError, match="num_nodes=7 but the last tree step .* had 4 nodes"):
        cache.compact_tree(acc, num, num_nodes=7)
    with pytest.raises(ValueError, match="row 1 host length 4 means 1 accepted nodes, num_accepted says 2"):
        cache.compact_tree(acc, num, host_lengths=torch.tensor([6, 4]))
    for bad, where in ((torch.tensor([[0, 1, 1], [0, 2, 3]]), r"row 0 accepted_nodes\[2\] = 1 after 1"),
                       (torch.tensor([[0, 1, 3], [2, 0, 3]]), r"row 1 accepted_nodes\[1\] = 0 after 2")):
        for host in (None, torch.tensor([6, 5])):
            with pytest.raises(ValueError, match=where):
                cache.compact_tree(bad, num, host_lengths=host)
    assert cache.lengths.tolist() == [7, 7]  # nothing changed by a refused call
    cache.compact_tree(acc, num, num_nodes=4, host_lengths=torch.tensor([6, 5]))
    assert cache.lengths.tolist() == [6, 5] and cache.store.host_lengths.tolist() == [6, 5]
    # a path that stops early may leave anything in its unused columns
    cache = fresh()
    cache.compact_tree(torch.tensor([[2, 0, 0], [0, 2, 1]]), torch.tensor([1, 2]))
    assert cache.lengths.tolist() == [4, 5]


def test_tree_step_never_waits_for_the_device_given_host_copies():
    """On the meta device any device-to-host copy raises: masks, positions and compaction with the caller's
    host lengths make none."""
    if "cpp" not in BACKENDS:
        pytest.skip("specdec._C not built (the PyTorch fallback reads the lengths back)")
    meta = "meta"
    cache = RaggedCache(2, 3, 2, 8, 32, device=meta, sliding_window=4)
    cache.set_left_padding([1, 0, 2])
    cache.store.append(torch.empty(2, 3, 2, 5, 8, device=meta), torch.empty(2, 3, 2, 5, 8, device=meta))
    parents = torch.empty(3, 4, dtype=torch.int64, device=meta)
    valid = torch.empty(3, 4, dtype=torch.bool, device=meta)
    assert cache.tree_position_ids(parents, valid).shape == (3, 5)
    assert cache.tree_attention_mask(parents, valid).shape == (3, 1, 5, 10)
    cache.store.append(torch.empty(2, 3, 2, 5, 8, device=meta), torch.empty(2, 3, 2, 5, 8, device=meta))
    acc, num = torch.empty(3, 4, dtype=torch.int64, device=meta), torch.empty(3, dtype=torch.int64, device=meta)
    with pytest.raises(NotImplementedError):  # without host lengths: read back
        cache.compact_tree(acc, num)
    cache.compact_tree(acc, num, host_lengths=torch.tensor([6, 9, 7]))
    assert cache.store.host_lengths.tolist() == [6, 9, 7] and cache.get_seq_length() == 9


def _guarded_store(L=2, B=2, H=2, T=8, D=4, lengths=(7, 5)):
    g = torch.Generator().manual_seed(1)
    n = L * B * H * T * D
    bufs = [torch.randn(3 * n, generator=g) for _ in range(2)]
    keys, values = (b[n:2 * n].view(L, B, H, T, D) for b in bufs)
    lens = torch.tensor(lengths, dtype=torch.int32)
    snapshot = [b.clone() for b in bufs]

    def guards_untouched():
        return all(torch.equal(b[:n], r[:n]) and torch.equal(b[2 * n:], r[2 * n:]) for b, r in zip(bufs, snapshot))

    return keys, values, lens, guards_untouched


HOSTILE = [-1, -2**40, 2**40, 3, 4, 2**31]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", HOSTILE)
def test_compact_tree_garbage_indices_stay_in_bounds(backend, bad):
    n_nodes = 3  # each row: a step of 4 slots at L_b = 3, 1 (T_max 8)
    keys, values, lens, guards_untouched = _guarded_store()
    before = keys.clone()
    accepted = torch.tensor([[bad, 0, bad], [1, bad, 2]])
    num = torch.tensor([bad, 2])
    compact_tree_(keys, values, lens, accepted, num, n_nodes, backend=backend)  # clamped: no error
    n0 = min(max(bad, 0), n_nodes)
    assert lens.tolist() == [4 + n0, 4] and guards_untouched()
    assert torch.equal(keys[:, :, :, :2], before[:, :, :, :2])  # the prefix never moves
    assert torch.equal(keys[:, 1, :, 2], before[:, 1, :, 3])  # row 1: node 1 (slot 3) to slot 2
    assert torch.equal(keys[:, 1, :, 3], before[:, 1, :, 3 + min(max(bad, 0), n_nodes - 1) - 1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_len", [-2, 0, 2, 9, 2**24, -2**30])
def test_compact_tree_corrupted_lengths_rejected_on_cpu(backend, bad_len):
    keys, values, lens, guards_untouched = _guarded_store()
    lens[1] = bad_len
    snapshot = keys.clone()
    try:
        compact_tree_(keys, values, lens, torch.tensor([[0, 1], [0, 1]]), torch.tensor([2, 2]), 3, backend=backend)
    except RuntimeError as e:  # lengths outside [0, T_max] or shorter than a step
        assert "gather: row 1" in str(e) and torch.equal(keys, snapshot)
    else:  # a short but valid length: clamped into the row, garbage but in bounds
        assert 0 <= bad_len <= 8 and 0 <= int(lens.min()) and int(lens.max()) <= 8
    assert guards_untouched()
    with pytest.raises(ValueError, match="num_nodes"):
        compact_tree_(keys, values, lens, torch.tensor([[0], [0]]), torch.tensor([0, 0]), 8, backend=backend)


# ------------------------------------------------------------------------------------------------------
# GPU

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_tree_step_matches_cpu(backend):
    g = torch.Generator().manual_seed(5)
    parents = torch.stack([torch.tensor(_random_tree(g, 32)) for _ in range(3)])
    valid = torch.rand(3, 32, generator=g) < 0.8
    out = {}
    for dev in ("cpu", "cuda"):
        cache = RaggedCache(2, 3, 2, 8, 64, device=dev, sliding_window=7, backend=backend)
        cache.set_left_padding([1, 0, 2])
        data = torch.randn(2, 3, 2, 40, 8, generator=torch.Generator().manual_seed(6))
        cache.store.append(data[:, :, :, :5].to(dev), data[:, :, :, :5].to(dev))
        cache.rollback(torch.tensor([5, 3, 4], dtype=torch.int32, device=dev))
        pos = cache.tree_position_ids(parents.to(dev), valid.to(dev)).cpu()
        mask = cache.tree_attention_mask(parents.to(dev), valid.to(dev)).cpu()
        cache.store.append(data[:, :, :, 5:38].to(dev), data[:, :, :, 5:38].to(dev))
        # valid paths (a CPU cache refuses garbage; test_cuda_compact_tree_garbage_stays_in_bounds
        # covers garbage on CUDA)
        acc = torch.tensor([[0, 1, 3], [2, 5, 7], [29, 30, 31]], device=dev)
        cache.compact_tree(acc, torch.tensor([3, 2, 0], device=dev), host_lengths=torch.tensor([9, 6, 5]))
        out[dev] = (pos, mask, cache.lengths.cpu(), cache.store.keys.cpu(), cache.store.values.cpu())
    for a, b in zip(out["cpu"][:3], out["cuda"][:3]):
        assert torch.equal(a, b)
    for b_, n in enumerate(out["cpu"][2].tolist()):
        assert torch.equal(out["cpu"][3][:, b_, :, :n], out["cuda"][3][:, b_, :, :n])
        assert torch.equal(out["cpu"][4][:, b_, :, :n], out["cuda"][4][:, b_, :, :n])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_compact_tree_garbage_stays_in_bounds():
    if "cpp" not in BACKENDS:
        pytest.skip("specdec._C not built")
    L, B, H, T, D = 2, 2, 2, 8, 4
    n = L * B * H * T * D
    bufs = [torch.randn(3 * n, device="cuda") for _ in range(2)]
    snap = [b.clone() for b in bufs]
    keys, values = (b[n:2 * n].view(L, B, H, T, D) for b in bufs)
    lens = torch.tensor([7, 5], dtype=torch.int32, device="cuda")
    for bad in HOSTILE + [-2**30]:
        lens.copy_(torch.tensor([max(min(bad, 2**31 - 1), -2**31), 5], dtype=torch.int32))
        acc = torch.tensor([[bad, 0, bad], [1, bad, 2]], device="cuda")
        compact_tree_(keys, values, lens, acc, torch.tensor([bad, 9], device="cuda"), 3, backend="cpp")
        torch.cuda.synchronize()
        assert 0 <= int(lens.min()) and int(lens.max()) <= T
    for b, s in zip(bufs, snap):
        assert torch.equal(b[:n], s[:n]) and torch.equal(b[2 * n:], s[2 * n:])
