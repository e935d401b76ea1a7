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
