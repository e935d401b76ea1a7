"""Loading: quantization choice, int8 on CPU, GGUF cache, clear errors; SmolLM2 end to end."""
import pytest
import torch

from specdec.hf_compat import cache_kwargs
from specdec.generator import DraftLengthPolicy, SpeculativeGenerator
from specdec.models import (IncompatibleModelsError, ModelLoadError, cache_dir, check_compatible, load_model,
                            load_tokenizer, resolve_quantization)
from _tiny_models import PROMPTS, hf_greedy, tiny_model, word_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


def test_resolve_quantization():
    assert resolve_quantization("auto", "cpu") == "none"
    assert resolve_quantization("auto", "cuda") == "int8"
    assert resolve_quantization("int8", "cpu") == "int8"
    assert resolve_quantization("none", "cuda") == "none"
    with pytest.raises(ValueError):
        resolve_quantization("int4", "cpu")


def test_missing_model_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not a local path"):
        load_model("specdec-test/no-such-model-anywhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="could not load"):
        load_model(str(tmp_path / "empty"))


def test_tokenizer_mismatch_and_vocab_padding():
    target = tiny_model("llama", seed=0, layers=1)  # vocab 96
    padded = tiny_model("llama", seed=1, layers=1, vocab_size=128)
    tok_a = word_tokenizer([f"w{i}" for i in range(80)])
    tok_b = word_tokenizer([f"v{i}" for i in range(80)])
    check_compatible(target, padded, tok_a, word_tokenizer([f"w{i}" for i in range(80)]))  # padding is fine
    with pytest.raises(IncompatibleModelsError, match="different tokenizers"):
        check_compatible(target, padded, tok_a, tok_b)
    with pytest.raises(IncompatibleModelsError, match="different tokenizers"):
        SpeculativeGenerator(target, padded, tok_a, drafter_tokenizer=tok_b)
    big = word_tokenizer([f"w{i}" for i in range(120)])  # more tokens than the target's head
    with pytest.raises(IncompatibleModelsError, match="vocabulary"):
        check_compatible(target, padded, big, big)


@pytest.fixture(scope="module")
def int8_pair(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    root = tmp_path_factory.mktemp("int8")
    for name, seed, kwargs in (("target", 0, dict(layers=2, hidden_size=128)),
                               ("drafter", 1, dict(layers=1, hidden_size=128))):
        tiny_model("llama", seed=seed, **kwargs).save_pretrained(root / name)
    target = load_model(str(root / "target"), quantization="int8", device="cpu")
    drafter = load_model(str(root / "drafter"), quantization="int8", device="cpu")
    return target, drafter


def _is_int8(model):
    import bitsandbytes as bnb

    return any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())


@torch.no_grad()
def _int8_noise(model, seq, chunk):
    """Largest |logit| difference between a full forward of ``seq`` and the same tokens fed in pieces of
    ``chunk`` through a cache: the shape-dependent noise of int8 matmuls (outlier columns, row scales)."""
    from transformers import DynamicCache

    full = model(torch.tensor([seq])).logits[0].float()
    cache, parts = DynamicCache(), []
    for s in range(0, len(seq), chunk):
        ids = torch.tensor([seq[s: s + chunk]])
        parts.append(model(ids, **cache_kwargs(model, cache), use_cache=True).logits[0].float())
    return float((full - torch.cat(parts)).abs().max())


def test_int8_models_generate(int8_pair):
    target, drafter = int8_pair
    assert _is_int8(target) and _is_int8(drafter)
    assert target.specdec_quantization == "int8" and not target.training
    n_new = 10
    refs = [hf_greedy(target, p, n_new) for p in PROMPTS]
    for d in (drafter, "ngram"):
        result = SpeculativeGenerator(target, d, num_draft_tokens=3).generate(PROMPTS, max_new_tokens=n_new,
                                                                               eos_token_id=None)
        assert all(len(s) == n_new for s in result.sequences)
        for prompt, got, ref in zip(PROMPTS, result.sequences, refs):
            if got == ref:
                continue
            # a mismatch is acceptable only at a logit near-tie of the int8 target, measured here
            i = next(j for j, (a, b) in enumerate(zip(got, ref)) if a != b)
            prefix = prompt + ref[:i]
            with torch.no_grad():
                top = target(torch.tensor([prefix])).logits[0, -1].float().topk(2).values
            margin = float(top[0] - top[1])
            noise = max(_int8_noise(target, prefix, c) for c in (1, 2, 4))
            assert margin <= 2 * noise, (f"prompt {prompt}: token {i} differs ({got[i]} vs {ref[i]}) with a top-2 "
                                         f"margin {margin:.4g} above twice the int8 noise {noise:.4g}")


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    try:
        model = load_model(None, quantization="none", device="cpu")
    except ModelLoadError as error:
        pytest.skip(str(error))
    return model, load_tokenizer(None)


def test_smollm2_gguf_cached(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert len(tokenizer) == 49152
    assert any(cache_dir().glob("SmolLM2-135M-Instruct*/model.safetensors"))


def test_smollm2_greedy_exact(smollm2):
    model, tokenizer = smollm2
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Repeat this text: the cat sat on the mat, and the dog sat on the log."}],
        add_generation_prompt=True, tokenize=False)
    texts = [chat, "def add(a, b):\n    return a + b\n\ndef sub(a, b):", "The capital of France is"]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    n_new = 12
    refs = [hf_greedy(model, p, n_new) for p in prompts]
    for drafter in ("ngram", "early-exit"):
        # fixed width: the adaptive policy's widths follow measured costs, which vary by machine
        gen = SpeculativeGenerator(model, drafter, tokenizer, early_exit_layers=8, num_draft_tokens=4,
                                   adaptive=False)
        result = gen.generate(prompts, max_new_tokens=n_new, eos_token_id=None)
        assert result.sequences == refs, drafter
        if drafter == "ngram":  # the copy prompt is input-grounded: prompt lookup must get drafts accepted
            assert result.stats.accepted_tokens > 0
    # the adaptive width with fixed costs (a forward over n tokens as the CPU prior has it): widths
    # follow the inputs only, so the run and its statistics are the same on any machine
    policy = DraftLengthPolicy("cpu", forward_cost="prior")
    gen = SpeculativeGenerator(model, "ngram", tokenizer, num_draft_tokens=8, policy=policy)
    result = gen.generate(prompts, max_new_tokens=n_new, eos_token_id=None)
    assert result.sequences == refs
    again = SpeculativeGenerator(model, "ngram", tokenizer, num_draft_tokens=8,
                                 policy=DraftLengthPolicy("cpu", forward_cost="prior"))
    assert again.generate(prompts, max_new_tokens=n_new, eos_token_id=None).stats.drafted_per_position == \
        result.stats.drafted_per_position


def test_silent_hub_counts_as_unreachable_after_the_timeout(monkeypatch):
    """An endpoint that accepts the connection and never answers: the check gives up after
    SPECDEC_HUB_TIMEOUT seconds, once per process, instead of the hub client's minute of retries."""
    import socket
    import time

    import specdec.models as models

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)  # the kernel completes the handshake; nobody reads or answers
    try:
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        monkeypatch.setenv("SPECDEC_HUB_TIMEOUT", "0.5")
        monkeypatch.setattr(models, "_HUB_CHECKED", {})
        start = time.perf_counter()
        why = models._hub_unavailable()
        assert why is not None and endpoint in why
        assert time.perf_counter() - start < 3
        start = time.perf_counter()
        assert models._hub_unavailable() == why and time.perf_counter() - start < 0.1  # remembered
    finally:
        server.close()
