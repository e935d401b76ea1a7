# Holds: ChatSession: multi-turn chat over a SpeculativeGenerator, the target's cache kept between turns.
# May use: torch, specdec.ops, specdec.generator.
"""Multi-turn chat over a :class:`SpeculativeGenerator`, the target's KV cache kept between turns.

    session = specdec.ChatSession(gen, system="You are terse.", max_new_tokens=128)
    session.send("Name a prime.", callback=lambda chunk: print(chunk.token_ids))  # -> the answer's text
    session.send("And the next one?")      # prefills only this turn's new tokens
    session.reset()                        # a new conversation (the system prompt's cache is reused)

Every turn renders the whole conversation through the tokenizer's chat template (what the model
was trained on) and tokenizes it. The cache holds the tokens of the conversation so far; the new
turn's tokens are the suffix beyond the longest common prefix of the two, so normally only the
closing of the last answer and the new user message are prefilled. Where a template re-renders
earlier turns differently (some drop the reasoning of earlier answers, and an answer's text may
tokenize differently from the ids the model produced), the cache is rolled back (O(1)) to the common
prefix and the rest is prefilled again: correct, and only as costly as the difference.

Greedy answers equal what ``generator.generate`` gives for the whole conversation's token ids.
"""
from __future__ import annotations

from typing import Callable

import torch

from specdec.generator import Chunk, GenerationResult, KeptCache, SpeculativeGenerator

_GENERATE_OPTIONS = ("max_new_tokens", "temperature", "top_k", "top_p", "num_draft_tokens", "adaptive",
                     "eos_token_id")


class ChatSession:
    """A conversation with ``generator`` (which needs a tokenizer with a chat template).

    Args:
        generator: a :class:`SpeculativeGenerator` with a tokenizer.
        system: an optional system message, rendered before every conversation.
        seed: sampling seed of the session (each turn derives its own); None draws one.
        **sampling: options passed to ``generate`` every turn: ``max_new_tokens`` (default 256),
            ``temperature``, ``top_k``, ``top_p``, ``num_draft_tokens``, ``adaptive``, ``eos_token_id``.
    Attributes:
        messages: the turns so far, ``[{"role": "user"|"assistant", "content": ...}]`` (no system).
        last_result: the :class:`GenerationResult` of the last finished turn (stats included).
        last_reused, last_prefilled: tokens of the last turn's input found in the cache, and fed anew.
    """

    def __init__(self, generator: SpeculativeGenerator, system: str | None = None, *, seed: int | None = None,
                 **sampling):
        tokenizer = generator.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("ChatSession needs a generator whose tokenizer has a chat template")
        unknown = sorted(set(sampling) - set(_GENERATE_OPTIONS))
        if unknown:
            raise TypeError(f"ChatSession: unknown option(s) {', '.join(unknown)}; "
                            f"choose from {', '.join(_GENERATE_OPTIONS)}")
        self.generator, self.tokenizer, self.system = generator, tokenizer, system
        self.sampling = {"max_new_tokens": 256, **sampling}
        self.seed = int(torch.randint(0, 2**62, (1,))) if seed is None else int(seed)
        self.messages: list = []
        self.turns = 0  # answers generated, interrupted ones included: each gets its own seed
        self.last_result: GenerationResult | None = None
        self.last_reused = self.last_prefilled = 0
        self._kept = KeptCache()

    def conversation(self, user_text: str | None = None) -> list:
        """The messages the template renders: the system message, the turns, ``user_text`` if given."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        out += self.messages
        if user_text is not None:
            out.append({"role": "user", "content": user_text})
        return out

    def token_ids(self, user_text: str) -> list:
        """The input of the next turn: the whole conversation plus ``user_text``, templated, tokenized."""
        text = self.tokenizer.apply_chat_template(self.conversation(user_text), add_generation_prompt=True,
                                                  tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def send(self, user_text: str, callback: Callable[[Chunk], None] | None = None) -> str:
        """Answer ``user_text``, streaming each step's :class:`Chunk` to ``callback``; returns the text.

        On KeyboardInterrupt the answer so far (if any) joins the conversation, the cache keeps what
        the finished steps produced, and the interrupt propagates: the next ``send`` goes on from there.
        """
        from specdec import ops

        ids = self.token_ids(user_text)
        kept = self._kept
        common = 0
        limit = min(len(kept.tokens), len(ids) - 1)  # at least one token goes through the first forward
        while common < limit and kept.tokens[common] == ids[common]:
            common += 1
        # normally all of kept.tokens; less where the template re-rendered earlier turns differently
        kept.truncate(common)
        self.last_reused, self.last_prefilled = common, len(ids) - common
        seed = int(ops.row_seeds(self.seed, 1, first_row=self.turns)[0])  # a new stream every turn
        emitted = []

        def collect(chunk: Chunk) -> None:
            emitted.extend(chunk.token_ids)
            if callback is not None:
                callback(chunk)

        try:
            result = self.generator._continue(ids, kept, callback=collect, seed=seed, **self.sampling)
        except KeyboardInterrupt:
            if emitted:
                self.turns += 1
                self._record(user_text, self.tokenizer.decode(emitted, skip_special_tokens=True))
            raise
        self.turns += 1
        self.last_result = result
        answer = result.texts[0]
        self._record(user_text, answer)
        return answer

    def _record(self, user_text: str, answer: str) -> None:
        self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]

    def reset(self) -> None:
        """Forget the conversation. The cache stays: the next turn reuses its common prefix with the
        new conversation (the system prompt) and overwrites the rest."""
        self.messages = []
