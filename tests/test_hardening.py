"""Defined results for bad or unusual inputs (issue: hardening), on every backend."""
import pytest
import torch

import specdec
from conftest import device_for

V = 50


def _inputs(B=3, K=2, seed=0, dev="cpu"):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, K + 1, V, generator=g) * 2
    ids = torch.randint(0, V, (B, K), generator=g)
    q = torch.softmax(torch.randn(B, K, V, generator=g), -1)
    return logits.to(dev), ids.to(dev), q.to(dev)


def test_mixed_devices_raise_on_default_path():
    logits, ids, q = _inputs()
    with pytest.raises(ValueError, match="draft_token_ids is on meta"):
        specdec.verify(logits, ids.to("meta"), None, seed=1)
    with pytest.raises(ValueError, match="draft_probs is on meta"):
        specdec.verify(logits, ids, q.to("meta"), seed=1)


def test_negative_temperature_is_greedy_with_and_without_check(backend):
    dev = device_for(backend)
    logits, ids, q = _inputs(dev=dev)
    ids[:, 0] = logits[:, 0].argmax(-1)  # some greedy acceptances
    greedy = specdec.verify(logits, ids, q, temperature=0.0, seed=3, backend=backend)
    for check in (False, True):
        out = specdec.verify(logits, ids, q, temperature=-1.0, seed=3, backend=backend, check=check)
        assert torch.equal(out[0], greedy[0]) and torch.equal(out[1], greedy[1])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_temperature_voids_the_row_on_every_backend(backend, bad):
    dev = device_for(backend)
    logits, ids, q = _inputs(dev=dev)
    temps = torch.tensor([0.8, bad, 0.0], device=dev)
    out, n = specdec.verify(logits, ids, q, temperature=temps, seed=4, backend=backend)
    ref_out, ref_n = specdec.verify(logits, ids, q, temperature=temps, seed=4, backend="reference")
    assert out[1].tolist() == [-1] * 3 and int(n[1]) == 0
    assert torch.equal(out.cpu(), ref_out.cpu()) and torch.equal(n.cpu(), ref_n.cpu())
    assert (out[[0, 2], 0] >= 0).all()  # the other rows are untouched
    tok, probs = specdec.sample(logits[:, 0], temperature=temps, seed=4, backend=backend)
    assert int(tok[1]) == -1 and float(probs[1].abs().sum()) == 0.0 and (tok[[0, 2]] >= 0).all()
    with pytest.raises(ValueError, match="temperature"):
        specdec.verify(logits, ids, q, temperature=temps, seed=4, backend=backend, check=True)


@pytest.mark.parametrize("name,value", [("top_k", 2.5), ("seed", 1.5), ("offset", 0.5),
                                        ("offset", [0, 1.0, 2]), ("seed", torch.tensor([1.0, 2.0, 3.0]))])
def test_float_integer_arguments_raise(name, value):
    logits, ids, q = _inputs()
    kw = dict(seed=1)
    kw[name] = value
    with pytest.raises(TypeError, match=name):
        specdec.verify(logits, ids, q, **kw)


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 2**70])
def test_offset_out_of_int64_names_offset(value):
    logits, ids, q = _inputs()
    with pytest.raises(ValueError, match="offset"):
        specdec.verify(logits, ids, q, seed=1, offset=value)
    with pytest.raises(ValueError, match="offset"):
        specdec.sample(logits[:, 0], seed=1, offset=value)


def test_float64_logits_accepted_and_equal_to_float32(backend):
    dev = device_for(backend)
    logits, ids, q = _inputs(dev=dev)
    a = specdec.verify(logits.double(), ids, q.double(), temperature=0.9, seed=5, backend=backend, check=True)
    b = specdec.verify(logits, ids, q, temperature=0.9, seed=5, backend=backend)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    ta, pa = specdec.sample(logits[:, 0].double(), temperature=0.9, seed=5, backend=backend, check=True)
    tb, pb = specdec.sample(logits[:, 0], temperature=0.9, seed=5, backend=backend)
    assert torch.equal(ta, tb) and torch.equal(pa, pb)


def test_int_seed_needs_no_host_to_device_copy(monkeypatch):
    """An int seed is expanded per row on the device: no CPU tensor is built and moved (a blocking
    copy on CUDA). Detected on the meta device, where the op runs its fake implementation."""
    moves = []
    real_to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if out.device != self.device:
            moves.append((self.device, out.device, tuple(self.shape)))
        return out

    monkeypatch.setattr(torch.Tensor, "to", spy)
    logits = torch.empty(4, 3, V, device="meta")
    ids = torch.empty(4, 2, dtype=torch.int64, device="meta")
    out, n = specdec.verify(logits, ids, None, temperature=0.7, top_p=0.9, seed=12345, offset=7)
    tok, probs = specdec.sample(logits[:, 0], temperature=0.7, seed=12345, offset=7)
    assert out.shape == (4, 3) and tok.shape == (4,)
    assert moves == []
    seeds = specdec.ops._seeds(2**64 + 99, 6, torch.device("cpu"))
    assert torch.equal(seeds, specdec.ops.row_seeds(2**64 + 99, 6))


# ---------------------------------------------------------------- one rule per bad input (issue 22)


def _tree_chain(B, K):
    """verify_tree's parents for a chain of K nodes per row."""
    return torch.arange(-1, K - 1).expand(B, K).clone()


@pytest.mark.parametrize("method", ["token", "block"])
def test_nan_in_draft_probs_counts_as_zero(backend, method):
    """NaN in draft_probs is read as 0 by every backend, op and method: the tokens are those of the
    same call with the NaNs replaced by 0, and every backend gives the reference's tokens. NaN at
    the drafted ids (accepted iff p > 0, as q = 0 is) and elsewhere (nothing taken off the
    residual), on rows that reach both."""
    dev = device_for(backend)
    B, K = 6, 3
    g = torch.Generator().manual_seed(21)
    logits = torch.randn(B, K + 1, V, generator=g)
    q = torch.softmax(torch.randn(B, K, V, generator=g) * 2, -1)
    ids = torch.stack([torch.multinomial(q[:, i], 1, generator=g)[:, 0] for i in range(K)], 1)
    q_nan = q.clone()
    q_nan[0, 0, ids[0, 0]] = float("nan")  # the drafted id
    q_nan[1, 0, :V // 2] = float("nan")  # much of the residual
    q_nan[2:, :, 7] = float("nan")
    seeds = torch.arange(B) + 40
    zeroed = q_nan.nan_to_num(0.0)
    for temperature in (1.0, 0.7):
        want = specdec.verify(logits, ids, zeroed, temperature=temperature, seed=seeds, method=method,
                              backend="reference")
        for draft_probs in (q_nan, zeroed):
            got = specdec.verify(logits.to(dev), ids.to(dev), draft_probs.to(dev), temperature=temperature,
                                 seed=seeds.to(dev), method=method, backend=backend)
            assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
    # the same rule in tree verification (a chain, and siblings under the root)
    for parents in (_tree_chain(B, K), torch.full((B, K), -1)):
        want = specdec.verify_tree(logits, ids, parents, zeroed, seed=seeds, backend="reference")
        got = specdec.verify_tree(logits.to(dev), ids.to(dev), parents.to(dev), q_nan.to(dev), seed=seeds.to(dev),
                                  backend=backend)
        for a, b in zip(got, want):
            assert torch.equal(a.cpu(), b)
    with pytest.raises(ValueError, match="draft_probs must be finite"):
        specdec.verify(logits, ids, q_nan, check=True)


def test_nan_draft_probability_is_accepted_like_zero(backend):
    """A NaN draft probability at the drafted id is q(x) = 0 < p(x): always accepted."""
    dev = device_for(backend)
    B = 64
    logits = torch.randn(B, 2, V, generator=torch.Generator().manual_seed(22))
    q = torch.full((B, 1, V), 1.0 / V)
    q[:, 0, 4] = float("nan")
    for method in ("token", "block"):
        out, n = specdec.verify(logits.to(dev), torch.full((B, 1), 4, device=dev), q.to(dev), seed=torch.arange(B),
                                method=method, backend=backend)
        assert (n == 1).all() and (out[:, 0] == 4).all()


def test_tree_without_nodes_and_max_depth_gives_the_bonus(backend):
    """N = 0 with max_depth > 0: every backend (the reference used to raise IndexError) emits the
    bonus token and pads; with check=True too."""
    dev = device_for(backend)
    g = torch.Generator().manual_seed(23)
    logits = torch.randn(3, 1, V, generator=g)
    empty = torch.empty(3, 0, dtype=torch.int64)
    q = torch.empty(3, 0, V)
    for draft_probs in (None, q):
        for t in (0.0, 1.0):
            outs = [specdec.verify_tree(logits.to(dev), empty.to(dev), empty.to(dev),
                                        None if draft_probs is None else draft_probs.to(dev),
                                        temperature=t, seed=5, max_depth=3, backend=b, check=check)
                    for b, check in ((backend, False), (backend, True), ("reference", False))]
            for out, n, nodes in outs:
                assert out.shape == (3, 4) and nodes.shape == (3, 3) and (n == 0).all()
                assert (out[:, 0] >= 0).all() and (out[:, 1:] == -1).all() and (nodes == -1).all()
                assert torch.equal(out.cpu(), outs[-1][0].cpu())
            if t == 0.0:
                assert torch.equal(outs[0][0][:, 0].cpu(), logits[:, 0].argmax(-1))
            # the bonus is the sample op's draw at offset + 0
            tok, _ = specdec.sample(logits[:, 0], temperature=t, seed=5, backend="reference")
            assert torch.equal(outs[0][0][:, 0].cpu(), tok)


def test_absurd_max_depth_names_max_depth():
    logits = torch.randn(2, 3, V)
    tokens, parents = torch.zeros(2, 2, dtype=torch.int64), _tree_chain(2, 2)
    for max_depth in (2**63 - 1, 2**40):
        for check in (False, True):
            with pytest.raises(ValueError, match=f"max_depth={max_depth}"):
                specdec.verify_tree(logits, tokens, parents, max_depth=max_depth, check=check)
    out, n, nodes = specdec.verify_tree(logits, tokens, parents, max_depth=9, temperature=0.0)
    assert out.shape == (2, 10)  # beyond N but sane: padded, as before


@pytest.mark.parametrize("name", ["temperature", "seed", "offset", "top_k", "top_p"])
def test_meta_per_row_arguments_name_themselves(name):
    logits, ids, q = _inputs()
    dtype = torch.float32 if name in ("temperature", "top_p") else torch.int64
    kw = {name: torch.ones(3, dtype=dtype, device="meta")}
    parents = _tree_chain(3, 2)
    calls = [lambda: specdec.verify(logits, ids, q, **kw),
             lambda: specdec.verify(logits, ids, q, method="block", **kw),
             lambda: specdec.verify_tree(logits, ids, parents, q, **kw),
             lambda: specdec.sample(logits[:, 0], **kw)]
    for call in calls:
        with pytest.raises(ValueError, match=f"{name} is a meta tensor"):
            call()


def test_all_meta_inputs_with_check_name_the_tensor():
    """Meta tensors trace shapes (check=False); check=True needs values and says so."""
    logits, ids, q = (t.to("meta") for t in _inputs())
    parents = _tree_chain(3, 2).to("meta")
    assert specdec.verify(logits, ids, q)[0].shape == (3, 3)
    assert specdec.verify(logits, ids, q, method="block")[0].shape == (3, 3)
    for call, name in ((lambda: specdec.verify(logits, ids, q, check=True), "target_logits"),
                       (lambda: specdec.verify(logits, ids, q, method="block", check=True), "target_logits"),
                       (lambda: specdec.verify_tree(logits, ids, parents, q, check=True), "target_logits"),
                       (lambda: specdec.sample(logits[:, 0], check=True), "logits")):
        with pytest.raises(ValueError, match=f"{name} is a meta tensor .*check=True"):
            call()
