"""Fused chain verification (``specdec.ops.verify``) in Triton.

What it computes is ``specdec.reference.verify`` (the specification; DESIGN.md for the semantics):
accept draft x_i with probability min(1, p_i(x_i) / q_i(x_i)) (greedy rows: iff x_i is the argmax),
then emit one token at the first rejection (a sample from norm(max(0, p_i - q_i))) or after the last
accepted draft (a bonus sample from p), with the same Philox numbers as the reference (position i
uses counter offset + i): ``STREAM_ACCEPT`` for the acceptance tests, then the reference's two-level
race (sample.py's docstring) at the emit position s: a race over the sums of the 256-id race blocks
(``STREAM_RESAMPLE_BLOCK``, index = block number), then one inside the winning block
(``STREAM_RESAMPLE``, index = vocabulary id); the bonus uses the sample op's streams instead.

Without draft probabilities the op is "sample and compare": pass 1 as below, then sample.py's
passes 2-3 (``race_rows``) draw the target's own token at every live position, and
``_sample_compare_kernel`` accepts drafts while they equal it. Kernels 2-3 below are the path with
draft probabilities.

Kernels (B rows, K drafts, K+1 positions, Vt target vocabulary):
  1. ``softmax_stats_kernel`` (from sample.py), grid (B*(K+1), S1): every position's vocabulary
     is read once, split over S1 programs when B*(K+1) alone would not fill the GPU; each writes a
     partial (max, sum of exp, argmax value, argmax id) of its chunk. Positions after a row's -1
     tail are skipped.
  2. ``_verify_accept_race_kernel``, grid (B, S2): every program first combines row b's partials
     (a [K+1, S1] tile) and decides the K acceptance tests from one load of each draft's logit and
     draft probability: the emit position s = number of accepted drafts. Program (b, 0) writes
     output_ids / num_accepted (all but a sampled emitted token) and the per-row scalars the finish
     kernel needs (s, the softmax statistics and threshold at s, the residual's draft). Then, for
     sampled rows only, each program streams its chunk of race blocks of the row's logits at
     position s (and of draft_probs at s when the draft was rejected) and runs two block races on
     the same Philox draws, one per block: over the residual max(0, p - q) and over p (used when
     the residual has no mass, which only the sum over all chunks tells, or there was no
     rejection). It writes the chunk's two winners (score, block id) and its residual mass.
  3. ``_verify_finish_kernel``, grid (B,): combines the S2 chunk winners into the winning block,
     re-reads that block's 256 logits (and draft probabilities), recomputes its weights exactly as
     pass 2 did, runs the race inside the block and writes the emitted token.
Bytes read: the target logits once, plus one more vocabulary row (and one draft_probs row) per
sampled batch row, plus 256 entries of each in the finish; never a probability tensor. Philox per
sampled row: K acceptance uniforms (per program), ceil(Vt / 256) block draws, 256 in-block draws.
Intermediate state: [B*(K+1), S1], [B, S2] and [B]. Nothing synchronises with the host.

Top-k / top-p: thresholds per (row, position) from ``sample.filter_thresholds`` (a Triton search
reading each row's parameters at row // (K+1)), only when the caller passes top_k / top_p (None =
off everywhere, nothing computed).

Token bitmask (``token_bitmask`` [B, K+1, W]): every load of a position's logits goes through
``sample.ban`` (HAS_MASK), so banned ids are -inf before the statistics, the thresholds, the
acceptance test's p(draft) and the races see them: a banned draft has p = 0 and is rejected.
"""
import torch
import triton
import triton.language as tl

from specdec.kernels.philox import (
    STREAM_ACCEPT,
    STREAM_RESAMPLE,
    STREAM_RESAMPLE_BLOCK,
    STREAM_SAMPLE,
    STREAM_SAMPLE_BLOCK,
    exponential,
    philox_bits,
    uniform_open_closed,
)
from specdec.kernels.sample import (
    _BIG_ID,
    RACE_BLOCK,
    ban,
    block_k,
    clean_logits,
    exp2_scale,
    filter_thresholds,
    race_in_block,
    race_rows,
    race_plan,
    race_tile,
    race_update,
    race_winner,
    kept,
    mask_args,
    raw_sum_ptrs,
    raw_sums_buffer,
    softmax_stats_kernel,
    split_plan,
    target_probs,
)


@triton.jit
def _residual(p, q_row_ptr, offs, q_lim, resid_draft, HAS_Q: tl.constexpr):
    """max(0, p - q) at vocabulary ids ``offs``, with q the rejected draft's distribution (row
    ``q_row_ptr``, read below ``q_lim`` <= Vd, 0 beyond; HAS_Q) or one-hot at the draft id
    ``resid_draft``; all 0 when resid_draft < 0 (no residual: q is then not read at all)."""
    use = resid_draft >= 0
    if HAS_Q:
        q = tl.load(q_row_ptr + offs, mask=offs < tl.where(use, q_lim, 0), other=0.0)
        q = q.to(tl.float32)
        q = tl.where(q == q, q, 0.0)  # NaN counts as 0 (reference._draft_q)
    else:
        q = tl.where(offs == resid_draft, 1.0, 0.0)
    return tl.where(use, tl.maximum(p - q, 0.0), 0.0)


@triton.jit(do_not_specialize=["K", "S1", "blocks_per_split", "S2"])
def _verify_accept_race_kernel(
    logits_ptr,  # [B, K+1, Vt] float target logits
    drafts_ptr,  # [B, K] int64 draft ids
    q_ptr,  # [B, K, Vd] float draft probabilities (HAS_Q)
    temperature_ptr, seed_ptr, offset_ptr,  # [B]
    thr_ptr,  # [B * (K+1)] float32 top-k/top-p thresholds (HAS_THR)
    mask_ptr,  # [B * (K+1), W] int32 token bitmask (HAS_MASK)
    m_ptr, z_ptr, a_ptr, ai_ptr,  # [B * (K+1), S1] pass-1 partials
    out_ptr,  # [B, K+1] int64 output ids (out)
    num_acc_ptr,  # [B] int32 (out)
    emit_ptr,  # [B] int32 (out): position s of the sampled token, -1 if none to sample
    resid_draft_ptr,  # [B] int32 (out): the rejected draft whose residual is raced, else -1
    max_ptr, sum_ptr, thr_s_ptr,  # [B] float32 (out): softmax statistics and threshold at s
    race_r_ptr, race_r_id_ptr, race_p_ptr, race_p_id_ptr, resid_ptr,  # [B, S2] (out)
    K, Vt, Vd, S1, blocks_per_split, S2, W,
    HAS_Q: tl.constexpr, HAS_THR: tl.constexpr,
    BLOCK_K1: tl.constexpr, BLOCK_S1: tl.constexpr, TILE_BLOCKS: tl.constexpr,
    HAS_MASK: tl.constexpr = False,
):
    # (Interpreter caveat, triton 3.8: a scalar comparison combined with a block by & or | is
    # broadcast as float32; such conditions go through tl.where or into a bound instead.)
    b = tl.program_id(0)
    split = tl.program_id(1)
    K1 = K + 1
    t = tl.load(temperature_ptr + b)
    greedy = t <= 0
    c = exp2_scale(t)
    seed = tl.load(seed_ptr + b)
    offset = tl.load(offset_ptr + b)

    # ---- per-position statistics: combine the [K+1, S1] partials of pass 1 -------------------
    pos = tl.arange(0, BLOCK_K1)
    sp = tl.arange(0, BLOCK_S1)
    pmask = (pos[:, None] < K1) & (sp[None, :] < S1)
    poff = (b * K1 + pos)[:, None] * S1 + sp[None, :]
    m = tl.load(m_ptr + poff, mask=pmask, other=float("-inf"))
    z = tl.load(z_ptr + poff, mask=pmask, other=0.0)
    a = tl.load(a_ptr + poff, mask=pmask, other=float("-inf"))
    ai = tl.load(ai_ptr + poff, mask=pmask, other=_BIG_ID)
    row_max = tl.max(m, 1)  # [BLOCK_K1] max of the kept logits
    row_max = tl.where(row_max > float("-inf"), row_max, 0.0)  # no kept logit: no -inf - -inf
    row_sum = tl.sum(z * tl.math.exp2((m - row_max[:, None]) * c), 1)  # softmax denominator
    row_sum = tl.where(row_sum > 0, row_sum, 1.0)  # no kept logit: p = 0 anyway, avoid 0 / 0
    amax = tl.max(a, 1)
    argmax = tl.min(tl.where(a == amax[:, None], ai, _BIG_ID), 1)  # lowest id on ties
    finite = amax > float("-inf")  # the position has a finite logit
    thr = tl.full([BLOCK_K1], float("-inf"), tl.float32)
    if HAS_THR:
        thr = tl.load(thr_ptr + b * K1 + pos, mask=pos < K1, other=float("-inf"))

    # ---- acceptance tests (positions 0..K-1) -------------------------------------------------
    is_draft = pos < K
    drafts = tl.load(drafts_ptr + b * K + pos, mask=is_draft, other=0)
    n_drafts = tl.min(tl.where(is_draft & (drafts == -1), pos, K), 0)  # drafts before the -1 tail
    in_range = is_draft & (drafts >= 0) & (drafts < Vd)
    readable = in_range & (drafts < Vt)  # out-of-range ids are rejected and never read
    safe = tl.where(readable, drafts, 0)
    x = clean_logits(tl.load(logits_ptr + (b * K1 + pos).to(tl.int64) * Vt + safe,
                             mask=readable, other=float("-inf")))
    if HAS_MASK:  # a banned draft: p = 0, rejected
        x = ban(x, mask_ptr + (b * K1 + tl.minimum(pos, K)).to(tl.int64) * W, safe, W)  # lanes >= K1: in bounds
    keep_draft = kept(x, thr)
    p_draft = tl.where(keep_draft, tl.math.exp2((x - row_max) * c) / row_sum, 0.0)
    if HAS_Q:
        q_draft = tl.load(q_ptr + (b * K + pos).to(tl.int64) * Vd + safe, mask=readable,
                          other=0.0).to(tl.float32)
        q_draft = tl.where(q_draft == q_draft, q_draft, 0.0)  # NaN counts as 0
    else:
        q_draft = tl.full([BLOCK_K1], 1.0, tl.float32)  # deterministic drafter: q one-hot
    u = uniform_open_closed(philox_bits(seed, offset + pos, STREAM_ACCEPT, 0, 0))
    # p(x) > 0 is "kept" (exact in the float64 reference, where p underflows no sooner than
    # e^-745); q(x) = 0 < p(x) accepts since u * 0 <= p.
    accept_sampled = keep_draft & (u * q_draft <= p_draft)
    accept_greedy = drafts == argmax.to(tl.int64)
    accept = tl.where(greedy, accept_greedy, accept_sampled) & in_range & (pos < n_drafts) & finite
    s = tl.min(tl.where(accept | ~is_draft, K, pos), 0)  # first rejection: the emit position
    rejected = s < n_drafts
    at_s = pos == s
    # the emit position has a finite logit (positions after s are never looked at)
    row_ok = tl.sum(tl.where(at_s & finite, 1, 0), 0) > 0
    argmax_s = tl.min(tl.where(at_s, argmax, _BIG_ID), 0)
    max_s = tl.max(tl.where(at_s, row_max, float("-inf")), 0)
    sum_s = tl.sum(tl.where(at_s, row_sum, 0.0), 0)
    thr_s = tl.max(tl.where(at_s, thr, float("-inf")), 0)
    draft_s = tl.sum(tl.where(at_s, safe, 0), 0)
    # sample from the residual only after a rejection of an in-range draft
    use_resid = rejected & (tl.sum(tl.where(at_s & in_range, 1, 0), 0) > 0)
    # the residual's draft; -1: rejected, race over p; -2: no rejection, the bonus (own sample)
    resid_draft = tl.where(use_resid, draft_s, tl.where(rejected, -1, -2))

    # ---- outputs except a sampled emitted token, and the finish kernel's scalars (split 0) ---
    ids = tl.where(pos < s, drafts, -1)
    ids = tl.where(greedy, tl.where(at_s, argmax_s.to(tl.int64), ids), ids)
    ids = tl.where(row_ok, ids, -1)
    first = split == 0
    tl.store(out_ptr + b * K1 + pos, ids, mask=pos < tl.where(first, K1, 0))
    tl.store(num_acc_ptr + b, tl.where(row_ok, s, 0), mask=first)
    sampled_row = row_ok & (t > 0)
    tl.store(emit_ptr + b, tl.where(sampled_row, s, -1), mask=first)
    tl.store(resid_draft_ptr + b, resid_draft, mask=first)
    tl.store(max_ptr + b, max_s, mask=first)
    tl.store(sum_ptr + b, sum_s, mask=first)
    tl.store(thr_s_ptr + b, thr_s, mask=first)

    # ---- block races over this program's race blocks of position s ---------------------------
    blk_start = split * blocks_per_split
    blk_end = tl.minimum(blk_start + blocks_per_split, tl.cdiv(Vt, RACE_BLOCK))
    n_tiles = tl.cdiv(tl.maximum(blk_end - blk_start, 0), TILE_BLOCKS)
    n_tiles = tl.where(sampled_row, n_tiles, 0)  # greedy / empty rows read and draw nothing more
    row_ptr = logits_ptr + (b * K1 + s).to(tl.int64) * Vt
    q_row_ptr = q_ptr + (b * K + tl.minimum(s, tl.maximum(K - 1, 0))).to(tl.int64) * Vd
    q_lim = tl.minimum(Vd, blk_end * RACE_BLOCK)
    best_r = tl.full([TILE_BLOCKS], float("-inf"), tl.float32)  # per-block-lane best scores
    best_r_id = tl.full([TILE_BLOCKS], _BIG_ID, tl.int32)
    best_p = tl.full([TILE_BLOCKS], float("-inf"), tl.float32)
    best_p_id = tl.full([TILE_BLOCKS], _BIG_ID, tl.int32)
    resid_mass = tl.zeros([TILE_BLOCKS], tl.float32)
    for i in range(n_tiles):
        blocks, offs, mask = race_tile(blk_start + i * TILE_BLOCKS, blk_end, Vt, TILE_BLOCKS)
        raw = tl.load(row_ptr + offs, mask=mask, other=float("-inf"))
        if HAS_MASK:
            raw = ban(raw, mask_ptr + (b * K1 + s).to(tl.int64) * W, offs, W)
        p, keep = target_probs(raw, c, thr_s, max_s, sum_s)
        w_r = tl.sum(_residual(p, q_row_ptr, offs, q_lim, resid_draft, HAS_Q), 1)  # [TILE_BLOCKS]
        w_p = tl.sum(p, 1)
        # one exponential per block for the residual and a rejection's race over p (only one of
        # them is used); the bonus is the target's own sample: the sample op's block stream
        e = exponential(philox_bits(seed, offset + s, STREAM_RESAMPLE_BLOCK, 0, blocks))
        e_own = exponential(philox_bits(seed, offset + s, STREAM_SAMPLE_BLOCK, 0, blocks))
        e_p = tl.where(rejected, e, e_own)
        best_r, best_r_id = race_update(tl.where(w_r > 0, w_r / e, -1.0), blocks, best_r, best_r_id)
        has_p = tl.max(keep.to(tl.int32), 1) > 0  # W_b > 0 in the reference
        best_p, best_p_id = race_update(tl.where(has_p, w_p / e_p, -1.0), blocks, best_p, best_p_id)
        resid_mass += w_r
    out = b * S2 + split
    top_r, top_r_id = race_winner(best_r, best_r_id)
    top_p, top_p_id = race_winner(best_p, best_p_id)
    tl.store(race_r_ptr + out, top_r)
    tl.store(race_r_id_ptr + out, top_r_id)
    tl.store(race_p_ptr + out, top_p)
    tl.store(race_p_id_ptr + out, top_p_id)
    tl.store(resid_ptr + out, tl.sum(resid_mass, 0))


@triton.jit(do_not_specialize=["K", "S2"])
def _verify_finish_kernel(
    logits_ptr,  # [B, K+1, Vt] float target logits
    q_ptr,  # [B, K, Vd] float draft probabilities (HAS_Q)
    temperature_ptr, seed_ptr, offset_ptr,  # [B]
    emit_ptr, resid_draft_ptr, max_ptr, sum_ptr, thr_s_ptr,  # [B] per-row scalars of pass 2
    race_r_ptr, race_r_id_ptr, race_p_ptr, race_p_id_ptr, resid_ptr,  # [B, S2]
    mask_ptr,  # [B * (K+1), W] int32 token bitmask (HAS_MASK)
    out_ptr,  # [B, K+1] int64 (out: the sampled token at position s)
    K, Vt, Vd, S2, W,
    HAS_Q: tl.constexpr, BLOCK_S2: tl.constexpr, HAS_MASK: tl.constexpr = False,
):
    """grid = (B,): the winning block (of the residual race if the residual has mass, else of the
    race over p), then the race inside it. Rows with nothing to sample (s = -1) do nothing."""
    b = tl.program_id(0)
    s = tl.load(emit_ptr + b)
    if s >= 0:
        sp = tl.arange(0, BLOCK_S2)
        mask = sp < S2
        base = b * S2 + sp
        _, r_blk = race_winner(tl.load(race_r_ptr + base, mask=mask, other=float("-inf")),
                               tl.load(race_r_id_ptr + base, mask=mask, other=_BIG_ID))
        _, p_blk = race_winner(tl.load(race_p_ptr + base, mask=mask, other=float("-inf")),
                               tl.load(race_p_id_ptr + base, mask=mask, other=_BIG_ID))
        use_r = tl.sum(tl.load(resid_ptr + base, mask=mask, other=0.0), 0) > 0
        offs = tl.where(use_r, r_blk, p_blk) * RACE_BLOCK + tl.arange(0, RACE_BLOCK)

        # the weights of that block, computed exactly as in pass 2
        K1 = K + 1
        c = exp2_scale(tl.load(temperature_ptr + b))
        raw = tl.load(logits_ptr + (b * K1 + s).to(tl.int64) * Vt + offs, mask=offs < Vt,
                      other=float("-inf"))
        if HAS_MASK:
            raw = ban(raw, mask_ptr + (b * K1 + s).to(tl.int64) * W, offs, W)
        p, keep = target_probs(raw, c, tl.load(thr_s_ptr + b), tl.load(max_ptr + b),
                               tl.load(sum_ptr + b))
        q_row_ptr = q_ptr + (b * K + tl.minimum(s, tl.maximum(K - 1, 0))).to(tl.int64) * Vd
        resid_draft = tl.load(resid_draft_ptr + b)
        resid = _residual(p, q_row_ptr, offs, Vd, resid_draft, HAS_Q)
        w = tl.where(use_r, resid, p)
        competes = tl.where(use_r, resid > 0, keep)
        seed, off = tl.load(seed_ptr + b), tl.load(offset_ptr + b) + s
        token = race_in_block(w, competes, offs, seed, off, STREAM_RESAMPLE, 0)
        own = race_in_block(w, competes, offs, seed, off, STREAM_SAMPLE, 0)  # the bonus
        token = tl.where(resid_draft == -2, own, token)
        tl.store(out_ptr + b * K1 + s, token.to(tl.int64))


@triton.jit(do_not_specialize=["K"])
def _sample_compare_kernel(
    own_ptr,  # [B, K+1] int64: the target's own token at each position (-1: none)
    drafts_ptr,  # [B, K] int64 draft ids
    out_ptr,  # [B, K+1] int64 (out)
    num_acc_ptr,  # [B] int32 (out)
    K, BLOCK_K1: tl.constexpr,
):
    """grid = (B,): sample and compare. Drafts are accepted while they equal the target's own
    token; the first mismatch (or the bonus position) emits that token. A row whose emitted token
    is -1 (no finite logit there) emits nothing."""
    b = tl.program_id(0)
    K1 = K + 1
    pos = tl.arange(0, BLOCK_K1)
    is_draft = pos < K
    drafts = tl.load(drafts_ptr + b * K + pos, mask=is_draft, other=0)
    own = tl.load(own_ptr + b * K1 + pos, mask=pos < K1, other=-1)
    n_drafts = tl.min(tl.where(is_draft & (drafts == -1), pos, K), 0)
    accept = is_draft & (drafts == own) & (own >= 0) & (pos < n_drafts)
    s = tl.min(tl.where(accept | ~is_draft, K, pos), 0)
    token = tl.sum(tl.where(pos == s, own, 0), 0)
    row_ok = token >= 0
    ids = tl.where(pos < s, drafts, -1)
    ids = tl.where(pos == s, token, ids)
    tl.store(out_ptr + b * K1 + pos, tl.where(row_ok, ids, -1), mask=pos < K1)
    tl.store(num_acc_ptr + b, tl.where(row_ok, s, 0))


def verify(target_logits, draft_token_ids, draft_probs, temperature, top_k, top_p, seed, offset,
           *, block_v=None, num_splits=None, num_race_splits=None, return_logprobs=False,
           token_bitmask=None):
    """Fused chain verification (Triton). Same contract as ``specdec.reference.verify``.

    target_logits [B, K+1, Vt] float32/float16/bfloat16; draft_token_ids [B, K] int64 (-1 tail =
    no draft); draft_probs [B, K, Vd] float (Vd <= Vt) or None (deterministic drafter);
    temperature [B] float32 (<= 0: greedy row); top_k [B] int64 (0 = off) or None; top_p [B]
    float32 (1.0 = off) or None; seed, offset [B] int64; all on one device. K may be 0.
    token_bitmask [B, K+1, W] int32 (W >= 1) or None: position j's allowed ids
    (``specdec.reference.allowed_ids``); banned ids are read as -inf before anything else.
    ``block_v`` / ``num_splits`` / ``num_race_splits`` override the tiling (tests, tuning):
    the stats pass's tile width and programs per (row, position); the race pass's tile width
    (rounded down to whole 256-id race blocks, at least one) and programs per row.
    Returns (output_ids [B, K+1] int64, num_accepted [B] int32), and with ``return_logprobs``
    also (processed_logprobs, raw_logprobs) [B, K+1] float32 (``logprobs.token_logprobs`` from
    pass 1's statistics).
    """
    B, K1, Vt = target_logits.shape
    K = K1 - 1
    dev = target_logits.device
    if B == 0 or Vt == 0:
        out = (torch.full((B, K1), -1, dtype=torch.int64, device=dev),
               torch.zeros((B,), dtype=torch.int32, device=dev))
        if not return_logprobs:
            return out
        lp = torch.full((B, K1), float("-inf"), device=dev)
        return (*out, lp, lp.clone())
    # every entry is written by the accept kernel's split-0 program (and the finish kernel)
    out = torch.empty((B, K1), dtype=torch.int64, device=dev)
    num_acc = torch.empty((B,), dtype=torch.int32, device=dev)
    logits = target_logits.contiguous()
    drafts = draft_token_ids.to(torch.int64).contiguous()
    temperature = temperature.to(torch.float32).contiguous()
    seed = seed.to(torch.int64).contiguous()
    offset = offset.to(torch.int64).contiguous()
    has_q = draft_probs is not None
    Vd = draft_probs.shape[-1] if has_q else Vt
    # placeholder pointer when absent (or empty, K = 0): never read then
    q = draft_probs.contiguous() if has_q and draft_probs.numel() > 0 else logits

    rows = B * K1
    has_mask = token_bitmask is not None
    bitmask = token_bitmask.reshape(rows, -1).contiguous() if has_mask else None  # one row per position
    thr = None  # filtering off: no threshold pass
    if top_k is not None or top_p is not None:
        thr = filter_thresholds(logits.view(rows, Vt), temperature, top_k, top_p, group=K1,
                                token_bitmask=bitmask)
    thr_arg = thr if thr is not None else temperature  # placeholder pointer, never read
    drafts_arg = drafts if K > 0 else seed  # K = 0: never read, but a valid pointer

    # pass 1: per-position softmax statistics over (row * position, vocabulary split)
    BLOCK_V, tps1, S1, BLOCK_S1, warps1 = split_plan(Vt, rows, dev, block_v, num_splits)
    stats = torch.empty((3, rows, S1), dtype=torch.float32, device=dev)  # max, sum, argmax value
    stats_id = torch.empty((rows, S1), dtype=torch.int32, device=dev)
    raw_sums = raw_sums_buffer(rows, S1, dev, return_logprobs, has_mask)
    mask, W = mask_args(bitmask, stats_id)
    BLOCK_K = block_k(K)
    softmax_stats_kernel[(rows, S1)](
        logits, drafts_arg, temperature, thr_arg, mask, stats[0], stats[1], stats[2], stats_id,
        *raw_sum_ptrs(raw_sums, stats[1]), Vt, K, tps1, S1, W,
        HAS_THR=thr is not None, BLOCK_K=BLOCK_K, BLOCK_V=BLOCK_V, num_warps=warps1, WANT_RAW=return_logprobs,
        HAS_MASK=has_mask)

    def with_logprobs(out, num_acc):
        """The outputs plus the emitted tokens' logprobs (position j's token drawn at row b*K1 + j)."""
        if not return_logprobs:
            return out, num_acc
        from specdec.kernels.logprobs import token_logprobs

        source = torch.arange(K1, dtype=torch.int64, device=dev).expand(B, K1)
        return (out, num_acc, *token_logprobs(logits.view(rows, Vt), out, source, temperature, thr, stats,
                                              raw_sums, bitmask))

    if not has_q:
        # sample and compare: every live position's own token (the sample op's race, counter
        # offset + position; greedy rows: the argmax), then the acceptance walk
        own = torch.empty((rows,), dtype=torch.int64, device=dev)
        race_rows(logits.view(rows, Vt), temperature, thr, seed, offset, stats, stats_id, K, own,
                  None, block_v, num_race_splits, bitmask)
        _sample_compare_kernel[(B,)](own, drafts_arg, out, num_acc, K,
                                     BLOCK_K1=block_k(K1), num_warps=1)
        return with_logprobs(out, num_acc)

    # pass 2: acceptance, then the block races at the emit position over (row, split of blocks)
    blocks_per_split, S2, BLOCK_S2, TILE_BLOCKS, warps2 = race_plan(
        Vt, B, dev, block_v, num_race_splits)
    races = torch.empty((3, B, S2), dtype=torch.float32, device=dev)  # residual, p, residual mass
    race_ids = torch.empty((2, B, S2), dtype=torch.int32, device=dev)
    row_i = torch.empty((2, B), dtype=torch.int32, device=dev)  # emit position, residual draft
    row_f = torch.empty((3, B), dtype=torch.float32, device=dev)  # max, sum, threshold at s
    _verify_accept_race_kernel[(B, S2)](
        logits, drafts_arg, q, temperature, seed, offset, thr_arg, mask,
        stats[0], stats[1], stats[2], stats_id, out, num_acc, row_i[0], row_i[1],
        row_f[0], row_f[1], row_f[2], races[0], race_ids[0], races[1], race_ids[1], races[2],
        K, Vt, Vd, S1, blocks_per_split, S2, W,
        HAS_Q=has_q, HAS_THR=thr is not None, BLOCK_K1=block_k(K1),
        BLOCK_S1=BLOCK_S1, TILE_BLOCKS=TILE_BLOCKS, HAS_MASK=has_mask, num_warps=warps2)

    # the race inside the winning block
    _verify_finish_kernel[(B,)](
        logits, q, temperature, seed, offset, row_i[0], row_i[1], row_f[0], row_f[1], row_f[2],
        races[0], race_ids[0], races[1], race_ids[1], races[2], mask, out, K, Vt, Vd, S2, W,
        HAS_Q=has_q, BLOCK_S2=BLOCK_S2, HAS_MASK=has_mask, num_warps=4)
    return with_logprobs(out, num_acc)
