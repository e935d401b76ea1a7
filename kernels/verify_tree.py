"""Exact tree verification (``specdec.ops.verify_tree``) in Triton.

What it computes is ``specdec.reference.verify_tree`` (the specification): a walk per row from the
root down the accepted path; at the current node v (depth j, counter offset + j) v's valid children
are tried in index order: greedy rows accept the first child equal to the argmax; without draft
probabilities sampled rows accept the first child equal to the target's own sample at v (the sample
op's two-level race); with draft probabilities child r is accepted with probability
min(1, p_cur(x) / q(x)) (Philox ``STREAM_ACCEPT``, index r) and each rejection replaces p_cur by
norm(max(0, p_cur - q)) (kept as it was if that has no mass). A node where nothing is accepted
emits one token: the argmax, the own sample, a race over p_cur (``STREAM_RESAMPLE*``) after
rejections, or the bonus (the own sample) when it has no children.

Kernels (B rows, N nodes, N+1 logit rows per batch row, Vt vocabulary):
  1. ``softmax_stats_kernel`` (from sample.py), grid (B*(N+1), S1): every node's logits are read
     once (split over S1 programs when B*(N+1) alone would not fill the GPU); partial (max, sum of
     exp, argmax value, argmax id) per chunk. Per-(row, node) temperatures (a repeat of the [B]
     tensor on the device) since a row here is a (batch row, node) pair.
  2. ``_tree_walk_kernel``, grid (B,): one program per batch row. It derives the tree's valid
     nodes and depths from the parents (``reference.tree_structure``), then walks: combines the
     current node's pass-1 partials, finds its children, and streams that node's vocabulary only
     when a race is needed (the own sample; with draft probabilities, one residual pass per
     rejected child, written to a [B, 2, Vt] float32 scratch double buffer, then the final race
     over it). Only the nodes on the walked path are read again.
Nothing synchronises with the host; the output shapes are static ([B, D+1], [B], [B, D]).

Top-k / top-p: thresholds per (row, node) from ``sample.filter_thresholds`` (a Triton search
reading each row's parameters at row // (N+1)), only when the caller passes top_k / top_p.

Token bitmask (``token_bitmask`` [B, N+1, W], HAS_MASK): every load of a node's logits goes through
``sample.ban``, so banned ids are -inf before the statistics, thresholds, p(child) and races.
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
    clean_logits,
    combine_row_stats,
    exp2_scale,
    filter_thresholds,
    race_in_block,
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
def _weights(row_ptr, buf_ptr, use_buf, offs, Vt, c, thr, row_max, row_sum, mask_row_ptr, W,
             HAS_MASK: tl.constexpr):
    """Race weights at vocabulary ids ``offs`` and whether each competes: p of the node's logits
    (use_buf == 0; competes = kept; HAS_MASK: banned ids -inf) or the residual buffer's values
    (competes = > 0). Only one of the two is read: the other load is masked off entirely."""
    lim_logits = tl.where(use_buf != 0, 0, Vt)
    lim_buf = tl.where(use_buf != 0, Vt, 0)
    raw = tl.load(row_ptr + offs, mask=offs < lim_logits, other=float("-inf"))
    if HAS_MASK:
        raw = ban(raw, mask_row_ptr, offs, W)
    p, keep = target_probs(raw, c, thr, row_max, row_sum)
    bw = tl.load(buf_ptr + offs, mask=offs < lim_buf, other=0.0)
    w = tl.where(use_buf != 0, bw, p)
    competes = tl.where(use_buf != 0, bw > 0, keep)
    return w, competes


@triton.jit
def _race_node(row_ptr, buf_ptr, use_buf, c, thr, row_max, row_sum, seed, off, Vt, mask_row_ptr, W,
               stream: tl.constexpr, block_stream: tl.constexpr, TILE_BLOCKS: tl.constexpr,
               HAS_MASK: tl.constexpr):
    """The two-level race (reference._race) over one node's weights (``_weights``): the block
    race over all race blocks on ``block_stream``, then the race inside the winning block on
    ``stream``; counter offset ``off``. Returns the token (int32)."""
    n_blocks = tl.cdiv(Vt, RACE_BLOCK)
    best = tl.full([TILE_BLOCKS], float("-inf"), tl.float32)
    best_id = tl.full([TILE_BLOCKS], _BIG_ID, tl.int32)
    for i in range(tl.cdiv(n_blocks, TILE_BLOCKS)):
        blocks, offs, _ = race_tile(i * TILE_BLOCKS, n_blocks, Vt, TILE_BLOCKS)
        w, competes = _weights(row_ptr, buf_ptr, use_buf, offs, Vt, c, thr, row_max, row_sum,
                               mask_row_ptr, W, HAS_MASK)
        e = exponential(philox_bits(seed, off, block_stream, 0, blocks))
        has = tl.max(competes.to(tl.int32), 1) > 0  # W_b > 0 in the reference
        best, best_id = race_update(tl.where(has, tl.sum(w, 1) / e, -1.0), blocks, best, best_id)
    _, blk = race_winner(best, best_id)
    offs = blk * RACE_BLOCK + tl.arange(0, RACE_BLOCK)
    w, competes = _weights(row_ptr, buf_ptr, use_buf, offs, Vt, c, thr, row_max, row_sum,
                           mask_row_ptr, W, HAS_MASK)
    return race_in_block(w, competes, offs, seed, off, stream, 0)


@triton.jit
def _residual_pass(row_ptr, src_ptr, use_src, scale, q_row_ptr, Vd, dst_ptr, Vt, c, thr,
                   row_max, row_sum, mask_row_ptr, W, BLOCK_V: tl.constexpr, HAS_MASK: tl.constexpr):
    """dst = max(0, p_cur - q) over the vocabulary, p_cur = p of the node's logits (use_src == 0)
    or src * scale; q = 0 at ids >= Vd. Returns the residual's mass (float32)."""
    mass = tl.zeros([BLOCK_V], tl.float32)
    lim_logits = tl.where(use_src != 0, 0, Vt)
    lim_src = tl.where(use_src != 0, Vt, 0)
    for i in range(tl.cdiv(Vt, BLOCK_V)):
        offs = i * BLOCK_V + tl.arange(0, BLOCK_V)
        raw = tl.load(row_ptr + offs, mask=offs < lim_logits, other=float("-inf"))
        if HAS_MASK:
            raw = ban(raw, mask_row_ptr, offs, W)
        p, _ = target_probs(raw, c, thr, row_max, row_sum)
        s = tl.load(src_ptr + offs, mask=offs < lim_src, other=0.0) * scale
        p_cur = tl.where(use_src != 0, s, p)
        q = tl.load(q_row_ptr + offs, mask=offs < Vd, other=0.0).to(tl.float32)
        q = tl.where(q == q, q, 0.0)  # NaN counts as 0 (reference._draft_q)
        r = tl.where(offs < Vt, tl.maximum(p_cur - q, 0.0), 0.0)
        tl.store(dst_ptr + offs, r, mask=offs < Vt)
        mass += r
    return tl.sum(mass, 0)


@triton.jit
def _tree_walk_kernel(
    logits_ptr,  # [B, N+1, Vt] float target logits
    tok_ptr, par_ptr,  # [B, N] int64 node tokens / parents
    q_ptr,  # [B, N, Vd] float draft probabilities (HAS_Q)
    temperature_ptr, seed_ptr, offset_ptr,  # [B]
    thr_ptr,  # [B * (N+1)] float32 top-k/top-p thresholds (HAS_THR)
    mask_ptr,  # [B * (N+1), W] int32 token bitmask (HAS_MASK)
    m_ptr, z_ptr, a_ptr, ai_ptr,  # [B * (N+1), S1] pass-1 partials
    scratch_ptr,  # [B, 2, Vt] float32 residual double buffer (HAS_Q)
    out_ptr,  # [B, D+1] int64 (out)
    num_acc_ptr,  # [B] int32 (out)
    nodes_ptr,  # [B, D] int64 (out)
    N, Vt, Vd, S1, D, W,
    HAS_Q: tl.constexpr, HAS_THR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_S1: tl.constexpr, TILE_BLOCKS: tl.constexpr, HAS_MASK: tl.constexpr = False,
):
    # (Interpreter caveat, triton 3.8: a scalar condition combined with a block by & or | is
    # broadcast as float32; such conditions go through nested tl.where instead.)
    b = tl.program_id(0)
    N1 = N + 1
    t = tl.load(temperature_ptr + b)
    c = exp2_scale(t)
    sampled = t > 0
    seed = tl.load(seed_ptr + b)
    offset = tl.load(offset_ptr + b)

    # ---- the tree: valid nodes and their depths (reference.tree_structure) --------------------
    idx = tl.arange(0, BLOCK_N)
    tok = tl.load(tok_ptr + b * N + idx, mask=idx < N, other=-1)
    par = tl.load(par_ptr + b * N + idx, mask=idx < N, other=-2)
    depth = tl.zeros([BLOCK_N], tl.int32)  # 0 = not a valid node
    for i in range(N):
        p_i = tl.sum(tl.where(idx == i, par, 0), 0)
        t_i = tl.sum(tl.where(idx == i, tok, 0), 0)
        # the parent's depth; 0 if it is invalid, not before i, or not a node index at all
        dp = tl.sum(tl.where(idx == p_i, depth, 0), 0)
        d = tl.where(p_i == -1, 1, tl.where(dp > 0, dp + 1, 0))
        d = tl.where(t_i != -1, tl.where(d <= D, d, 0), 0)
        depth = tl.where(idx == i, d, depth)

    # ---- the walk ------------------------------------------------------------------------------
    kk = tl.arange(0, BLOCK_D)
    path_nodes = tl.full([BLOCK_D], -1, tl.int64)
    path_toks = tl.full([BLOCK_D], -1, tl.int64)
    zero = b * 0
    cur = zero - 1  # the current node, -1 = the root
    n = zero  # nodes accepted so far = the current node's depth
    token = (zero - 1).to(tl.int64)
    void = zero
    live = zero + 1
    buf0 = scratch_ptr + (b * 2).to(tl.int64) * Vt
    while live != 0:
        row = b * N1 + cur + 1
        row_max, row_sum, best, best_id = combine_row_stats(m_ptr, z_ptr, a_ptr, ai_ptr, row, S1, c,
                                                            BLOCK_S1)
        finite = best > float("-inf")
        row_max = tl.where(finite, row_max, 0.0)
        row_sum = tl.where(row_sum > 0, row_sum, 1.0)
        thr = float("-inf")
        if HAS_THR:
            thr = tl.load(thr_ptr + row)
        off = offset + n
        row_ptr = logits_ptr + row.to(tl.int64) * Vt
        mask_row_ptr = mask_ptr + row.to(tl.int64) * W
        is_child = (depth > 0) & (par == cur)
        has_child = tl.max(is_child.to(tl.int32), 0) > 0

        # the target's token: argmax (greedy), or its own sample (sample and compare; with draft
        # probabilities only for the bonus of a node without children)
        target = best_id
        need_own = finite & sampled
        if HAS_Q:
            need_own = need_own & (has_child == 0)
        if need_own:
            target = _race_node(row_ptr, buf0, 0, c, thr, row_max, row_sum, seed, off, Vt,
                                mask_row_ptr, W, STREAM_SAMPLE, STREAM_SAMPLE_BLOCK, TILE_BLOCKS,
                                HAS_MASK)
        match = is_child & (tok >= 0) & (tok < Vd) & (tok == target)
        first = tl.min(tl.where(match, idx, _BIG_ID), 0)
        accepted = tl.where(first < N, first, -1)
        emit = target

        if HAS_Q:
            if finite & sampled & has_child:
                # recursive rejection sampling over the children, in index order
                which = zero - 1  # buffer holding p_cur (unnormalised); -1: p_cur = p_v
                scale = row_sum * 0.0 + 1.0  # p_cur = buffer * scale
                rank = zero
                acc_q = zero - 1
                for i in range(N):
                    c_i = tl.max(tl.where(idx == i, is_child.to(tl.int32), 0), 0)
                    if (c_i != 0) & (acc_q < 0):
                        d = tl.sum(tl.where(idx == i, tok, 0), 0)
                        in_range = (d >= 0) & (d < Vd)
                        safe = tl.where(in_range, d, 0)
                        x = clean_logits(tl.load(row_ptr + safe, mask=in_range, other=float("-inf")))
                        if HAS_MASK:  # a banned child: p = 0, rejected
                            x = ban(x, mask_row_ptr, safe, W)
                        keep_x = kept(x, thr)
                        p_logit = tl.where(keep_x, tl.math.exp2((x - row_max) * c) / row_sum, 0.0)
                        cur_buf = buf0 + tl.maximum(which, 0).to(tl.int64) * Vt
                        p_buf = tl.load(cur_buf + safe, mask=in_range & (which >= 0), other=0.0) * scale
                        p = tl.where(which >= 0, p_buf, p_logit)
                        positive = tl.where(which >= 0, p_buf > 0, keep_x)
                        qd = tl.load(q_ptr + (b * N + i).to(tl.int64) * Vd + safe, mask=in_range,
                                     other=0.0).to(tl.float32)
                        qd = tl.where(qd == qd, qd, 0.0)  # NaN counts as 0
                        u = uniform_open_closed(philox_bits(seed, off, STREAM_ACCEPT, 0, rank))
                        rank += 1
                        if in_range & positive & (u * qd <= p):
                            acc_q = zero + i
                        elif in_range:
                            # p_cur <- max(0, p_cur - q) into the other buffer, kept if it has mass
                            dst = tl.where(which < 0, 0, 1 - which)
                            mass = _residual_pass(row_ptr, cur_buf, (which >= 0).to(tl.int32), scale,
                                                  q_ptr + (b * N + i).to(tl.int64) * Vd, Vd,
                                                  buf0 + dst.to(tl.int64) * Vt, Vt, c, thr,
                                                  row_max, row_sum, mask_row_ptr, W,
                                                  TILE_BLOCKS * RACE_BLOCK, HAS_MASK)
                            tl.debug_barrier()  # the buffer is read back by other threads
                            if mass > 0:
                                which = dst
                                scale = 1.0 / mass
                accepted = acc_q
                if acc_q < 0:
                    if which < 0:  # every rejection left p_cur = p_v
                        emit = _race_node(row_ptr, buf0, 0, c, thr, row_max, row_sum, seed, off,
                                          Vt, mask_row_ptr, W, STREAM_RESAMPLE, STREAM_RESAMPLE_BLOCK,
                                          TILE_BLOCKS, HAS_MASK)
                    else:
                        emit = _race_node(row_ptr, buf0 + which.to(tl.int64) * Vt, 1, c, thr,
                                          row_max, row_sum, seed, off, Vt, mask_row_ptr, W,
                                          STREAM_RESAMPLE, STREAM_RESAMPLE_BLOCK, TILE_BLOCKS,
                                          HAS_MASK)

        go = finite & (accepted >= 0)
        acc_tok = tl.sum(tl.where(idx == accepted, tok, 0), 0)
        path_nodes = tl.where(go, tl.where(kk == n, accepted.to(tl.int64), path_nodes), path_nodes)
        path_toks = tl.where(go, tl.where(kk == n, acc_tok, path_toks), path_toks)
        token = tl.where(go, token, emit.to(tl.int64))
        void = tl.where(finite, void, 1)
        cur = tl.where(go, accepted, cur)
        n = tl.where(go, n + 1, n)
        live = tl.where(go, 1, 0)

    # ---- outputs ---------------------------------------------------------------------------------
    ids = tl.where(kk < n, path_toks, tl.where(kk == n, token, -1))
    ids = tl.where(void != 0, -1, ids)
    nodes = tl.where(kk < n, path_nodes, -1)
    nodes = tl.where(void != 0, -1, nodes)
    tl.store(out_ptr + b * (D + 1) + kk, ids, mask=kk < D + 1)
    tl.store(nodes_ptr + b * D + kk, nodes, mask=kk < D)
    tl.store(num_acc_ptr + b, tl.where(void != 0, 0, n))


def verify_tree(target_logits, tree_token_ids, tree_parents, draft_probs, temperature, top_k, top_p,
                seed, offset, max_depth, *, block_v=None, num_splits=None, return_logprobs=False,
                token_bitmask=None):
    """Tree verification (Triton). Same contract as ``specdec.reference.verify_tree``.

    target_logits [B, N+1, Vt] float32/float16/bfloat16; tree_token_ids, tree_parents [B, N] int
    (-1 token = unused slot; -1 parent = the root); draft_probs [B, N, Vd] float (Vd <= Vt) or
    None; temperature [B] float32 (<= 0: greedy row); top_k [B] int64 or None; top_p [B] float32
    or None; seed, offset [B] int64; max_depth D (int); token_bitmask [B, N+1, W] int32 (W >= 1)
    or None: the allowed ids at the root and at each node (``specdec.reference.allowed_ids``);
    all tensors on one device.
    Returns (output_ids [B, D+1] int64, num_accepted [B] int32, accepted_nodes [B, D] int64), and
    with ``return_logprobs`` also (processed_logprobs, raw_logprobs) [B, D+1] float32
    (``logprobs.token_logprobs`` from pass 1's statistics of the walked nodes).
    """
    B, N1, Vt = target_logits.shape
    N = N1 - 1
    D = int(max_depth)
    dev = target_logits.device
    out = torch.empty((B, D + 1), dtype=torch.int64, device=dev)  # every entry written
    num_acc = torch.empty((B,), dtype=torch.int32, device=dev)
    nodes = torch.empty((B, D), dtype=torch.int64, device=dev)
    if B == 0:
        if not return_logprobs:
            return out, num_acc, nodes
        lp = torch.empty((B, D + 1), dtype=torch.float32, device=dev)
        return out, num_acc, nodes, lp, lp.clone()
    logits = target_logits.contiguous()
    temperature = temperature.to(torch.float32).contiguous()
    seed = seed.to(torch.int64).contiguous()
    offset = offset.to(torch.int64).contiguous()
    tokens = tree_token_ids.to(torch.int64).contiguous()
    parents = tree_parents.to(torch.int64).contiguous()
    has_q = draft_probs is not None
    Vd = draft_probs.shape[-1] if has_q else Vt
    q = draft_probs.contiguous() if has_q and draft_probs.numel() > 0 else logits  # placeholder
    rows = B * N1
    temp_rows = temperature.repeat_interleave(N1)  # per (row, node): pass 1 runs with K = 0
    has_mask = token_bitmask is not None
    bitmask = token_bitmask.reshape(rows, -1).contiguous() if has_mask else None  # one row per node
    thr = None
    if top_k is not None or top_p is not None:
        thr = filter_thresholds(logits.view(rows, Vt), temperature, top_k, top_p, group=N1,
                                token_bitmask=bitmask)
    thr_arg = thr if thr is not None else temperature  # placeholder pointer, never read
    tok_arg = tokens if N > 0 else seed  # N = 0: never read, but valid pointers
    par_arg = parents if N > 0 else seed

    # pass 1: every node's softmax statistics over (row * node, vocabulary split)
    BLOCK_V, tps1, S1, BLOCK_S1, warps1 = split_plan(Vt, rows, dev, block_v, num_splits)
    stats = torch.empty((3, rows, S1), dtype=torch.float32, device=dev)
    stats_id = torch.empty((rows, S1), dtype=torch.int32, device=dev)
    raw_sums = raw_sums_buffer(rows, S1, dev, return_logprobs, has_mask)
    mask, W = mask_args(bitmask, stats_id)
    softmax_stats_kernel[(rows, S1)](
        logits, seed, temp_rows, thr_arg, mask, stats[0], stats[1], stats[2], stats_id,
        *raw_sum_ptrs(raw_sums, stats[1]), Vt, 0, tps1, S1, W,
        HAS_THR=thr is not None, BLOCK_K=1, BLOCK_V=BLOCK_V, num_warps=warps1, WANT_RAW=return_logprobs,
        HAS_MASK=has_mask)

    # pass 2: the walk, one program per row
    width = block_v or min(2048, triton.next_power_of_2(max(Vt, 16)))
    tile_blocks = max(1, min(width // RACE_BLOCK.value, triton.next_power_of_2(triton.cdiv(Vt, RACE_BLOCK.value))))
    scratch = torch.empty((B, 2, Vt), dtype=torch.float32, device=dev) if has_q else stats[0]
    nodes_arg = nodes if D > 0 else out  # D = 0: never written, but a valid pointer
    _tree_walk_kernel[(B,)](
        logits, tok_arg, par_arg, q, temperature, seed, offset, thr_arg, mask,
        stats[0], stats[1], stats[2], stats_id, scratch, out, num_acc, nodes_arg,
        N, Vt, Vd, S1, D, W,
        HAS_Q=has_q, HAS_THR=thr is not None, BLOCK_N=triton.next_power_of_2(max(N, 1)),
        BLOCK_D=triton.next_power_of_2(D + 1), BLOCK_S1=BLOCK_S1, TILE_BLOCKS=tile_blocks,
        HAS_MASK=has_mask, num_warps=8 if tile_blocks * RACE_BLOCK.value >= 2048 else 4)
    if not return_logprobs:
        return out, num_acc, nodes
    from specdec.kernels.logprobs import token_logprobs
    from specdec.reference import tree_source_positions

    # slot j was drawn at the root (j = 0) or at the (j-1)-th accepted node
    return (out, num_acc, nodes, *token_logprobs(logits.view(rows, Vt), out, tree_source_positions(nodes),
                                                 temperature, thr, stats, raw_sums, bitmask))
