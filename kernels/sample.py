"""Fused sampling (``specdec.ops.sample``) in Triton, and the pieces that verification reuses.

What it computes is ``specdec.reference.sample`` (the specification): per row, the target
distribution p = softmax(top-p(top-k(logits / temperature))) with non-finite logits as -inf, a token
drawn from p by the reference's two-level exponential race, and p itself as float32 (one-hot at the
argmax for greedy rows, zeros and token -1 for rows without a finite logit).

The two-level race (``specdec.reference._race``): the vocabulary is cut into blocks of
``RACE_BLOCK`` = 256 ids; block b (sum of its weights W_b) wins the race argmax_b W_b / e_b over
W_b > 0 (e_b ~ Exp(1) from Philox stream ``STREAM_SAMPLE_BLOCK``, position 0, index b), then token
j of the winning block wins argmax_j p_j / e_j over p_j > 0 (stream ``STREAM_SAMPLE``, index j).
Ties go to the lowest index at both levels. So a row costs V / 256 + 256 Philox draws, not V.
"p_j > 0" is "j is kept" here: exact in the float64 reference, where float32 p may underflow.

Kernels (grid, what they read):
  1. ``softmax_stats_kernel`` (rows, S1): each program streams one chunk of BLOCK_V-wide tiles of
     one row and writes its partial (max, sum of exp, argmax value, argmax id). Online softmax per
     lane, so the loop has no cross-lane reduction. Shared with verification, where a row is a
     (batch row, draft position) pair.
  2. ``_sample_probs_kernel`` (rows, S2): combines the row's S1 partials (a few numbers), streams
     its chunk of race blocks again (tiles of TILE_BLOCKS whole blocks), writes probs, and keeps
     the chunk's block-race winner (score, block id): the argmax over blocks splits over programs.
     Sampled rows only draw one exponential per block; greedy rows draw nothing.
  3. ``_sample_finish_kernel`` (rows,): combines the S2 block winners into the winning block,
     re-reads its 256 logits, recomputes p there and runs the race inside the block.
Bytes: logits read twice, plus 256 logits per sampled row; probs written once; intermediate state
is [B, S1] and [B, S2].

Temperature: never a division per element. exp((x - max) / T) = exp2((x - max) * c) with
c = log2(e) / T (``exp2_scale``), and the statistics (max, argmax, thresholds) are kept on the raw
logits, which dividing by T > 0 does not reorder.

Top-k / top-p: ``filter_thresholds`` (``thresholds.py``: a Triton multi-pivot search, no sort)
computes one threshold per row on the raw logits (a token is kept iff its logit >= threshold, so
ties at the threshold are kept, as in the reference); the kernels compare against it exactly.
"""
import torch
import triton
import triton.language as tl

from specdec.kernels.philox import STREAM_SAMPLE, STREAM_SAMPLE_BLOCK, exponential, philox_bits

_BIG_ID: tl.constexpr = tl.constexpr(2147483647)  # "no id yet"; loses every lowest-id tie-break
RACE_BLOCK: tl.constexpr = tl.constexpr(256)  # ids per block of the race (= reference.RACE_BLOCK)


# ------------------------------------------------------------------------------------------------
# jit helpers shared with verify.py
# ------------------------------------------------------------------------------------------------


@triton.jit
def clean_logits(x):
    """To float32, NaN and +-inf become -inf (the reference's ``_clean``)."""
    x = x.to(tl.float32)
    return tl.where(tl.abs(x) < float("inf"), x, float("-inf"))


@triton.jit
def allowed(mask_row_ptr, offs, W):
    """Token bitmask: is id ``offs`` (>= 0, any shape) allowed by the W-word int32 row at
    ``mask_row_ptr`` (bit offs % 32 of word offs // 32)? Ids from 32 * W on are banned and no word
    >= W is read. Lanes of one word load the same address: one read per 32 ids."""
    word = offs // 32
    bits = tl.load(mask_row_ptr + word, mask=word < W, other=0)
    return ((bits >> (offs % 32)) & 1) != 0


@triton.jit
def ban(raw, mask_row_ptr, offs, W):
    """Cleaned float32 logits (``clean_logits``) with the ids the bitmask bans at -inf: applied
    right after a load, before anything else looks at the logits."""
    return tl.where(allowed(mask_row_ptr, offs, W), clean_logits(raw), float("-inf"))


@triton.jit
def exp2_scale(t):
    """c = log2(e) / T, so that exp((x - m) / T) = exp2((x - m) * c): the temperature is folded
    into one multiply per element, no division. Greedy rows (t <= 0) use T = 1 (only their argmax
    matters). Clamped to the largest float so that 0 * c stays 0 for a tiny T."""
    c = 1.4426950408889634 / tl.where(t <= 0, 1.0, t)
    return tl.minimum(c, 3.4028234663852886e38)


@triton.jit
def kept(x, thr):
    """Keep mask of cleaned raw logits: finite and >= the top-k/top-p threshold ``thr`` (-inf when
    no filtering). Dividing by T > 0 preserves order, so thresholds live on the raw logits and the
    comparison is exact (``filter_thresholds``)."""
    return (x > float("-inf")) & (x >= thr)


@triton.jit
def chunk_softmax_stats(row_ptr, V, tile_start, n_tiles, c, thr, mask_row_ptr, W, BLOCK_V: tl.constexpr,
                        WANT_RAW: tl.constexpr = False, HAS_MASK: tl.constexpr = False):
    """Softmax statistics of tiles [tile_start, tile_start + n_tiles) of one row of V logits.

    Returns (max of the kept raw logits, sum over kept of exp2((x - max) * c), max of the cleaned
    raw logits, lowest id reaching it, raw sum); (-inf, 0, -inf, _BIG_ID, 0) for an empty or all
    -inf chunk. One exp2 per element: the running max is the tile's (one reduction per tile), so
    rescaling the per-lane sums costs one exp2 per tile and a multiply per element. WANT_RAW
    (logprobs): the raw sum is the sum over finite x of exp(x - max of the cleaned raw logits),
    log-softmax's denominator at temperature 1, in the same sweep (one more exp2 per element);
    else 0. HAS_MASK: banned ids (bitmask row ``mask_row_ptr``, W words) are -inf from the load
    on, so every statistic above is over the allowed ids; with WANT_RAW it also returns the max
    and the sum of exp(x - max) over the unmasked finite logits (raw logprobs ignore the mask),
    else (-inf, 0) as the last two values."""
    lanes = tl.arange(0, BLOCK_V)
    m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), 0)  # running max of the kept logits (fp32 scalar)
    z = tl.zeros([BLOCK_V], tl.float32)  # per-lane sum of exp2((x - m) * c)
    a_val = tl.full([BLOCK_V], float("-inf"), tl.float32)
    a_idx = tl.full([BLOCK_V], _BIG_ID, tl.int32)
    mr = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), 0)  # WANT_RAW: running max of x
    zr = tl.zeros([BLOCK_V], tl.float32)  # WANT_RAW: per-lane sum of exp(x - mr)
    mu = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), 0)  # HAS_MASK, WANT_RAW: unmasked
    zu = tl.zeros([BLOCK_V], tl.float32)
    for i in range(n_tiles):
        offs = (tile_start + i) * BLOCK_V + lanes
        x = clean_logits(tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")))
        if HAS_MASK:
            if WANT_RAW:  # an entirely banned tile still counts here
                mu_new = tl.maximum(mu, tl.max(x, 0))
                mu_ref = tl.where(mu_new > float("-inf"), mu_new, 0.0)
                zu = zu * tl.math.exp2((mu - mu_ref) * 1.4426950408889634) + tl.math.exp2((x - mu_ref) * 1.4426950408889634)
                mu = mu_new
            x = tl.where(allowed(mask_row_ptr, offs, W), x, float("-inf"))
        xk = tl.where(kept(x, thr), x, float("-inf"))
        m_new = tl.maximum(m, tl.max(xk, 0))
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)  # avoids (-inf) - (-inf) = NaN
        z = z * tl.math.exp2((m - m_ref) * c) + tl.math.exp2((xk - m_ref) * c)
        m = m_new
        better = x > a_val  # strict: each lane keeps its lowest id on ties
        a_val = tl.where(better, x, a_val)
        a_idx = tl.where(better, offs, a_idx)
        if WANT_RAW:
            mr_new = tl.maximum(mr, tl.max(x, 0))
            mr_ref = tl.where(mr_new > float("-inf"), mr_new, 0.0)
            zr = zr * tl.math.exp2((mr - mr_ref) * 1.4426950408889634) + tl.math.exp2((x - mr_ref) * 1.4426950408889634)
            mr = mr_new
    row_max = m
    row_sum = tl.sum(z, 0)
    best = tl.max(a_val, 0)
    best_id = tl.min(tl.where(a_val == best, a_idx, _BIG_ID), 0)
    return row_max, row_sum, best, best_id, tl.sum(zr, 0), mu, tl.sum(zu, 0)


@triton.jit
def race_update(score, ids, best, best_id):
    """Per-lane exponential-race bookkeeping; strict > keeps the lowest id of a lane on ties."""
    better = score > best
    return tl.where(better, score, best), tl.where(better, ids, best_id)


@triton.jit
def race_winner(best, best_id):
    """(max score, lowest id reaching it) of per-lane (or per-split) race results."""
    top = tl.max(best, 0)
    return top, tl.min(tl.where(best == top, best_id, _BIG_ID), 0)


@triton.jit
def target_probs(raw, c, thr, row_max, row_sum):
    """p of raw logits (any float dtype, loaded with -inf where masked) given the row's statistics
    (max of the kept raw logits, softmax denominator; c = exp2_scale(T)), and the keep mask: p > 0
    exactly where kept in the float64 reference, so races use ``keep``, not a float32 p that may
    underflow."""
    x = clean_logits(raw)
    keep = kept(x, thr)
    return tl.where(keep, tl.math.exp2((x - row_max) * c) / row_sum, 0.0), keep


@triton.jit
def race_tile(block0, blk_end, V, TILE_BLOCKS: tl.constexpr):
    """Ids of the race blocks [block0, block0 + TILE_BLOCKS) ([TILE_BLOCKS] int32), their
    vocabulary ids ([TILE_BLOCKS, RACE_BLOCK] int32) and the load mask: ids < V of the blocks
    before ``blk_end`` (the end of the program's chunk; the next chunk belongs to another)."""
    blocks = block0 + tl.arange(0, TILE_BLOCKS)
    offs = blocks[:, None] * RACE_BLOCK + tl.arange(0, RACE_BLOCK)[None, :]
    return blocks, offs, offs < tl.minimum(V, blk_end * RACE_BLOCK)


@triton.jit
def race_in_block(weights, competes, offs, seed, offset, stream: tl.constexpr, position):
    """Second level of the race: argmax_j w_j / e_j over the entries that compete ([RACE_BLOCK]
    weights of one block, vocabulary ids ``offs``; e_j from ``stream``, index j), lowest id on
    ties. Returns the id (int32)."""
    e = exponential(philox_bits(seed, offset, stream, position, offs))
    _, winner = race_winner(tl.where(competes, weights / e, -1.0), offs)
    return winner


@triton.jit(do_not_specialize=["K", "tiles_per_split", "num_splits"])
def softmax_stats_kernel(
    logits_ptr,  # [B * (K+1), V] float logits, contiguous
    drafts_ptr,  # [B, K] int64 draft ids (K = 0: unused)
    temperature_ptr,  # [B] float32
    thr_ptr,  # [B * (K+1)] float32 top-k/top-p thresholds (HAS_THR)
    mask_ptr,  # [B * (K+1), W] int32 token bitmask (HAS_MASK)
    m_ptr, z_ptr, a_ptr, ai_ptr,  # [B * (K+1), num_splits] partial statistics (out)
    zr_ptr,  # [B * (K+1), num_splits] raw sums relative to the argmax value (out, WANT_RAW only)
    mu_ptr, zu_ptr,  # [B * (K+1), num_splits] unmasked max and sum (out, WANT_RAW and HAS_MASK)
    V, K, tiles_per_split, num_splits, W,
    HAS_THR: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    WANT_RAW: tl.constexpr = False, HAS_MASK: tl.constexpr = False,
):
    """Pass 1. grid = (B * (K+1), num_splits): program (row, split) reduces one vocabulary chunk
    of row = b * (K+1) + position. Verification skips positions after a row's last draft (the
    -1 tail): nothing downstream looks at them. HAS_MASK: the statistics are over the ids that
    row's bitmask allows (with WANT_RAW, zr is then the masked sum at temperature 1, the greedy
    rows' processed logprobs, and mu / zu the unmasked raw ones)."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = row // (K + 1)
    position = row % (K + 1)
    ks = tl.arange(0, BLOCK_K)
    drafts = tl.load(drafts_ptr + b * K + ks, mask=ks < K, other=0)
    n_drafts = tl.min(tl.where((ks < K) & (drafts == -1), ks, K), 0)

    c = exp2_scale(tl.load(temperature_ptr + b))
    thr = float("-inf")
    if HAS_THR:
        thr = tl.load(thr_ptr + row)
    tile_start = split * tiles_per_split
    n_tiles = tl.minimum(tiles_per_split, tl.cdiv(V, BLOCK_V) - tile_start)
    n_tiles = tl.where(position <= n_drafts, tl.maximum(n_tiles, 0), 0)

    row_max, row_sum, best, best_id, raw_sum, mu, zu = chunk_softmax_stats(
        logits_ptr + row.to(tl.int64) * V, V, tile_start, n_tiles, c, thr,
        mask_ptr + row.to(tl.int64) * W, W, BLOCK_V, WANT_RAW, HAS_MASK)
    out = row * num_splits + split
    if WANT_RAW:
        tl.store(zr_ptr + out, raw_sum)
        if HAS_MASK:
            tl.store(mu_ptr + out, mu)
            tl.store(zu_ptr + out, zu)
    tl.store(m_ptr + out, row_max)
    tl.store(z_ptr + out, row_sum)
    tl.store(a_ptr + out, best)
    tl.store(ai_ptr + out, best_id)


@triton.jit
def combine_row_stats(m_ptr, z_ptr, a_ptr, ai_ptr, row, num_splits, c, BLOCK_S: tl.constexpr):
    """Combine one row's pass-1 partials: (max, sum of exp2((x - max) * c), argmax value, argmax)."""
    sp = tl.arange(0, BLOCK_S)
    mask = sp < num_splits
    base = row * num_splits + sp
    m = tl.load(m_ptr + base, mask=mask, other=float("-inf"))
    z = tl.load(z_ptr + base, mask=mask, other=0.0)
    a = tl.load(a_ptr + base, mask=mask, other=float("-inf"))
    ai = tl.load(ai_ptr + base, mask=mask, other=_BIG_ID)
    row_max = tl.max(m, 0)
    ref = tl.where(row_max > float("-inf"), row_max, 0.0)
    row_sum = tl.sum(z * tl.math.exp2((m - ref) * c), 0)
    best, best_id = race_winner(a, ai)
    return row_max, row_sum, best, best_id


# ------------------------------------------------------------------------------------------------
# sample kernels
# ------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["K", "S1", "blocks_per_split", "S2"])
def _sample_probs_kernel(
    logits_ptr,  # [R, V] float logits, R = B * (K+1)
    temperature_ptr, seed_ptr, offset_ptr,  # [B] each
    thr_ptr,  # [R] float32 top-k/top-p thresholds (HAS_THR)
    mask_ptr,  # [R, W] int32 token bitmask (HAS_MASK)
    m_ptr, z_ptr, a_ptr, ai_ptr,  # [R, S1] pass-1 partials
    probs_ptr,  # [R, V] float32 (out, WRITE_PROBS)
    race_ptr, race_id_ptr,  # [R, S2] float32 / int32 chunk block-race winners (out)
    V, K, S1, blocks_per_split, S2, W,
    HAS_THR: tl.constexpr, WRITE_PROBS: tl.constexpr, BLOCK_S1: tl.constexpr,
    TILE_BLOCKS: tl.constexpr, HAS_MASK: tl.constexpr = False,
):
    """Pass 2. grid = (R, S2): program (row, split) writes probs for race blocks
    [split * blocks_per_split, ...) (WRITE_PROBS) and runs the block race over them (sampled rows
    only). Row = b * (K+1) + position draws with offset[b] + position (the sample op: K = 0);
    without WRITE_PROBS, rows with nothing to draw (greedy, no kept logit) read nothing."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = row // (K + 1)
    t = tl.load(temperature_ptr + b)
    greedy = t <= 0
    c = exp2_scale(t)
    row_max, row_sum, best, best_id = combine_row_stats(
        m_ptr, z_ptr, a_ptr, ai_ptr, row, S1, c, BLOCK_S1)
    row_ok = best > float("-inf")
    row_max = tl.where(row_ok, row_max, 0.0)  # rows without a kept logit: no (-inf) - (-inf)
    row_sum = tl.where(row_ok, row_sum, 1.0)  # ... and no 0 / 0
    thr = float("-inf")
    if HAS_THR:
        thr = tl.load(thr_ptr + row)
    seed = tl.load(seed_ptr + b)
    offset = tl.load(offset_ptr + b) + row % (K + 1)

    blk_start = split * blocks_per_split
    blk_end = tl.minimum(blk_start + blocks_per_split, tl.cdiv(V, RACE_BLOCK))
    n_tiles = tl.cdiv(tl.maximum(blk_end - blk_start, 0), TILE_BLOCKS)
    if not WRITE_PROBS:
        n_tiles = tl.where(row_ok & (t > 0), n_tiles, 0)
    row_off = row.to(tl.int64) * V
    race = tl.full([TILE_BLOCKS], float("-inf"), tl.float32)  # per-block-lane best score
    race_id = tl.full([TILE_BLOCKS], _BIG_ID, tl.int32)
    for i in range(n_tiles):
        blocks, offs, mask = race_tile(blk_start + i * TILE_BLOCKS, blk_end, V, TILE_BLOCKS)
        raw = tl.load(logits_ptr + row_off + offs, mask=mask, other=float("-inf"))
        if HAS_MASK:
            raw = ban(raw, mask_ptr + row.to(tl.int64) * W, offs, W)
        p, keep = target_probs(raw, c, thr, row_max, row_sum)
        if WRITE_PROBS:
            out = tl.where(greedy, tl.where(offs == best_id, 1.0, 0.0), p)
            tl.store(probs_ptr + row_off + offs, tl.where(row_ok, out, 0.0), mask=mask)
        if t <= 0:
            pass  # greedy rows need no Philox draws
        else:
            # one exponential per block; a block competes iff it keeps a token (W_b > 0)
            e = exponential(philox_bits(seed, offset, STREAM_SAMPLE_BLOCK, 0, blocks))
            has_mass = tl.max(keep.to(tl.int32), 1) > 0
            race, race_id = race_update(tl.where(has_mass, tl.sum(p, 1) / e, -1.0), blocks,
                                        race, race_id)
    top, top_id = race_winner(race, race_id)
    tl.store(race_ptr + row * S2 + split, top)
    tl.store(race_id_ptr + row * S2 + split, top_id)


@triton.jit(do_not_specialize=["K", "S1", "S2"])
def _sample_finish_kernel(
    logits_ptr,  # [R, V] float logits, R = B * (K+1)
    temperature_ptr, seed_ptr, offset_ptr,  # [B] each
    thr_ptr,  # [R] float32 (HAS_THR)
    mask_ptr,  # [R, W] int32 token bitmask (HAS_MASK)
    m_ptr, z_ptr, a_ptr, ai_ptr,  # [R, S1] pass-1 partials
    race_ptr, race_id_ptr,  # [R, S2] chunk block-race winners
    token_ptr,  # [R] int64 (out)
    V, K, S1, S2, W,
    HAS_THR: tl.constexpr, BLOCK_S1: tl.constexpr, BLOCK_S2: tl.constexpr,
    HAS_MASK: tl.constexpr = False,
):
    """grid = (R,): token = argmax (greedy), else the race inside the winning block (its 256
    logits re-read, p recomputed bit-identically to pass 2); -1 for a row without a finite logit."""
    row = tl.program_id(0)
    b = row // (K + 1)
    t = tl.load(temperature_ptr + b)
    c = exp2_scale(t)
    row_max, row_sum, best, best_id = combine_row_stats(
        m_ptr, z_ptr, a_ptr, ai_ptr, row, S1, c, BLOCK_S1)
    row_ok = best > float("-inf")
    token = best_id
    if (t > 0) & row_ok:  # both scalars; greedy rows and empty rows draw nothing
        sp = tl.arange(0, BLOCK_S2)
        mask = sp < S2
        _, block = race_winner(
            tl.load(race_ptr + row * S2 + sp, mask=mask, other=float("-inf")),
            tl.load(race_id_ptr + row * S2 + sp, mask=mask, other=_BIG_ID))
        thr = float("-inf")
        if HAS_THR:
            thr = tl.load(thr_ptr + row)
        offs = block * RACE_BLOCK + tl.arange(0, RACE_BLOCK)
        raw = tl.load(logits_ptr + row.to(tl.int64) * V + offs, mask=offs < V,
                      other=float("-inf"))
        if HAS_MASK:
            raw = ban(raw, mask_ptr + row.to(tl.int64) * W, offs, W)
        p, keep = target_probs(raw, c, thr, row_max, row_sum)
        token = race_in_block(p, keep, offs, tl.load(seed_ptr + b),
                              tl.load(offset_ptr + b) + row % (K + 1), STREAM_SAMPLE, 0)
    token = tl.where(row_ok, token, -1)
    tl.store(token_ptr + row, token.to(tl.int64))


# ------------------------------------------------------------------------------------------------
# host side
# ------------------------------------------------------------------------------------------------


def filter_thresholds(logits, temperature, top_k, top_p, group: int = 1, token_bitmask=None):
    """Per-row keep threshold on the raw logits for top-k then top-p, or None if both are None:
    ``specdec.kernels.thresholds.filter_thresholds`` (a Triton search, no sort; shapes there).
    Row n of logits [N, V] uses the parameters at n // group and the bitmask row n of
    token_bitmask [N, W] (or None). Imported at call time: that module uses this one's jit helpers."""
    from specdec.kernels import thresholds

    return thresholds.filter_thresholds(logits, temperature, top_k, top_p, group,
                                        token_bitmask=token_bitmask)


def mask_args(token_bitmask, placeholder):
    """(pointer, W) kernel arguments for a token bitmask [..., W] int32 (contiguous, one row per
    logit row) or None: then ``placeholder`` (any tensor, never read) and W = 1."""
    if token_bitmask is None:
        return placeholder, 1
    return token_bitmask, token_bitmask.shape[-1]


_SM_COUNT = {}
# Pass 1 (75 registers x 256 threads) fits 3 programs per SM; aim for 2 waves of them, and split a
# row's vocabulary over programs whenever the rows alone would give fewer.
PROGRAMS_PER_SM = 3
WAVES = 2
MIN_BLOCK_S = 16  # partial-result tiles are at least this wide: fewer compiled variants


def _sm_count(device: torch.device):
    """Streaming multiprocessors of a CUDA device; None elsewhere (the interpreter runs programs
    one after another, so splitting a row buys nothing there)."""
    if device.type != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def num_splits_for(rows: int, n_tiles: int, device: torch.device) -> int:
    """How many programs share a row's vocabulary: enough for WAVES waves of PROGRAMS_PER_SM
    programs per SM when the rows alone do not fill them; at most one tile per program."""
    sms = _sm_count(device)
    if sms is None:
        return 1
    target = WAVES * PROGRAMS_PER_SM * sms
    return max(1, min(n_tiles, -(-target // max(rows, 1))))


def _block_s(splits: int) -> int:
    """Width of the tile that loads a row's per-split partials: a power of two >= MIN_BLOCK_S
    (bucketed: the split count changes with the batch, the compiled kernel need not)."""
    return max(MIN_BLOCK_S, triton.next_power_of_2(splits))


def split_plan(V: int, rows: int, device, block_v=None, num_splits=None):
    """(BLOCK_V, tiles_per_split, num_splits, BLOCK_S, num_warps) for rows of V logits."""
    BLOCK_V = block_v or min(2048, triton.next_power_of_2(max(V, 16)))
    n_tiles = triton.cdiv(V, BLOCK_V)
    splits = num_splits or num_splits_for(rows, n_tiles, device)
    tiles_per_split = triton.cdiv(n_tiles, max(1, min(splits, n_tiles)))
    splits = triton.cdiv(n_tiles, tiles_per_split)  # no empty split
    num_warps = 8 if BLOCK_V >= 2048 else 4
    return BLOCK_V, tiles_per_split, splits, _block_s(splits), num_warps


def race_plan(V: int, rows: int, device, block_v=None, num_splits=None):
    """(blocks_per_split, num_splits, BLOCK_S, TILE_BLOCKS, num_warps) of a race pass over rows
    of V ids. Splits own whole race blocks; a tile is TILE_BLOCKS whole blocks, about as wide as
    the stats pass's tile (``block_v``, default up to 2048 ids); a split smaller than a tile masks
    the rest (one compiled variant whatever the batch)."""
    race_block = RACE_BLOCK.value
    n_blocks = triton.cdiv(V, race_block)
    width = block_v or min(2048, triton.next_power_of_2(max(V, 16)))
    tile_blocks = max(1, width // race_block)
    # by default a split gets at least a full tile: more, smaller programs would each redo the
    # row's setup (in verify: combining the partials and the acceptance tests)
    splits = num_splits or num_splits_for(rows, triton.cdiv(n_blocks, tile_blocks), device)
    blocks_per_split = triton.cdiv(n_blocks, max(1, min(splits, n_blocks)))
    splits = triton.cdiv(n_blocks, blocks_per_split)  # no empty split
    num_warps = 8 if tile_blocks * race_block >= 2048 else 4
    return blocks_per_split, splits, _block_s(splits), tile_blocks, num_warps


def raw_sums_buffer(rows: int, S1: int, device, return_logprobs: bool, has_mask: bool):
    """Pass 1's extra outputs for logprobs: None without return_logprobs, else [1, rows, S1]
    float32 (the raw sums), or [3, rows, S1] with a bitmask (the masked sums at temperature 1,
    then the unmasked max and sum): ``softmax_stats_kernel``'s zr / mu / zu."""
    if not return_logprobs:
        return None
    return torch.empty((3 if has_mask else 1, rows, S1), dtype=torch.float32, device=device)


def raw_sum_ptrs(raw_sums, placeholder):
    """``softmax_stats_kernel``'s (zr, mu, zu) arguments from ``raw_sums_buffer``'s tensor;
    ``placeholder`` (never written: no WANT_RAW) for what it lacks."""
    if raw_sums is None:
        return placeholder, placeholder, placeholder
    return tuple(raw_sums[i % raw_sums.shape[0]] for i in range(3))


def block_k(k: int) -> int:
    """Width of a tile over K draft positions: a power of two >= 8 (bucketed, as _block_s)."""
    return max(8, triton.next_power_of_2(max(k, 1)))


def race_rows(logits, temperature, thr, seed, offset, stats, stats_id, K, tokens, probs,
              block_v=None, num_splits=None, token_bitmask=None):
    """Passes 2 and 3 over R = B * (K+1) rows of V logits whose pass-1 partials ``stats`` [3, R,
    S1] / ``stats_id`` [R, S1] are computed: row b * (K+1) + j draws a token from p with the sample
    op's numbers and counter offset ``offset[b] + j``. logits [R, V]; temperature, seed, offset
    [B]; thr [R] float32 or None. Writes tokens [R] int64 and, unless ``probs`` is None, probs
    [R, V] float32. token_bitmask [R, W] int32 or None: row r's allowed ids (pass 1 must have
    used the same). Verification without draft probabilities draws its own tokens here."""
    R, V = logits.shape
    dev = logits.device
    S1 = stats.shape[2]
    thr_arg = thr if thr is not None else temperature  # placeholder pointer, never read
    blocks_per_split, S2, BLOCK_S2, TILE_BLOCKS, warps2 = race_plan(V, R, dev, block_v, num_splits)
    race = torch.empty((R, S2), dtype=torch.float32, device=dev)
    race_id = torch.empty((R, S2), dtype=torch.int32, device=dev)
    BLOCK_S1 = _block_s(S1)
    mask, W = mask_args(token_bitmask, stats_id)
    _sample_probs_kernel[(R, S2)](
        logits, temperature, seed, offset, thr_arg, mask, stats[0], stats[1], stats[2], stats_id,
        probs if probs is not None else race, race, race_id, V, K, S1, blocks_per_split, S2, W,
        HAS_THR=thr is not None, WRITE_PROBS=probs is not None, BLOCK_S1=BLOCK_S1,
        TILE_BLOCKS=TILE_BLOCKS, HAS_MASK=token_bitmask is not None, num_warps=warps2)
    # the race inside the winning block
    _sample_finish_kernel[(R,)](
        logits, temperature, seed, offset, thr_arg, mask, stats[0], stats[1], stats[2], stats_id,
        race, race_id, tokens, V, K, S1, S2, W,
        HAS_THR=thr is not None, BLOCK_S1=BLOCK_S1, BLOCK_S2=BLOCK_S2,
        HAS_MASK=token_bitmask is not None, num_warps=4)
    return tokens


def sample(logits, temperature, top_k, top_p, seed, offset, *, block_v=None, num_splits=None,
           return_logprobs=False, token_bitmask=None):
    """Fused sampling (Triton). Same contract as ``specdec.reference.sample``.

    logits [B, V] float32/float16/bfloat16; temperature [B] float32 (<= 0: greedy row); top_k [B]
    int64 (0 = off) or None; top_p [B] float32 (1.0 = off) or None; seed, offset [B] int64; all on
    one device; token_bitmask [B, W] int32 (contiguous, W >= 1) or None: row b samples from its
    allowed ids only (``specdec.reference.allowed_ids``), banned ids read as -inf before anything
    else. ``block_v`` / ``num_splits`` override the tiling (tests, tuning): the tile width (the
    race pass rounds it down to whole 256-id race blocks, at least one) and the programs per row,
    of both passes.
    Returns (token_ids [B] int64, probs [B, V] float32), and with ``return_logprobs`` also
    (processed_logprobs, raw_logprobs) [B] float32 (``logprobs.token_logprobs``).
    """
    B, V = logits.shape
    dev = logits.device
    tokens = torch.empty((B,), dtype=torch.int64, device=dev)  # every entry written
    if B == 0 or V == 0:
        tokens.fill_(-1)
        probs = torch.zeros((B, V), dtype=torch.float32, device=dev)
        if not return_logprobs:
            return tokens, probs
        lp = torch.full((B,), float("-inf"), device=dev)
        return tokens, probs, lp, lp.clone()
    logits = logits.contiguous()
    temperature = temperature.to(torch.float32).contiguous()
    seed = seed.to(torch.int64).contiguous()
    offset = offset.to(torch.int64).contiguous()
    if token_bitmask is not None:
        token_bitmask = token_bitmask.contiguous()  # one W-word row per logit row
    thr = filter_thresholds(logits, temperature, top_k, top_p, token_bitmask=token_bitmask)
    thr_arg = thr if thr is not None else temperature  # placeholder pointer, never read
    no_drafts = seed  # K = 0: never read
    has_mask = token_bitmask is not None

    # pass 1: softmax statistics over (row, vocabulary split)
    BLOCK_V, tiles_per_split, S1, BLOCK_S1, warps1 = split_plan(V, B, dev, block_v, num_splits)
    stats = torch.empty((3, B, S1), dtype=torch.float32, device=dev)  # max, sum, argmax value
    stats_id = torch.empty((B, S1), dtype=torch.int32, device=dev)
    raw_sums = raw_sums_buffer(B, S1, dev, return_logprobs, has_mask)
    mask, W = mask_args(token_bitmask, stats_id)
    softmax_stats_kernel[(B, S1)](
        logits, no_drafts, temperature, thr_arg, mask, stats[0], stats[1], stats[2], stats_id,
        *raw_sum_ptrs(raw_sums, stats[1]), V, 0, tiles_per_split, S1, W,
        HAS_THR=thr is not None, BLOCK_K=1, BLOCK_V=BLOCK_V, num_warps=warps1, WANT_RAW=return_logprobs,
        HAS_MASK=has_mask)

    probs = torch.empty((B, V), dtype=torch.float32, device=dev)  # every entry written
    race_rows(logits, temperature, thr, seed, offset, stats, stats_id, 0, tokens, probs,
              block_v, num_splits, token_bitmask)
    if not return_logprobs:
        return tokens, probs
    from specdec.kernels.logprobs import token_logprobs

    source = torch.zeros((B, 1), dtype=torch.int64, device=dev)
    processed, raw = token_logprobs(logits, tokens[:, None], source, temperature, thr, stats, raw_sums,
                                    token_bitmask)
    return tokens, probs, processed.view(B), raw.view(B)
