"""Fused chain verification (``specdec.ops.verify``) in Triton.

What it computes is ``specdec.reference.verify`` (the specification; DESIGN.md for the semantics):
accept draft x_i with probability min(1, p_i(x_i) / q_i(x_i)) (greedy rows: iff x_i is the argmax),
then emit one token at the first rejection (a sample from norm(max(0, p_i - q_i))) or after the last
accepted draft (a bonus sample from p), by the exponential race of the reference, with the same
Philox numbers (``STREAM_ACCEPT`` for the acceptance tests, ``STREAM_RESAMPLE`` for the emitted
token).

Kernels (B rows, K drafts, K+1 positions, Vt target vocabulary):
  1. ``softmax_stats_kernel`` (from sample.py), grid (B*(K+1), S1): every position's vocabulary
     is read once, split over S1 programs when B*(K+1) alone would not fill the GPU; each writes a
     partial (max, sum of exp, argmax value, argmax id) of its chunk. Positions after a row's -1
     tail are skipped.
  2. ``_verify_accept_race_kernel``, grid (B, S2): every program first combines row b's partials
     (a [K+1, S1] tile) and decides the K acceptance tests from one load of each draft's logit and
     draft probability: the emit position s = number of accepted drafts. Program (b, 0) writes
     output_ids / num_accepted (all but a sampled emitted token). Then, for sampled rows only, each
     program streams its chunk of the row's vocabulary at position s (and of draft_probs at s when
     the draft was rejected) and runs two exponential races on the same Philox draws: over the
     residual max(0, p - q) and over p (used when the residual has no mass or there was no
     rejection).
  3. ``_verify_finish_kernel``, grid (B,): combines the S2 race winners, writes the emitted token.
Bytes read: the target logits once, plus one more vocabulary row (and one draft_probs row) per
sampled batch row; never a probability tensor. Intermediate state: [B*(K+1), S1] and [B, S2].
Nothing synchronises with the host.

Top-k / top-p: thresholds per (row, position) from ``sample.filter_thresholds`` (torch sort on the
device), only when the caller passes top_k / top_p (None = off everywhere, nothing computed).
"""
import torch
import triton
import triton.language as tl

from specdec.kernels.philox import (
    STREAM_ACCEPT,
    STREAM_RESAMPLE,
    exponential,
    philox_bits,
    uniform_open_closed,
)
from specdec.kernels.sample import (
    _BIG_ID,
    clean_logits,
    effective_temperature,
    filter_thresholds,
    race_update,
    race_winner,
    scale_and_filter,
    softmax_stats_kernel,
    split_plan,
)


@triton.jit
def _verify_accept_race_kernel(
    logits_ptr,  # [B, K+1, Vt] float target logits
    drafts_ptr,  # [B, K] int64 draft ids
    q_ptr,  # [B, K, Vd] float draft probabilities (HAS_Q)
    temperature_ptr, seed_ptr, offset_ptr,  # [B]
    thr_ptr,  # [B * (K+1)] float32 top-k/top-p thresholds (HAS_THR)
    m_ptr, z_ptr, a_ptr, ai_ptr,  # [B * (K+1), S1] pass-1 partials
    out_ptr,  # [B, K+1] int64 output ids (out)
    num_acc_ptr,  # [B] int32 (out)
    emit_ptr,  # [B] int32 (out): position of the sampled token, -1 if none to sample
    race_r_ptr, race_r_id_ptr, race_p_ptr, race_p_id_ptr, resid_ptr,  # [B, S2] (out)
    K, Vt, Vd, S1, tiles_per_split, S2,
    HAS_Q: tl.constexpr, HAS_THR: tl.constexpr,
    BLOCK_K1: tl.constexpr, BLOCK_S1: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # (Interpreter caveat, triton 3.8: a scalar comparison combined with a block by & or | is
    # broadcast as float32; such conditions go through tl.where or into a bound instead.)
    b = tl.program_id(0)
    split = tl.program_id(1)
    K1 = K + 1
    t = tl.load(temperature_ptr + b)
    greedy = t <= 0
    temp = effective_temperature(t)
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
    row_max = tl.max(m, 1)  # [BLOCK_K1] max of the kept scaled logits
    row_max = tl.where(row_max > float("-inf"), row_max, 0.0)  # no kept logit: no -inf - -inf
    row_sum = tl.sum(z * tl.exp(m - row_max[:, None]), 1)  # softmax denominator
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
    scaled, kept = scale_and_filter(x, temp, thr)
    p_draft = tl.where(kept, tl.exp(scaled - row_max) / row_sum, 0.0)
    if HAS_Q:
        q_draft = tl.load(q_ptr + (b * K + pos).to(tl.int64) * Vd + safe, mask=readable,
                          other=0.0).to(tl.float32)
    else:
        q_draft = tl.full([BLOCK_K1], 1.0, tl.float32)  # deterministic drafter: q one-hot
    u = uniform_open_closed(philox_bits(seed, offset, STREAM_ACCEPT, pos, 0))
    # p(x) > 0 is "kept" (exact in the float64 reference, where p underflows no sooner than
    # e^-745); q(x) = 0 < p(x) accepts since u * 0 <= p.
    accept_sampled = kept & (u * q_draft <= p_draft)
    accept_greedy = drafts == argmax.to(tl.int64)
    accept = tl.where(greedy, accept_greedy, accept_sampled) & in_range & (pos < n_drafts)
    s = tl.min(tl.where(accept | ~is_draft, K, pos), 0)  # first rejection: the emit position
    rejected = s < n_drafts
    live = (pos <= n_drafts) & (pos < K1)
    row_ok = tl.sum(tl.where(live & ~finite, 1, 0), 0) == 0  # every live position has a logit

    at_s = pos == s
    argmax_s = tl.min(tl.where(at_s, argmax, _BIG_ID), 0)
    max_s = tl.max(tl.where(at_s, row_max, float("-inf")), 0)
    sum_s = tl.sum(tl.where(at_s, row_sum, 0.0), 0)
    thr_s = tl.max(tl.where(at_s, thr, float("-inf")), 0)
    draft_s = tl.sum(tl.where(at_s, safe, 0), 0)
    # sample from the residual only after a rejection of an in-range draft
    use_resid = rejected & (tl.sum(tl.where(at_s & in_range, 1, 0), 0) > 0)

    # ---- outputs except a sampled emitted token (program (b, 0) only) -------------------------
    ids = tl.where(pos < s, drafts, -1)
    ids = tl.where(greedy, tl.where(at_s, argmax_s.to(tl.int64), ids), ids)
    ids = tl.where(row_ok, ids, -1)
    first = split == 0
    tl.store(out_ptr + b * K1 + pos, ids, mask=pos < tl.where(first, K1, 0))
    tl.store(num_acc_ptr + b, tl.where(row_ok, s, 0), mask=first)
    sampled_row = row_ok & (t > 0)
    tl.store(emit_ptr + b, tl.where(sampled_row, s, -1), mask=first)

    # ---- exponential races over this program's chunk of position s ---------------------------
    tile_start = split * tiles_per_split
    n_tiles = tl.maximum(tl.minimum(tiles_per_split, tl.cdiv(Vt, BLOCK_V) - tile_start), 0)
    n_tiles = tl.where(sampled_row, n_tiles, 0)  # greedy / empty rows read nothing more
    row_ptr = logits_ptr + (b * K1 + s).to(tl.int64) * Vt
    q_row_ptr = q_ptr + (b * K + tl.minimum(s, tl.maximum(K - 1, 0))).to(tl.int64) * Vd
    lanes = tl.arange(0, BLOCK_V)
    best_r = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_r_id = tl.full([BLOCK_V], _BIG_ID, tl.int32)
    best_p = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_p_id = tl.full([BLOCK_V], _BIG_ID, tl.int32)
    resid_mass = tl.zeros([BLOCK_V], tl.float32)
    for i in range(n_tiles):
        offs = (tile_start + i) * BLOCK_V + lanes
        x = clean_logits(tl.load(row_ptr + offs, mask=offs < Vt, other=float("-inf")))
        scaled, keep = scale_and_filter(x, temp, thr_s)
        p = tl.where(keep, tl.exp(scaled - max_s) / sum_s, 0.0)
        if HAS_Q:  # q is 0 beyond Vd; not read at all unless the residual is needed
            q = tl.load(q_row_ptr + offs, mask=offs < tl.where(use_resid, Vd, 0),
                        other=0.0).to(tl.float32)
        else:
            q = tl.where(offs == draft_s, 1.0, 0.0)
        resid = tl.where(use_resid, tl.maximum(p - q, 0.0), 0.0)
        e = exponential(philox_bits(seed, offset, STREAM_RESAMPLE, s, offs))
        best_r, best_r_id = race_update(tl.where(resid > 0, resid / e, -1.0), offs, best_r, best_r_id)
        best_p, best_p_id = race_update(tl.where(keep, p / e, -1.0), offs, best_p, best_p_id)
        resid_mass += resid
    out = b * S2 + split
    top_r, top_r_id = race_winner(best_r, best_r_id)
    top_p, top_p_id = race_winner(best_p, best_p_id)
    tl.store(race_r_ptr + out, top_r)
    tl.store(race_r_id_ptr + out, top_r_id)
    tl.store(race_p_ptr + out, top_p)
    tl.store(race_p_id_ptr + out, top_p_id)
    tl.store(resid_ptr + out, tl.sum(resid_mass, 0))


@triton.jit
def _verify_finish_kernel(
    out_ptr,  # [B, K+1] int64
    emit_ptr,  # [B] int32: position to fill, -1 for none
    race_r_ptr, race_r_id_ptr, race_p_ptr, race_p_id_ptr, resid_ptr,  # [B, S2]
    K1, S2, BLOCK_S2: tl.constexpr,
):
    """grid = (B,): the residual race's winner if the residual has mass, else the race over p."""
    b = tl.program_id(0)
    s = tl.load(emit_ptr + b)
    sp = tl.arange(0, BLOCK_S2)
    mask = sp < S2
    base = b * S2 + sp
    _, r_id = race_winner(tl.load(race_r_ptr + base, mask=mask, other=float("-inf")),
                          tl.load(race_r_id_ptr + base, mask=mask, other=_BIG_ID))
    _, p_id = race_winner(tl.load(race_p_ptr + base, mask=mask, other=float("-inf")),
                          tl.load(race_p_id_ptr + base, mask=mask, other=_BIG_ID))
    mass = tl.sum(tl.load(resid_ptr + base, mask=mask, other=0.0), 0)
    token = tl.where(mass > 0, r_id, p_id)
    tl.store(out_ptr + b * K1 + s, token.to(tl.int64), mask=s >= 0)


def verify(target_logits, draft_token_ids, draft_probs, temperature, top_k, top_p, seed, offset,
           *, block_v=None, num_splits=None, num_race_splits=None):
    """Fused chain verification (Triton). Same contract as ``specdec.reference.verify``.

    target_logits [B, K+1, Vt] float32/float16/bfloat16; draft_token_ids [B, K] int64 (-1 tail =
    no draft); draft_probs [B, K, Vd] float (Vd <= Vt) or None (deterministic drafter);
    temperature [B] float32 (<= 0: greedy row); top_k [B] int64 (0 = off) or None; top_p [B]
    float32 (1.0 = off) or None; seed, offset [B] int64; all on one device. K may be 0.
    ``block_v`` / ``num_splits`` / ``num_race_splits`` override the tiling (tests, tuning).
    Returns (output_ids [B, K+1] int64, num_accepted [B] int32).
    """
    B, K1, Vt = target_logits.shape
    K = K1 - 1
    dev = target_logits.device
    out = torch.full((B, K1), -1, dtype=torch.int64, device=dev)
    num_acc = torch.zeros((B,), dtype=torch.int32, device=dev)
    if B == 0 or Vt == 0:
        return out, num_acc
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
    thr = filter_thresholds(
        logits.view(rows, Vt), temperature.repeat_interleave(K1),
        None if top_k is None else top_k.repeat_interleave(K1),
        None if top_p is None else top_p.repeat_interleave(K1))
    thr_arg = thr if thr is not None else temperature  # placeholder pointer, never read
    drafts_arg = drafts if K > 0 else seed  # K = 0: never read, but a valid pointer

    # pass 1: per-position softmax statistics over (row * position, vocabulary split)
    BLOCK_V, tps1, S1, BLOCK_S1, warps = split_plan(Vt, rows, dev, block_v, num_splits)
    stats = torch.empty((3, rows, S1), dtype=torch.float32, device=dev)  # max, sum, argmax value
    stats_id = torch.empty((rows, S1), dtype=torch.int32, device=dev)
    BLOCK_K = triton.next_power_of_2(max(K, 1))
    softmax_stats_kernel[(rows, S1)](
        logits, drafts_arg, temperature, thr_arg, stats[0], stats[1], stats[2], stats_id,
        Vt, K, tps1, S1,
        HAS_THR=thr is not None, BLOCK_K=BLOCK_K, BLOCK_V=BLOCK_V, num_warps=warps)

    # pass 2: acceptance, then the races at the emit position over (row, vocabulary split)
    _, tps2, S2, BLOCK_S2, _ = split_plan(Vt, B, dev, BLOCK_V, num_race_splits)
    races = torch.empty((3, B, S2), dtype=torch.float32, device=dev)  # residual, p, residual mass
    race_ids = torch.empty((2, B, S2), dtype=torch.int32, device=dev)
    emit = torch.empty((B,), dtype=torch.int32, device=dev)
    _verify_accept_race_kernel[(B, S2)](
        logits, drafts_arg, q, temperature, seed, offset, thr_arg,
        stats[0], stats[1], stats[2], stats_id, out, num_acc, emit,
        races[0], race_ids[0], races[1], race_ids[1], races[2],
        K, Vt, Vd, S1, tps2, S2,
        HAS_Q=has_q, HAS_THR=thr is not None, BLOCK_K1=triton.next_power_of_2(K1),
        BLOCK_S1=BLOCK_S1, BLOCK_V=BLOCK_V, num_warps=warps)
    _verify_finish_kernel[(B,)](
        out, emit, races[0], race_ids[0], races[1], race_ids[1], races[2], K1, S2,
        BLOCK_S2=BLOCK_S2, num_warps=1)
    return out, num_acc
