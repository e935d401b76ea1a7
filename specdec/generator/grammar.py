# Holds: Grammar (what generate(grammar=...) takes), _BatchGrammar (one
#        xgrammar GrammarMatcher per row: draft filtering, per-position masks, forced drafts, commits).
# May use: numpy, torch, xgrammar (imported on first use), specdec.drafters.base.
"""Grammar-constrained generation (structured output) on xgrammar.

Per step and row, the row's ``GrammarMatcher`` (which holds the emitted tokens) is

1. walked through the drafter's proposal: a chain is cut, a tree branch pruned, at the first token
   the grammar refuses (no forward is spent on a draft the mask would reject);
2. extended by the *grammar-forced* drafts (a chain step): while the mask allows exactly one id,
   that id (the target accepts it with probability 1 under the mask), and where xgrammar finds a
   forced continuation of several characters, its tokens (``find_jump_forward_tokens``: a likely
   tokenization, not a certain one); the n-gram drafter continues after them;
3. walked through the final drafts to fill the token bitmask of every verified position (a tree
   node: along its path), each walk rolled back;
4. after verification, advanced by the emitted tokens only. A row ends when its matcher terminates
   (it accepted a stop token, allowed only where the grammar is complete).

The target's distribution at a position is the target restricted to the allowed ids (temperature,
top-k and top-p apply after the mask), for drafting and plain decoding alike, so greedy output is
the same with or without drafts, and seeded sampled text too (module docstring of speculative.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Grammar:
    """A constraint on the generated text: ``Grammar.json_schema(schema)``, ``Grammar.json()`` (any
    JSON value), ``Grammar.regex(pattern)`` or ``Grammar.ebnf(text)`` (xgrammar's GBNF dialect, root
    rule ``root``). ``generate(grammar=...)`` also takes a schema dict, a schema string or ``"json"``.

    JSON schemas compile without free whitespace (compact JSON: ``{"a":1}``): outputs are shorter
    and more of their tokens are forced by the grammar.
    """

    kind: str  # "json_schema", "json", "regex" or "ebnf"
    source: str = ""

    KINDS = ("json_schema", "json", "regex", "ebnf")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise ValueError(f"Grammar kind must be one of {self.KINDS}, got {self.kind!r}")
        if not isinstance(self.source, str):
            raise TypeError(f"Grammar source must be a string, got {type(self.source).__name__}")

    @classmethod
    def json_schema(cls, schema) -> "Grammar":
        if isinstance(schema, dict):
            return cls("json_schema", json.dumps(schema))
        if isinstance(schema, str):
            try:
                parsed = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"JSON schema text does not parse: {e}") from None
            if not isinstance(parsed, (dict, bool)):
                raise ValueError("a JSON schema must be an object")
            return cls("json_schema", schema)
        raise TypeError(f"a JSON schema is a dict or a string, got {type(schema).__name__}")

    @classmethod
    def json(cls) -> "Grammar":
        return cls("json")

    @classmethod
    def regex(cls, pattern: str) -> "Grammar":
        return cls("regex", pattern)

    @classmethod
    def ebnf(cls, text: str) -> "Grammar":
        return cls("ebnf", text)

    @classmethod
    def of(cls, spec) -> "Grammar":
        """A Grammar from what ``generate(grammar=...)`` accepts for one prompt."""
        if isinstance(spec, Grammar):
            return spec
        if isinstance(spec, dict):
            return cls.json_schema(spec)
        if isinstance(spec, str):
            if spec == "json":
                return cls.json()
            try:
                return cls.json_schema(spec)
            except ValueError:
                raise ValueError("grammar strings are 'json' or a JSON schema; for a regex or EBNF pass "
                                 "Grammar.regex(...) / Grammar.ebnf(...)") from None
        raise TypeError(f"grammar must be a Grammar, a JSON schema (dict or str) or 'json', got {type(spec).__name__}")


def grammars_for(spec, n: int) -> list:
    """``generate``'s ``grammar`` argument as n Grammars (or None when there is none)."""
    if spec is None:
        return None
    if isinstance(spec, (list, tuple)):
        if len(spec) != n:
            raise ValueError(f"grammar: a list needs one entry per prompt ({n}), got {len(spec)}")
        return [Grammar.of(s) for s in spec]
    one = Grammar.of(spec)
    return [one] * n


class GrammarCompiler:
    """xgrammar's compiler for one tokenizer and one logits width (the target's head), with the
    compiled grammars cached."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list):
        import xgrammar as xgr

        if tokenizer is None:
            raise ValueError("grammar= needs the target's tokenizer: SpeculativeGenerator(..., tokenizer=...)")
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=list(stop_token_ids) or None)
        self.compiler = xgr.GrammarCompiler(info)
        self.vocab_size, self.stop = vocab_size, tuple(stop_token_ids)
        self.cache = {}

    def compile(self, grammar: Grammar):
        key = (grammar.kind, grammar.source)
        if key not in self.cache:
            c = self.compiler
            try:
                if grammar.kind == "json_schema":
                    out = c.compile_json_schema(grammar.source, any_whitespace=False)
                elif grammar.kind == "json":
                    out = c.compile_builtin_json_grammar()
                elif grammar.kind == "regex":
                    out = c.compile_regex(grammar.source)
                else:
                    out = c.compile_grammar(grammar.source)
            except RuntimeError as e:  # xgrammar reports bad schemas, regexes and grammars so
                raise ValueError(f"invalid {grammar.kind} grammar: {e}") from None
            self.cache[key] = out
        return self.cache[key]


class _BatchGrammar:
    """One GrammarMatcher per live row of a batch; host work only."""

    def __init__(self, compiled: list, vocab_size: int, device):
        import xgrammar as xgr

        self.matchers = [xgr.GrammarMatcher(c) for c in compiled]
        self.stop = [set(m.stop_token_ids) for m in self.matchers]
        self.V, self.W, self.device = vocab_size, (vocab_size + 31) // 32, device
        self._one = torch.zeros(1, self.W, dtype=torch.int32)  # a scratch mask for forced drafts

    def select(self, keep) -> None:
        self.matchers = [self.matchers[b] for b in keep]
        self.stop = [self.stop[b] for b in keep]

    # -- drafts ----------------------------------------------------------------------------------

    def _walk(self, b: int, tokens) -> int:
        """How many leading ``tokens`` row b's grammar accepts (stop tokens never: they end the row,
        and the target emits them itself); the matcher is left as it was."""
        m, n = self.matchers[b], 0
        for t in tokens:
            t = int(t)
            if t < 0 or t in self.stop[b] or not m.accept_token(t):
                break
            n += 1
        if n:
            m.rollback(n)
        return n

    def cut_chain(self, host: np.ndarray, num: np.ndarray) -> np.ndarray:
        """[B] the allowed length of each row's chain ``host[b, :num[b]]``."""
        return np.array([self._walk(b, host[b, : num[b]]) for b in range(len(self.matchers))], dtype=np.int64)

    def tree_allowed(self, tokens: np.ndarray, parents: np.ndarray) -> np.ndarray:
        """[B, N] bool: the used nodes whose whole path the grammar accepts (closed under parents)."""
        ok = np.zeros(tokens.shape, dtype=bool)
        for b in range(tokens.shape[0]):
            for i, path in _paths(tokens[b], parents[b]):
                p = parents[b, i]
                if (p < 0 or ok[b, p]) and self._walk(b, path) == len(path):
                    ok[b, i] = True
        return ok

    def forced(self, b: int, budget: int) -> tuple[list, int]:
        """Row b's grammar-forced drafts (at most ``budget``): ids that are the only allowed one, and
        xgrammar's jump-forward tokens where a longer continuation is forced; and how many of them,
        from the first, are the only allowed id (certain to be accepted under the mask)."""
        m, out, certain = self.matchers[b], [], None
        while len(out) < budget and not m.is_terminated():
            m.fill_next_token_bitmask(self._one, 0)
            only = _single_id(self._one[0].numpy())
            if only is not None:
                if only in self.stop[b] or only >= self.V or not m.accept_token(only):
                    break
                out.append(only)
                continue
            certain = len(out) if certain is None else certain
            jump = [t for t in m.find_jump_forward_tokens() if t not in self.stop[b]][: budget - len(out)]
            n = 0
            for t in jump:
                if not m.accept_token(t):
                    break
                n += 1
            out.extend(jump[:n])
            if n == 0:
                break
        if out:
            m.rollback(len(out))
        return out, len(out) if certain is None else certain

    # -- masks -----------------------------------------------------------------------------------

    def chain_masks(self, host: np.ndarray) -> torch.Tensor:
        """[B, K+1, W] int32 on the device: the mask at the pending token and after each draft of the
        chains ``host`` [B, K] (-1 tail; every draft already accepted by ``cut_chain``)."""
        B, K = host.shape
        masks = torch.full((B, K + 1, self.W), -1, dtype=torch.int32)
        for b in range(B):
            m, n = self.matchers[b], 0
            m.fill_next_token_bitmask(masks[b], 0)
            for j in range(K):
                if host[b, j] < 0 or not m.accept_token(int(host[b, j])):
                    break
                n += 1
                m.fill_next_token_bitmask(masks[b], j + 1)
            if n:
                m.rollback(n)
        return masks.to(self.device, non_blocking=True)

    def tree_masks(self, tokens: np.ndarray, parents: np.ndarray) -> torch.Tensor:
        """[B, N+1, W] int32 on the device: the mask at the root (pending token) and after each node."""
        B, N = tokens.shape
        masks = torch.full((B, N + 1, self.W), -1, dtype=torch.int32)
        for b in range(B):
            m = self.matchers[b]
            m.fill_next_token_bitmask(masks[b], 0)
            for i, path in _paths(tokens[b], parents[b]):
                n = 0
                for t in path:
                    if not m.accept_token(int(t)):
                        break
                    n += 1
                if n == len(path):
                    m.fill_next_token_bitmask(masks[b], i + 1)
                if n:
                    m.rollback(n)
        return masks.to(self.device, non_blocking=True)

    # -- commit ----------------------------------------------------------------------------------

    def advance(self, b: int, tokens) -> bool:
        """Feed row b's emitted tokens to its matcher; True when the grammar terminated (a stop token
        was accepted where the grammar is complete)."""
        m = self.matchers[b]
        for t in tokens:
            if not m.accept_token(int(t)):  # the mask allowed it: a refusal is a bug, never silent
                raise RuntimeError(f"grammar: the emitted token {int(t)} is not allowed by the row's grammar")
        return m.is_terminated()


def _paths(tokens: np.ndarray, parents: np.ndarray):
    """(node, token path from the root's first child to the node) for the used nodes of one row."""
    paths = {}
    for i in range(tokens.shape[0]):
        if tokens[i] < 0:
            continue
        p = int(parents[i])
        paths[i] = (paths.get(p, []) if p >= 0 else []) + [int(tokens[i])]
        yield i, paths[i]


def _single_id(words: np.ndarray):
    """The id when exactly one bit of the int32 mask ``words`` is set, else None."""
    nz = np.flatnonzero(words)
    if nz.size != 1:
        return None
    w = int(words[nz[0]]) & 0xFFFFFFFF
    if w & (w - 1):
        return None
    return int(nz[0]) * 32 + w.bit_length() - 1
