# Holds: SpeculativeGenerator, the entry point: arguments, prompts, seeds, batches; _continue for chat.
# May use: torch, specdec.ops, specdec.models, specdec.drafters, .step, .policy, .results.
"""Batched speculative generation over Hugging Face causal LMs: :class:`SpeculativeGenerator`.

One call of ``generate`` splits the prompts into batches and runs each through the step loop of
``step.py`` (draft, forward, verify, commit); ``policy.py`` picks the draft widths.

Exactness does not depend on the draft lengths: the drafts are chosen before the step's random
numbers are drawn, so greedy rows emit the target's greedy tokens and sampled rows the target's
distribution whatever the policy.

Seeding. Every random number is keyed by the row's seed and the absolute index of the token it
decides (``offset`` = the row's length, for the drafter's samples and for verification), never by
the step. With a deterministic drafter (n-gram / prompt lookup, or no drafter)
verification is "sample and compare": each emitted token is the target's own sample at its index,
so a seeded sampled row's text is exactly the text of plain sampling with that seed: the same with
or without a drafter, for any K, adaptive or not, in any batch and on every call. With a model
drafter that samples (draft probabilities, q) the distribution is exact and the text is reproducible
for a fixed seed and a fixed K (``adaptive=False``) in any batch; the width policy changes which
positions are drafted, hence the text (not its distribution). Rows compared across batches differ
only where batched arithmetic rounds a near-tie differently.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from specdec.drafters import DRAFTER_NAMES, make_drafter
from specdec.generator.policy import MAX_DRAFT_TOKENS, DraftLengthPolicy
from specdec.generator.results import Chunk, GenerationResult, GenerationStats
from specdec.generator.step import run_batch
from specdec.models import check_compatible, model_vocab_size

if TYPE_CHECKING:
    from specdec.generator.layouts import KeptCache


def encode_prompt(tokenizer, text: str, chat: bool | None = None) -> list:
    """Token ids of one text prompt. ``chat=None`` (default): wrapped as a user turn in the
    tokenizer's chat template when it has one (what instruct models expect; the CLI does the same),
    raw otherwise; ``chat=False``: raw completion; ``chat=True``: the template, or an error."""
    template = getattr(tokenizer, "chat_template", None)
    if chat is None:
        chat = bool(template)
    if chat:
        if not template:
            raise ValueError("chat=True, but the tokenizer has no chat template: pass chat=False")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


class SpeculativeGenerator:
    """Speculative decoding with an HF target and a drafter.

    Args:
        target: HF causal LM (fp32/fp16/bf16 or bitsandbytes int8), eval mode.
        drafter: an HF causal LM sharing the target's tokenizer (-> ModelDrafter), ``"ngram"``,
            ``"early-exit"``, a :class:`specdec.drafters.Drafter`, or None / ``"none"`` (plain
            decoding through the same loop).
        tokenizer: target tokenizer; needed for string prompts and decoded texts.
        drafter_tokenizer: when given, checked against ``tokenizer`` (IncompatibleModelsError).
        num_draft_tokens: K, the most drafts per row and step (default for n-gram: 32 = the cap when
            adaptive, 10 when not; 4 for model drafters).
        adaptive: pick each step's draft width in 0..K with :class:`DraftLengthPolicy` (default on);
            False: draft K every step.
        early_exit_layers: layers of the early-exit drafter (default a quarter of the target's).
        share_prefix: when a batch's prompts share their first tokens (a system prompt), prefill them
            once and copy their keys and values to every row (default on; not with drafters that read
            the target's cache, nor sliding-window attention).
        backend: implementation of the ops (``specdec.ops.verify``/``sample``): "auto", "cpp",
            "triton" or "reference".
        tree: verify a tree of drafts per row (``specdec.verify_tree``) instead of a chain, from the
            second step on: None (default) = when the drafter proposes trees (``supports_tree``).
        max_tree_nodes: node budget of a tree (default ``2 * num_draft_tokens``, 4..64).
        policy: the :class:`DraftLengthPolicy` (default: one that measures forward costs online);
            ``DraftLengthPolicy(forward_cost="prior")`` makes the widths, and so greedy statistics,
            independent of timing.
        narrow_linear: during ``generate``, route the float32 CPU ``nn.Linear`` layers of the target
            (and of a model drafter) through :func:`specdec.linear.narrow_linear`, which reads each
            weight once for the few tokens of a verification forward where MKL's sgemm costs about
            one matrix-vector product per token (default on; restored after each call; a no-op on
            GPU, for int8 layers, or without the C++ extension).
    """

    def __init__(self, target, drafter="ngram", tokenizer=None, *, drafter_tokenizer=None,
                 num_draft_tokens: int | None = None, adaptive: bool = True, early_exit_layers: int | None = None,
                 share_prefix: bool = True, backend: str = "auto", policy: "DraftLengthPolicy | None" = None,
                 tree: bool | None = None, max_tree_nodes: int | None = None, narrow_linear: bool = True):
        self.target = target
        self.narrow_linear = bool(narrow_linear)
        self.tokenizer = tokenizer
        self.vocab_size = model_vocab_size(target)
        if isinstance(drafter, torch.nn.Module):
            check_compatible(target, drafter, tokenizer, drafter_tokenizer)
        self.drafter = make_drafter(drafter, target, num_layers=early_exit_layers, vocab_size=self.vocab_size)
        if num_draft_tokens is None:
            ngram = type(self.drafter).__name__ == "NGramDrafter"
            # n-gram drafts cost nothing: adaptive, K is only a cap (the policy picks the nodes)
            num_draft_tokens = (MAX_DRAFT_TOKENS if adaptive else 10) if ngram else 4
        if not 0 <= num_draft_tokens <= MAX_DRAFT_TOKENS:
            raise ValueError(f"num_draft_tokens must be in 0..{MAX_DRAFT_TOKENS}, got {num_draft_tokens}")
        self.num_draft_tokens = num_draft_tokens
        self.adaptive = adaptive
        supports_tree = bool(getattr(self.drafter, "supports_tree", False))
        if tree and not supports_tree:
            raise ValueError(f"tree=True, but the {self.drafter_name} drafter does not propose trees")
        self.tree = supports_tree if tree is None else bool(tree)
        self._tree_auto = tree is None  # grammar-forced drafts then make chains (see generate's grammar_drafts)
        if max_tree_nodes is None:
            max_tree_nodes = min(64, max(4, 2 * num_draft_tokens))
        if not 1 <= max_tree_nodes <= 256:
            raise ValueError(f"max_tree_nodes must be in 1..256, got {max_tree_nodes}")
        self.max_tree_nodes = max_tree_nodes
        self.share_prefix = share_prefix
        self.device = _model_device(target)
        self.backend = backend
        # acceptance and forward-cost estimates, kept across generate calls
        self.policy = policy if policy is not None else DraftLengthPolicy(self.device.type)

    @classmethod
    def from_pretrained(cls, target: str | None = None, drafter="ngram", *, quantization: str = "auto",
                        device=None, **kwargs) -> "SpeculativeGenerator":
        """Load a target (default: the embedded SmolLM2-135M-Instruct) and its tokenizer, and a drafter:
        ``"ngram"`` (default, the fastest measured on CPU), ``"early-exit"``, ``"none"``, or a model
        name/path loaded with the same quantization (its tokenizer is checked against the target's)."""
        from specdec.models import check_model_name, load_model, load_tokenizer

        named_drafter = isinstance(drafter, str) and drafter.lower().replace("_", "-") not in DRAFTER_NAMES
        check_model_name(target, "target")  # both names before loading either: no wasted target load
        if named_drafter:
            check_model_name(drafter, "drafter")
        model = load_model(target, quantization=quantization, device=device)
        tokenizer = load_tokenizer(target)
        drafter_tokenizer = None
        if named_drafter:
            drafter_tokenizer = load_tokenizer(drafter)
            drafter = load_model(drafter, quantization=quantization, device=device)
        return cls(model, drafter, tokenizer, drafter_tokenizer=drafter_tokenizer, **kwargs)

    _kept = None  # set by _continue only, for its one generate call: a KeptCache

    def _tree_step(self, step: int) -> bool:
        """Whether this step drafts a tree: the first step (the prefill) always drafts a chain."""
        return self.tree and step > 0

    @property
    def drafter_name(self) -> str:
        if self.drafter is None:
            return "none"
        name = type(self.drafter).__name__
        return {"NGramDrafter": "ngram", "EarlyExitDrafter": "early-exit", "ModelDrafter": "model"}.get(name, name)

    # -- inputs --------------------------------------------------------------------------------

    def _prompt_ids(self, prompts, input_ids, attention_mask, chat=None) -> list:
        if prompts is not None and input_ids is not None:
            raise ValueError("pass either prompts or input_ids, not both")
        if prompts is not None:
            if isinstance(prompts, str):
                prompts = [prompts]
            rows = []
            for p in prompts:
                if isinstance(p, str):
                    if self.tokenizer is None:
                        raise ValueError("string prompts need a tokenizer: SpeculativeGenerator(..., tokenizer=...)")
                    rows.append(encode_prompt(self.tokenizer, p, chat))
                else:
                    rows.append([int(t) for t in p])
        elif input_ids is not None:
            ids = torch.as_tensor(input_ids)
            if ids.dim() == 1:
                ids = ids[None]
            if attention_mask is None:
                rows = [r.tolist() for r in ids]
            else:  # left or right padding: keep the masked-in tokens of each row
                mask = torch.as_tensor(attention_mask).bool()
                rows = [r[m].tolist() for r, m in zip(ids, mask)]
        else:
            raise ValueError("generate() needs prompts or input_ids")
        if not rows:
            raise ValueError("prompts is empty: generate() needs at least one prompt")
        vocab, max_pos = self._vocab_size(), self._max_positions()
        for i, r in enumerate(rows):
            if not r:
                raise ValueError(f"prompt {i} is empty")
            bad = [t for t in r if not 0 <= t < vocab] if vocab else []
            if bad:
                raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
            if max_pos and len(r) > max_pos:
                warnings.warn(f"prompt {i} has {len(r)} tokens, more than the target's maximum of "
                              f"{max_pos} positions: its output may be meaningless", stacklevel=3)
        return rows

    def _max_positions(self):
        return getattr(getattr(self.target, "config", None), "max_position_embeddings", None)

    def _vocab_size(self):
        try:
            return int(self.target.get_input_embeddings().num_embeddings)
        except Exception:  # noqa: BLE001  a model without an embedding accessor: no id check
            return None

    def _eos_ids(self, eos_token_id) -> list:
        if isinstance(eos_token_id, str) and eos_token_id == "default":
            eos_token_id = getattr(getattr(self.target, "generation_config", None), "eos_token_id", None)
            if eos_token_id is None and self.tokenizer is not None:
                eos_token_id = self.tokenizer.eos_token_id
        if eos_token_id is None:
            return []
        if isinstance(eos_token_id, torch.Tensor):
            eos_token_id = eos_token_id.tolist()
        if isinstance(eos_token_id, int) and not isinstance(eos_token_id, bool):
            return [eos_token_id]
        # a string would otherwise become its characters ("12" -> [1, 2])
        if not isinstance(eos_token_id, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in eos_token_id):
            raise TypeError(f"eos_token_id must be an int, a list of ints, None or 'default', got {eos_token_id!r}")
        return list(eos_token_id)

    # -- generation ----------------------------------------------------------------------------

    def generate(
        self,
        prompts: str | Sequence | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        num_draft_tokens: int | None = None,
        adaptive: bool | None = None,
        eos_token_id="default",
        seed: int | Sequence[int] | None = None,
        batch_size: int | None = None,
        callback: Callable[[Chunk], None] | None = None,
        progress: bool = False,
        chat: bool | None = None,
        logprobs: bool = False,
        verify_method: str = "token",
        grammar=None,
        grammar_drafts: bool = True,
    ) -> GenerationResult:
        """Generate continuations for a batch of prompts.

        Args:
            prompts: a string, a list of strings (needs the tokenizer) or a list of token-id lists.
            input_ids, attention_mask: alternatively [B, T] int64 (left or right padded) and its mask.
            max_new_tokens: per-row limit of generated tokens.
            temperature: 0 = greedy (default); top_k (0 = off), top_p (1.0 = off).
            num_draft_tokens, adaptive: override the generator's draft length and adaptivity.
            eos_token_id: int, list of ints, None (never stop early) or "default" (the model's).
            seed: int: row i of the caller's list gets the seed ``row_seeds(seed, n)[i]``; or a list
                of n ints, one seed per prompt; None draws one from torch's generator. Random
                numbers are keyed by (row seed, token index): see "Seeding" in the module docstring
                for what that makes reproducible.
            batch_size: rows per batch (default: all prompts in one batch).
            callback: called with a :class:`Chunk` for every row after every step.
            progress: show a tqdm bar of generated tokens on stderr.
            chat: how string prompts are encoded: None (default) wraps each in the tokenizer's chat
                template when it has one, as the CLI does (``--raw`` = chat=False); False: raw
                completion text; True: the template or an error. Token-id prompts are used as given.
            logprobs: also return each generated token's log-probability, processed (the
                distribution it was drawn from) and raw (``GenerationResult.logprobs`` and
                ``.raw_logprobs``; the callback's ``Chunk.logprobs``). They come out of the fused
                verification op with the tokens: no second pass over the vocabulary, no extra sync.
            verify_method: how chain steps are verified: "token" (default) or "block" (Sun et al.,
                ICLR 2025; exact as well, never fewer accepted drafts in expectation; it differs
                only with draft probabilities, i.e. a sampled model or early-exit drafter). Tree
                steps always use tree verification.
            grammar: structured output (needs the tokenizer; xgrammar): a JSON schema (dict or JSON
                text), ``"json"`` (any JSON value), a :class:`specdec.Grammar` (``Grammar.regex``,
                ``Grammar.ebnf``, ...), or a list of those, one per prompt. Every position's target
                distribution is restricted to the ids the row's grammar allows (greedy = the argmax
                over them); drafts the grammar refuses are never verified; a row ends (reason "eos")
                when its grammar is complete and a stop token is emitted, which the grammar allows
                only there.
            grammar_drafts: with a grammar and the n-gram drafter or none, draft the tokens the
                grammar forces (specdec/generator/grammar.py) ahead of the n-gram lookup (default on).
                Forced drafts form chains: with them and ``tree=None`` the steps draft chains, not
                trees; with ``tree=True`` a row whose grammar forces tokens drafts them (and the
                n-gram continuation) as a path, the other rows keep their trees.
                With ``logprobs``, processed values are under the masked target, raw ones under
                the model's own logits (no mask).
        Returns:
            GenerationResult (token ids per prompt in input order, stats).
        """
        from specdec import ops

        rows = self._prompt_ids(prompts, input_ids, attention_mask, chat)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        max_pos = self._max_positions()
        if max_pos and max_new_tokens > max_pos:  # the cache is sized for it up front
            raise ValueError(f"max_new_tokens={max_new_tokens} exceeds the target's {max_pos} positions")
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
        if verify_method not in ("token", "block"):
            raise ValueError(f'verify_method must be "token" or "block", got {verify_method!r}')
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be an int >= 1 or None, got {batch_size!r}")
        k0 = self.num_draft_tokens if num_draft_tokens is None else num_draft_tokens
        if not 0 <= k0 <= MAX_DRAFT_TOKENS:
            raise ValueError(f"num_draft_tokens must be in 0..{MAX_DRAFT_TOKENS}, got {k0}")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)))
        if isinstance(seed, (list, tuple)):
            if len(seed) != len(rows) or not all(
                    isinstance(x, numbers.Integral) and not isinstance(x, bool) and -(2**63) <= x < 2**63
                    for x in seed):
                raise ValueError(f"seed must be an int or a list of {len(rows)} int64 seeds (one per prompt), "
                                 f"got {seed!r}")
            seeds = torch.tensor([int(x) for x in seed], dtype=torch.int64)
        elif isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
            seeds = ops.row_seeds(int(seed), len(rows))
        else:
            raise TypeError(f"seed must be an int, a list of ints or None, got {type(seed).__name__}")
        eos = self._eos_ids(eos_token_id)
        opts = dict(max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
                    top_p=float(top_p), k0=k0, adaptive=self.adaptive if adaptive is None else adaptive,
                    eos=eos, callback=callback, grammars=self._compile_grammars(grammar, len(rows), eos),
                    grammar_drafts=bool(grammar_drafts), logprobs=bool(logprobs), verify_method=verify_method)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(rows) * max_new_tokens, unit="tok", desc="generating", leave=False)
        sequences, reasons, stats = [None] * len(rows), [None] * len(rows), GenerationStats(drafter=self.drafter_name)
        pairs = [None] * len(rows)
        step = batch_size or len(rows)
        try:
            for start in range(0, len(rows), step):
                index = list(range(start, min(start + step, len(rows))))
                part = run_batch(self, [rows[i] for i in index], index, seeds[index[0]: index[-1] + 1], opts, bar)
                for j, i in enumerate(index):
                    sequences[i], reasons[i] = part[0][j], part[1][j]
                    if logprobs:
                        pairs[i] = part[3][j]
                stats.merge(part[2])
        finally:
            if bar is not None:
                bar.close()
        texts = None
        if self.tokenizer is not None:
            texts = [self.tokenizer.decode(s, skip_special_tokens=True) for s in sequences]
        if not logprobs:
            return GenerationResult(sequences, rows, reasons, stats, texts)
        return GenerationResult(sequences, rows, reasons, stats, texts,
                                [[p for p, _ in row] for row in pairs], [[r for _, r in row] for row in pairs])

    def _compile_grammars(self, grammar, n: int, eos: list):
        """``generate``'s grammar argument compiled for the target's tokenizer: a list of n xgrammar
        CompiledGrammars, or None. Stop tokens: the request's EOS ids (the tokenizer's when none)."""
        from specdec.generator.grammar import GrammarCompiler, grammars_for

        specs = grammars_for(grammar, n)
        if specs is None:
            return None
        compiler = self._grammar_compiler
        if compiler is None or compiler.stop != tuple(eos):
            compiler = self._grammar_compiler = GrammarCompiler(self.tokenizer, self.vocab_size, eos)
        return [compiler.compile(g) for g in specs]

    _grammar_compiler = None  # GrammarCompiler, kept across generate calls (compiled grammars are cached)

    def _continue(self, token_ids: Sequence[int], kept: KeptCache, *, callback: Callable[[Chunk], None] | None = None,
                  **kwargs) -> GenerationResult:
        """``generate([token_ids], **kwargs)`` for a batch of one whose first ``len(kept.tokens)`` tokens
        are already in ``kept``'s cache: only the rest is prefilled, and the loop (drafting,
        verification, rollback) is ``generate``'s own. Afterwards ``kept`` holds ``token_ids`` and the
        generated tokens but the last one; after an exception (a Ctrl-C included) it holds what the
        finished steps produced, so the next call can continue from there. :class:`specdec.ChatSession`
        drives this."""
        token_ids = [int(t) for t in token_ids]
        n = len(kept.tokens)
        if n >= len(token_ids) or token_ids[:n] != kept.tokens:
            raise ValueError(f"_continue: the kept cache's {n} tokens must be a proper prefix of token_ids "
                             f"({len(token_ids)} tokens); truncate it to their common prefix first")
        if kwargs.get("batch_size") not in (None, 1):
            raise ValueError("_continue generates one sequence: batch_size must be None or 1")
        emitted = []

        def collect(chunk: Chunk) -> None:
            emitted.extend(chunk.token_ids)
            if callback is not None:
                callback(chunk)

        self._kept = kept
        try:
            return self.generate([token_ids], callback=collect, **kwargs)
        finally:
            self._kept = None
            kept._settle(token_ids, emitted)
