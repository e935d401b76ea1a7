"""The seeding contract: random numbers keyed by (row seed, token index), never by the step.

Op level: ``verify`` without draft probabilities is "sample and compare": every emitted token is
what ``sample`` draws at offset + position. Generator level: a seeded sampled row's text with a
deterministic drafter is the text of plain sampling, whatever K, the width policy, the batch or the
call; with a sampling model drafter it is reproducible for a fixed seed and K.
"""
import dataclasses

import pytest
import torch

import specdec
from specdec import ops
from specdec.drafters import ModelDrafter
from specdec.generator import SpeculativeGenerator
from _tiny_models import PROMPTS, tiny_model


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_verify_without_probs_emits_the_targets_own_samples(backend, top_p):
    from conftest import device_for

    dev = device_for(backend)
    g = torch.Generator().manual_seed(11)
    B, K, V = 6, 4, 111
    logits = (torch.randn(B, K + 1, V, generator=g) * 1.5).to(dev)
    seed = torch.randint(0, 2**62, (B,), generator=g).to(dev)
    offset = torch.randint(0, 2**40, (B,), generator=g).to(dev)
    temperature = torch.tensor([0.8, 1.0, 0.0, 1.3, 0.6, 1.0], device=dev)
    # the target's own token at every position: sample() with counter offset + position
    own = torch.stack([ops.sample(logits[:, j], temperature=temperature, top_p=top_p, seed=seed,
                                  offset=offset + j, backend=backend)[0] for j in range(K + 1)], 1)
    # drafts that agree with those samples for a row-dependent number of positions, then differ
    agree = torch.tensor([0, 1, 2, 4, 3, 4], device=dev)
    drafts = torch.where(torch.arange(K, device=dev)[None] < agree[:, None], own[:, :K], (own[:, :K] + 1) % V)
    drafts[5, 2:] = -1  # a ragged row: its bonus token is the own sample at position 2
    out, n = ops.verify(logits, drafts, None, temperature=temperature, top_p=top_p, seed=seed, offset=offset,
                        backend=backend)
    expected_n = torch.tensor([0, 1, 2, 4, 3, 2], device=dev)
    assert n.long().tolist() == expected_n.tolist()
    for b in range(B):
        s = int(expected_n[b])
        assert out[b, : s + 1].tolist() == own[b, : s + 1].tolist(), b
        assert (out[b, s + 1:] == -1).all()


def test_verify_offset_keys_positions(backend):
    """Position j of a call at offset o draws what position 0 of a call at offset o + j draws."""
    from conftest import device_for

    dev = device_for(backend)
    g = torch.Generator().manual_seed(5)
    B, K, V = 4, 3, 300
    logits = torch.randn(B, K + 1, V, generator=g).to(dev)
    drafts = torch.full((B, K), -1, dtype=torch.int64, device=dev)
    seed = torch.tensor([1, 2, 3, 4], device=dev)
    whole = [ops.verify(logits[:, j: j + 1], drafts[:, :0], None, temperature=1.0, seed=seed, offset=9 + j,
                        backend=backend)[0][:, 0] for j in range(K + 1)]
    for j in range(K + 1):
        want = ops.sample(logits[:, j], temperature=1.0, seed=seed, offset=9 + j, backend=backend)[0]
        assert whole[j].tolist() == want.tolist()
    # and a different offset draws (almost surely) different tokens somewhere
    other = ops.verify(logits[:, :1], drafts[:, :0], None, temperature=1.0, seed=seed, offset=1234,
                       backend=backend)[0][:, 0]
    assert other.tolist() != whole[0].tolist()


class ArgmaxDrafter(ModelDrafter):
    """A deterministic model drafter: the drafter model's argmax, no draft probabilities."""

    def _sample(self, logits, state, offset):
        return logits.argmax(dim=-1), None

    def propose_tree(self, state, max_nodes):  # the drafter's greedy top-k tree, no probabilities
        return super().propose_tree(dataclasses.replace(state, temperature=0.0), max_nodes)


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", seed=0, layers=2, initializer_range=0.3)


def _gen(target, drafter, **kw):
    return SpeculativeGenerator(target, drafter, **kw)


PROMPTS8 = (PROMPTS * 2)[:8]
SEEDS8 = [101, 202, 303, 404, 505, 606, 707, 808]
OPTS = dict(max_new_tokens=14, temperature=0.5, top_p=0.95, eos_token_id=None)


@pytest.mark.usefixtures("one_thread")
def test_deterministic_drafter_text_is_plain_sampling_text(target):
    plain = _gen(target, None).generate(PROMPTS8, seed=SEEDS8, **OPTS).sequences
    assert len({tuple(s) for s in plain}) > 4  # sampled: rows differ
    runs = {
        "ngram K=2": _gen(target, "ngram", num_draft_tokens=2, adaptive=False),
        "ngram K=10": _gen(target, "ngram", num_draft_tokens=10, adaptive=False),
        "ngram adaptive": _gen(target, "ngram", num_draft_tokens=10, adaptive=True),
        # random tiny models rarely repeat themselves: an argmax drafter gets drafts accepted
        "argmax K=3": _gen(target, ArgmaxDrafter(target), num_draft_tokens=3, adaptive=False),
        "argmax adaptive": _gen(target, ArgmaxDrafter(target), num_draft_tokens=6, adaptive=True),
        "argmax chain": _gen(target, ArgmaxDrafter(target), num_draft_tokens=3, adaptive=False, tree=False),
    }
    for name, gen in runs.items():
        result = gen.generate(PROMPTS8, seed=SEEDS8, **OPTS)
        assert result.sequences == plain, name
        if name == "argmax K=3":  # the drafts (trees) really were tried: some accepted, some rejected
            assert result.stats.tree_steps > 0, name
            assert 0 < result.stats.accepted_tokens < result.stats.drafted_tokens, name
    # another order, one row at a time: each prompt keeps its seed, so its text
    gen = runs["ngram adaptive"]
    order = [5, 2, 7, 0, 3, 6, 1, 4]
    alone = gen.generate([PROMPTS8[i] for i in order], seed=[SEEDS8[i] for i in order], batch_size=1, **OPTS)
    assert alone.sequences == [plain[i] for i in order]
    # two calls in a row on one generator (the policy has learnt in between)
    assert gen.generate(PROMPTS8, seed=SEEDS8, **OPTS).sequences == plain
    # an int seed is row_seeds(seed, n)
    by_int = gen.generate(PROMPTS8, seed=7, **OPTS).sequences
    assert by_int == _gen(target, None).generate(PROMPTS8, seed=ops.row_seeds(7, 8).tolist(), **OPTS).sequences
    assert by_int != plain


@pytest.mark.usefixtures("one_thread")
def test_model_drafter_text_is_reproducible_for_a_fixed_k(target):
    small = tiny_model("llama", seed=7, layers=1, hidden_size=32, initializer_range=0.1)
    gen = _gen(target, small, num_draft_tokens=3, adaptive=False)
    first = gen.generate(PROMPTS8, seed=SEEDS8, **OPTS)
    assert first.stats.accepted_tokens > 0
    assert gen.generate(PROMPTS8, seed=SEEDS8, **OPTS).sequences == first.sequences
    order = [3, 1, 6, 0, 7, 2, 5, 4]
    alone = gen.generate([PROMPTS8[i] for i in order], seed=[SEEDS8[i] for i in order], batch_size=1, **OPTS)
    assert alone.sequences == [first.sequences[i] for i in order]


def test_seed_list_is_checked(target):
    gen = _gen(target, None)
    with pytest.raises(ValueError, match="seed"):
        gen.generate(PROMPTS[:2], seed=[1], max_new_tokens=2)
    with pytest.raises(ValueError, match="seed"):
        gen.generate(PROMPTS[:2], seed=[1, 2.5], max_new_tokens=2)
    with pytest.raises(TypeError, match="seed"):
        gen.generate(PROMPTS[:2], seed="1", max_new_tokens=2)


def test_public_sample_matches_generation_without_drafter(target):
    """Plain sampling through the generator is the ``sample`` op at offset = token index."""
    prompt = PROMPTS[0]
    res = _gen(target, None).generate([prompt], seed=[42], **OPTS).sequences[0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(OPTS["max_new_tokens"]):
            logits = target(torch.tensor([ids])).logits[:, -1]
            tok, _ = specdec.sample(logits, temperature=OPTS["temperature"], top_p=OPTS["top_p"], seed=42,
                                    offset=len(ids))
            ids.append(int(tok[0]))
    assert ids[len(prompt):] == res
