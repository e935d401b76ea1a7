# Holds: the generator's public names, re-exported from this package's files.
# May use: the modules of this package only.
"""Speculative generation over Hugging Face causal LMs.

Files, from the entry point down:

* ``speculative.py``: :class:`SpeculativeGenerator` (arguments, prompts, seeds, batches; ``generate``);
* ``step.py``: the step loop of one batch, ``draft -> forward -> verify -> commit`` (``run_batch``, ``_BatchRun``);
* ``policy.py``: :class:`DraftLengthPolicy`, :class:`AcceptanceModel`, :class:`ForwardCostModel` (draft widths);
* ``trees.py``: a tree step's drafts and their pruning (``_Tree``);
* ``layouts.py``: the target cache's layouts (left padded, shared prefix, continued) and :class:`KeptCache`;
* ``grammar.py``: structured output on xgrammar (:class:`Grammar`, the per-row matchers, the logits mask);
* ``results.py``: :class:`Chunk`, :class:`GenerationStats`, :class:`GenerationResult`.
"""
from specdec.generator.grammar import Grammar
from specdec.generator.layouts import KeptCache
from specdec.generator.policy import MAX_DRAFT_TOKENS, AcceptanceModel, DraftLengthPolicy, ForwardCostModel
from specdec.generator.results import Chunk, GenerationResult, GenerationStats
from specdec.generator.speculative import SpeculativeGenerator, encode_prompt

__all__ = ["SpeculativeGenerator", "GenerationResult", "GenerationStats", "Chunk", "DraftLengthPolicy",
           "AcceptanceModel", "ForwardCostModel", "KeptCache", "Grammar", "encode_prompt", "MAX_DRAFT_TOKENS"]
