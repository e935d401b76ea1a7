"""ChatSession: multi-turn answers equal a fresh generate of the whole conversation, and earlier turns
stay in the kept target cache instead of being prefilled again."""
import pytest

from specdec import ops
from specdec.chat import ChatSession
from specdec.generator import SpeculativeGenerator
from _tiny_models import chat_tokenizer, hf_greedy, min_greedy_margin, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

N_NEW = 12
TURNS = ["w1 w2 w3 w1 w2 w3", "w4 w5 w6", "w1 w2 w7"]


@pytest.fixture(scope="module")
def models():
    # seed 0: greedy answers use only plain words (no <s>/<unk>, which decoding drops), so the
    # re-rendered conversation tokenizes to the ids the model produced and every turn is reused
    return tiny_model("llama", seed=0, layers=2), tiny_model("llama", seed=100, layers=1, hidden_size=32)


def _record_forwards(model):
    """(first position, input ids) of every forward of ``model``."""
    calls = []

    def hook(module, args, kwargs):
        if "position_ids" in kwargs:  # (the reference forwards below may pass none)
            calls.append((int(kwargs["position_ids"][0, 0]), kwargs["input_ids"][0].tolist()))

    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("kind", ["ngram", "none", "early-exit", "model"])
def test_greedy_turns_equal_generate_and_reuse_the_cache(models, kind):
    target, small = models
    drafter = {"ngram": "ngram", "none": None, "early-exit": "early-exit", "model": small}[kind]
    tok = chat_tokenizer()
    gen = SpeculativeGenerator(target, drafter, tok, num_draft_tokens=3, early_exit_layers=1)
    session = ChatSession(gen, system="w9 w9", max_new_tokens=N_NEW)
    calls, handle = _record_forwards(target)
    cached = 0  # tokens of the conversation so far that the target has seen
    try:
        for text in TURNS:
            ids = session.token_ids(text)
            calls.clear()
            answer = session.send(text)
            first_position, first_ids = calls[0]
            seq = session.last_result.sequences[0]
            # exact: the same tokens as a fresh generate (and the target's own greedy) of the whole input
            ref = gen.generate([ids], max_new_tokens=N_NEW).sequences[0]
            assert seq == ref == hf_greedy(target, ids, N_NEW, eos_token_id=2)
            assert min_greedy_margin(target, [ids], [seq]) > 1e-3
            assert answer == tok.decode(seq, skip_special_tokens=True)
            # cached: the first forward starts where the earlier turns end and feeds only the new tokens
            assert session.last_reused == cached and session.last_prefilled == len(ids) - cached
            assert first_position == cached
            assert first_ids[: len(ids) - cached] == ids[cached:]
            assert len(first_ids) - (len(ids) - cached) <= 3  # then at most K drafts
            cached = len(ids) + len(seq) - 1  # all but the last answer token (the pending one) is cached
    finally:
        handle.remove()
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * len(TURNS)


def test_rewritten_history_is_prefilled_again_from_the_difference(models):
    """Where the rendered conversation differs from the cached tokens (here: an edited answer; also a
    template that re-renders earlier turns, or an answer that tokenizes differently), the cache rolls
    back to the common prefix and the rest is prefilled: still exact."""
    target, _ = models
    gen = SpeculativeGenerator(target, "ngram", chat_tokenizer(), num_draft_tokens=3)
    session = ChatSession(gen, max_new_tokens=N_NEW)
    first = session.token_ids(TURNS[0])
    session.send(TURNS[0])
    session.messages[1]["content"] = "w7 w7 w7"
    ids = session.token_ids(TURNS[1])
    session.send(TURNS[1])
    assert session.last_reused == len(first)  # the first prompt, up to where the answer begins
    assert session.last_result.sequences[0] == hf_greedy(target, ids, N_NEW, eos_token_id=2)


def test_interrupted_answer_keeps_its_tokens_and_the_next_turn_is_exact(models):
    target, _ = models
    tok = chat_tokenizer()
    gen = SpeculativeGenerator(target, "ngram", tok, num_draft_tokens=3)
    session = ChatSession(gen, max_new_tokens=N_NEW)
    session.send(TURNS[0])
    ids = session.token_ids(TURNS[1])
    chunks = []

    def stop_after_two(chunk):
        chunks.append(chunk.token_ids)
        if len(chunks) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        session.send(TURNS[1], callback=stop_after_two)
    emitted = sum(chunks, [])
    assert session.messages[-1] == {"role": "assistant", "content": tok.decode(emitted, skip_special_tokens=True)}
    assert session._kept.tokens == ids + emitted[:-1]
    assert session._kept.cache.get_seq_length() == len(ids) + len(emitted) - 1
    ids3 = session.token_ids(TURNS[2])
    session.send(TURNS[2])
    assert session.last_result.sequences[0] == hf_greedy(target, ids3, N_NEW, eos_token_id=2)
    assert session.last_reused == len(ids) + len(emitted) - 1


def test_sampled_turn_equals_generate_with_its_seed(models):
    """Sampling: with a fixed draft width a turn's tokens depend only on its input and seed, so the
    cached path gives exactly what generate gives for the whole conversation."""
    target, _ = models
    gen = SpeculativeGenerator(target, "ngram", chat_tokenizer(), num_draft_tokens=3, adaptive=False)
    opts = dict(max_new_tokens=N_NEW, temperature=0.8, top_p=0.9)
    session = ChatSession(gen, seed=7, **opts)
    session.send(TURNS[0])
    ids = session.token_ids(TURNS[1])
    session.send(TURNS[1])
    assert session.last_reused > 0
    seed = int(ops.row_seeds(7, 1, first_row=1)[0])  # the seed the session derives for its second turn
    assert session.last_result.sequences[0] == gen.generate([ids], seed=seed, **opts).sequences[0]
    again = ChatSession(gen, seed=7, **opts)
    assert [again.send(t) for t in TURNS[:2]] == [m["content"] for m in session.messages[1::2]]


def test_reset_and_bad_arguments(models):
    target, _ = models
    gen = SpeculativeGenerator(target, None, chat_tokenizer())
    session = ChatSession(gen, system="w9", max_new_tokens=4)
    a = session.send(TURNS[0])
    session.reset()
    assert session.messages == []
    assert session.send(TURNS[0]) == a  # greedy: the same answer to the same conversation
    assert session.last_reused > 0  # the system prompt and the first message came from the cache
    with pytest.raises(TypeError, match="unknown option"):
        ChatSession(gen, max_tokens=3)
    from _tiny_models import word_tokenizer

    with pytest.raises(ValueError, match="chat template"):
        ChatSession(SpeculativeGenerator(target, None, word_tokenizer(["a"])))
    with pytest.raises(ValueError, match="proper prefix"):
        from specdec.generator import KeptCache

        kept = KeptCache()
        kept.tokens = [5, 6]
        gen._continue([5, 7, 8], kept)
