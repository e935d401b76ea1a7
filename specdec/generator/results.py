# Holds: what generation hands back: Chunk (streamed per row and step), GenerationStats, GenerationResult.
# May use: numpy and the standard library.
"""Results of generation: streamed chunks, counters, and the final result."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np


class Chunk(NamedTuple):
    """What one step emitted for one row, passed to the streaming callback.

    ``token_ids[:num_accepted]`` are accepted drafts; the last id is the target's own token
    (``is_bonus``: no draft was rejected where it was drawn, i.e. every draft of a chain was
    accepted, or a tree's accepted path ended at a leaf; else a resample after a rejection).
    ``num_drafted``: the row's drafts this step (a tree's nodes). ``row`` is the prompt's index in
    the caller's list.
    """

    row: int
    token_ids: list
    num_accepted: int
    num_drafted: int
    finished: bool
    leaf: bool | None = None  # tree steps: the accepted path ended at a node without children
    logprobs: list | None = None  # generate(logprobs=True): (processed, raw) per token of token_ids

    @property
    def is_bonus(self) -> bool:
        if self.leaf is not None:
            return self.leaf
        return self.num_accepted == self.num_drafted


@dataclass
class GenerationStats:
    """Counters of one ``generate`` call. Times in seconds, measured after device synchronisation."""

    num_sequences: int = 0
    generated_tokens: int = 0  # tokens emitted (EOS included), not characters
    target_steps: int = 0  # batched target forwards, the prefill included (it verifies drafts and emits too)
    row_steps: int = 0  # sum over target steps of the live rows
    drafted_tokens: int = 0  # draft positions: a tree counts its deepest path (acceptance = accepted / this)
    accepted_tokens: int = 0
    draft_nodes: int = 0  # tokens drafted and sent through the target: a tree's nodes, a chain's drafts
    tree_steps: int = 0  # target steps that verified trees
    drafted_per_position: list = field(default_factory=list)  # [i]: drafts at position i
    accepted_per_position: list = field(default_factory=list)  # [i]: of those, accepted
    prefill_time: float = 0.0  # the first forward (prompts + drafts from them) and its verification
    target_time: float = 0.0  # the later target forwards + verification
    drafter_time: float = 0.0  # drafter prefill + proposals + rollbacks
    total_time: float = 0.0
    drafter: str = ""

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens a row gains per target forward, the prefill included (1.0 = plain decoding)."""
        return self.generated_tokens / self.row_steps if self.row_steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.total_time if self.total_time > 0 else 0.0

    @property
    def position_acceptance(self) -> list:
        """Acceptance rate at draft position i (given the draft reached position i)."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_position, self.drafted_per_position)]

    def _count_positions(self, drafted: np.ndarray, accepted: np.ndarray) -> None:
        width = int(drafted.max()) if drafted.size else 0
        if width > len(self.drafted_per_position):
            grow = width - len(self.drafted_per_position)
            self.drafted_per_position += [0] * grow
            self.accepted_per_position += [0] * grow
        for i in range(width):
            self.drafted_per_position[i] += int((drafted > i).sum())
            self.accepted_per_position[i] += int((accepted > i).sum())

    def merge(self, other: "GenerationStats") -> None:
        for name in ("num_sequences", "generated_tokens", "target_steps", "row_steps", "drafted_tokens",
                     "accepted_tokens", "draft_nodes", "tree_steps", "prefill_time", "target_time", "drafter_time", "total_time"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        n = max(len(self.drafted_per_position), len(other.drafted_per_position))
        pad = lambda xs: xs + [0] * (n - len(xs))  # noqa: E731
        self.drafted_per_position = [a + b for a, b in zip(pad(self.drafted_per_position), pad(other.drafted_per_position))]
        self.accepted_per_position = [a + b for a, b in zip(pad(self.accepted_per_position), pad(other.accepted_per_position))]
        self.drafter = self.drafter or other.drafter

    def as_dict(self) -> dict:
        return {
            "drafter": self.drafter, "sequences": self.num_sequences, "generated_tokens": self.generated_tokens,
            "target_steps": self.target_steps, "tree_steps": self.tree_steps, "draft_nodes": self.draft_nodes,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "tokens_per_step": round(self.tokens_per_step, 3), "tokens_per_second": round(self.tokens_per_second, 2),
            "prefill_time_s": round(self.prefill_time, 4), "target_time_s": round(self.target_time, 4),
            "drafter_time_s": round(self.drafter_time, 4), "total_time_s": round(self.total_time, 4),
            "position_acceptance": [round(x, 3) for x in self.position_acceptance],
        }

    def summary(self) -> str:
        # counts next to rates: 1.00 from one draft is not 0.86 from fifty
        hist = " ".join(f"{a}/{d}" for a, d in zip(self.accepted_per_position[:16], self.drafted_per_position[:16]) if d)
        return (
            f"drafter {self.drafter or 'none'}: {self.generated_tokens} tokens in {self.total_time:.2f} s "
            f"= {self.tokens_per_second:.1f} tokens/s; acceptance {self.acceptance_rate:.1%} "
            f"({self.accepted_tokens}/{self.drafted_tokens}), {self.tokens_per_step:.2f} tokens per target step"
            + (f" ({self.tree_steps} tree steps, {self.draft_nodes} nodes)" if self.tree_steps else "") + "; "
            f"time: prefill {self.prefill_time:.2f} s, target {self.target_time:.2f} s, drafter {self.drafter_time:.2f} s"
            + (f"\naccepted/drafted by draft position: {hist}" if hist else "")
        )


@dataclass
class GenerationResult:
    """sequences[i]: the generated token ids of prompt i (EOS included when hit), in input order;
    prompt_ids[i]: its prompt ids; texts[i]: decoded ``sequences[i]`` when a tokenizer is known;
    finish_reasons[i]: "eos", "length" or "error" (the target produced no finite logit).
    With ``generate(logprobs=True)``: logprobs[i][j] is the log-probability of ``sequences[i][j]``
    under the target's distribution it was drawn from at that position (temperature, top-k, top-p
    applied; for a token drawn after a rejection still the target's value, not the residual's),
    raw_logprobs[i][j] under the raw logits (log-softmax at temperature 1); greedy: both raw."""

    sequences: list
    prompt_ids: list
    finish_reasons: list
    stats: GenerationStats
    texts: list | None = None
    logprobs: list | None = None
    raw_logprobs: list | None = None
