"""Drop-in adapters: patched HF assisted generation and the vLLM-shaped rejection sampler."""
import pytest
import torch

import specdec.integrations.transformers as sd_hf
from specdec.integrations.vllm import RejectionSampler, SamplingMetadata, SpecDecodeMetadata
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


def test_vllm_rejection_sampler_greedy():
    torch.manual_seed(0)
    V = 32
    drafts = [[3, 4, 5], [], [7, 8]]
    logits = torch.randn(5, V)
    best = logits.argmax(-1)
    drafts[0] = [int(best[0]), int(best[1]), (int(best[2]) + 1) % V]  # two accepted, third rejected
    drafts[2] = [int(best[3]), int(best[4])]  # all accepted -> bonus
    meta = SpecDecodeMetadata.from_lists(drafts)
    bonus = torch.tensor([[11], [12], [13]])
    out = RejectionSampler()(meta, None, logits, bonus, SamplingMetadata(all_greedy=True))
    assert out.dtype == torch.int32 and out.shape == (3, 4)
    assert out[0].tolist() == [int(best[0]), int(best[1]), int(best[2]), -1]
    assert out[1].tolist() == [12, -1, -1, -1]
    assert out[2].tolist() == [int(best[3]), int(best[4]), 13, -1]
    assert RejectionSampler.parse_output(out, V) == [out[0, :3].tolist(), [12], out[2, :3].tolist()]


def test_vllm_rejection_sampler_random_with_probs():
    V, B = 16, 2
    meta = SpecDecodeMetadata.from_lists([[1, 2], [3]])
    target_logits = torch.randn(3, V)
    draft_probs = torch.softmax(torch.randn(3, V), -1)
    sm = SamplingMetadata(temperature=torch.tensor([1.0, 0.7]), seeds=torch.tensor([5, 6]), step=0)
    a = RejectionSampler()(meta, draft_probs, target_logits, torch.tensor([[9], [10]]), sm)
    b = RejectionSampler()(meta, draft_probs, target_logits, torch.tensor([[9], [10]]), sm)
    assert torch.equal(a, b) and a.shape == (B, 3)
    for row, k in zip(a.tolist(), (2, 1)):
        emitted = [t for t in row if t != -1]
        assert 1 <= len(emitted) <= k + 1 and all(0 <= t < V for t in emitted)
    with pytest.raises(ValueError):
        RejectionSampler()(meta, None, target_logits[:2], torch.tensor([[9], [10]]))
