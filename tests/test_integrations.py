"""Drop-in adapter: patched HF assisted generation (the vLLM samplers: tests/test_vllm.py)."""
import pytest
import torch

import specdec.integrations.transformers as sd_hf
from _tiny_models import PROMPTS, hf_greedy, tiny_model


@pytest.fixture(scope="module")
def models():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention on a shared 2-core machine
    yield tiny_model("llama", seed=0, layers=2), tiny_model("llama", seed=1, layers=1, hidden_size=32)
    torch.set_num_threads(old)


def _assisted(target, prompt, **kwargs):
    ids = torch.tensor([prompt])
    out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, eos_token_id=None,
                          pad_token_id=0, **kwargs)
    return out[0, len(prompt):].tolist()


def test_patched_assisted_greedy_equals_unpatched(models, monkeypatch):
    target, small = models
    from specdec import ops

    calls = []
    original = ops.verify
    monkeypatch.setattr(ops, "verify", lambda *a, **k: calls.append(1) or original(*a, **k))
    for kwargs in (dict(assistant_model=small), dict(prompt_lookup_num_tokens=4)):
        before = [_assisted(target, p, do_sample=False, **kwargs) for p in PROMPTS[:2]]
        sd_hf.patch()
        try:
            assert sd_hf.is_patched()
            sd_hf.patch()  # idempotent
            after = [_assisted(target, p, do_sample=False, **kwargs) for p in PROMPTS[:2]]
        finally:
            sd_hf.unpatch()
        assert not sd_hf.is_patched()
        assert after == before == [hf_greedy(target, p, 12) for p in PROMPTS[:2]]
        assert calls, "the patched generate did not call specdec.ops.verify"
        calls.clear()


def test_patched_assisted_sampling_runs(models):
    target, small = models
    sd_hf.patch()
    try:
        torch.manual_seed(0)
        a = _assisted(target, PROMPTS[0], assistant_model=small, do_sample=True)
        torch.manual_seed(0)
        b = _assisted(target, PROMPTS[0], assistant_model=small, do_sample=True)
    finally:
        sd_hf.unpatch()
    assert a == b and len(a) == 12


def test_select_tokens_matches_hf_greedy_rule():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 50)
    best = logits.argmax(-1)[0]
    cand = torch.cat([torch.tensor([[7, 8]]), best[None, :2], torch.tensor([[(int(best[2]) + 1) % 50]])], 1)
    valid, n = sd_hf.select_tokens(cand, None, 3, logits, 2, False)
    assert n == 2 and valid.tolist() == [best[:3].tolist()]
