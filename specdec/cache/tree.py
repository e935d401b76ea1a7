# Holds: tree steps: tree_ancestors, compact_tree_, RaggedCache's tree positions/mask/compaction (_TreeSteps).
# May use: torch, .store, .store_ops.
"""Tree steps of the ragged KV cache: ancestor closure (for masks and positions) and compaction of the accepted path."""
from __future__ import annotations

import torch

from specdec.cache.store import _as_index, _host_copy
from specdec.cache.store_ops import gather_


class _TreeSteps:
    """The tree-step methods of :class:`specdec.cache.RaggedCache` (its base class; they use its ``store``,
    ``start``, ``sliding_window`` and ``_mask``)."""

    # A tree step feeds, per row, ``[root, node 0, ..., node N-1]`` (q = N + 1 positions): the root is the
    # pending token (the last emitted one, not yet in the cache), node i a drafted token whose parent is
    # ``tree_parents[b, i]`` (-1 = the root). The step's slots are ``lengths[b] + t`` with ``t = 0`` the root
    # and ``t = i + 1`` node i. After verification, :meth:`compact_tree` keeps the root and the accepted path.

    def _remember_tree_step(self, num_nodes: int) -> None:
        # what compact_tree needs to know about the step, on the host (no device reads)
        self._tree_step = (int(num_nodes), self.store.host_lengths.clone())

    def tree_position_ids(self, tree_parents: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, N+1]`` int64 position ids of a tree step ``[root, node 0, ..., node N-1]``.

        The root sits at ``lengths[b] - start[b]`` (like ``position_ids(1)``), node ``i`` at the root's
        position ``+ 1 + depth(i)`` (depth 0 = a child of the root): each token gets the position it
        would have in its root-to-node path. Unused nodes (``valid[b, i]`` False) get the root's position
        (any position would do: they are masked).

        Args:
            tree_parents: ``[B, N]`` int32/int64 on the cache's device, ``tree_parents[b, i]`` in
                ``[-1, i)`` (-1 = child of the root); see :func:`tree_ancestors` for other values.
            valid: ``[B, N]`` bool, False for unused slots (``tree_token_ids == -1``); None = all used.
        No host synchronisation.
        """
        anc = tree_ancestors(tree_parents.to(self.store.device), valid)
        self._remember_tree_step(anc.shape[1] - 1)
        return self._tree_positions(anc)

    def _tree_positions(self, anc: torch.Tensor) -> torch.Tensor:
        # number of ancestors (root included, self excluded) = depth + 1 for a node, 0 for the root
        return (self.store.lengths - self.start).long()[:, None] + anc.sum(-1) - 1

    def tree_attention_mask(self, tree_parents: torch.Tensor, valid: torch.Tensor | None = None, *,
                            additive: bool | None = None) -> torch.Tensor:
        """4D mask ``[B, 1, N+1, max(lengths) + N+1]`` of a tree step ``[root, node 0, ..., node N-1]``.

        Query ``t`` of row ``b`` (``t = 0`` the root, ``t = i + 1`` node ``i``) sits in slot ``lengths[b] + t``
        and attends the row's committed prefix (slots ``start[b] .. lengths[b] - 1``), itself and its
        ancestors among the step's slots (the root, slot ``lengths[b]``, is every used node's ancestor).
        An unused node (``valid[b, i]`` False) attends only itself (no fully masked query row: ``sdpa``
        would give NaN) and is nobody's ancestor. With ``sliding_window`` set, key ``s`` is visible only if
        ``position(query) - position(s) < sliding_window``, positions being those of
        :meth:`tree_position_ids` (so within the tree the distance is the difference of depths).

        Args:
            tree_parents: ``[B, N]`` int, as in :meth:`tree_position_ids`.
            valid: ``[B, N]`` bool or None (all used).
            additive: as in :meth:`attention_mask` (default: additive iff the model uses ``eager``).
        Returns bool (True = attend) or an additive 0 / ``finfo(dtype).min`` mask in the cache's dtype.
        Built on the device with tensor ops only (no host synchronisation, no loop over rows).
        """
        dev = self.store.device
        anc = tree_ancestors(tree_parents.to(dev), valid)  # [B, q, q]
        B, q = anc.shape[0], anc.shape[1]
        self._remember_tree_step(q - 1)
        kv_len = self.store.seq_length + q
        base = self.store.lengths.long()[:, None]  # [B, 1]: slot of the root
        slot = torch.arange(kv_len, device=dev)[None, :]  # [1, kv]
        rel = slot - base  # [B, kv]: index in the step (0 = root) for the step's slots
        in_step = (rel >= 0) & (rel < q)
        rel_c = rel.clamp(0, q - 1)
        step = anc.gather(2, rel_c[:, None, :].expand(B, q, kv_len)) & in_step[:, None, :]  # [B, q, kv]
        used = anc[:, :, 0]  # [B, q]: the root and every used node have the root as ancestor
        prefix = (slot >= self.start.long()[:, None]) & (rel < 0)  # [B, kv]
        allowed = step | (prefix[:, None, :] & used[:, :, None])
        if self.sliding_window is not None:
            pos = self._tree_positions(anc)  # [B, q]
            key_pos = torch.where(in_step, pos.gather(1, rel_c), slot - self.start.long()[:, None])  # [B, kv]
            allowed &= (pos[:, :, None] - key_pos[:, None, :]) < self.sliding_window
        allowed |= rel[:, None, :] == torch.arange(q, device=dev)[None, :, None]  # every query sees itself
        return self._mask(allowed[:, None], additive)

    def compact_tree(self, accepted_nodes: torch.Tensor, num_accepted: torch.Tensor, *,
                     num_nodes: int | None = None, host_lengths: torch.Tensor | None = None) -> None:
        """After a verified tree step: keep each row's root and accepted path, drop the other nodes.

        The step appended ``N + 1`` slots per row at ``L_b`` (the length before the step): the root at
        ``L_b``, node ``i`` at ``L_b + 1 + i``. Row ``b`` keeps the root and moves nodes
        ``accepted_nodes[b, :num_accepted[b]]`` (the accepted root-to-leaf path, in order) to the contiguous
        slots ``L_b + 1 .. L_b + num_accepted[b]``; its length becomes ``L_b + 1 + num_accepted[b]``.
        Only the accepted slots move (the prefix is not copied): one gather kernel for all layers, keys
        and values (C++ on CPU, CUDA on GPU, PyTorch fallback without the extension). Like
        :meth:`rollback`, afterwards the next step's logits equal a fresh prefill of the kept sequence.

        Args:
            accepted_nodes: ``[B, D]`` int32/int64 node indices in ``[0, N)`` (``verify_tree``'s
                ``accepted_nodes``; entries past ``num_accepted[b]`` are ignored).
            num_accepted: ``[B]`` int32/int64 in ``[0, min(D, N)]``.
            num_nodes: ``N`` of the step; default: the ``N`` of the last :meth:`tree_attention_mask` /
                :meth:`tree_position_ids` call, whose step must be the last thing appended. When given while
                such a step is remembered, it must be that step's ``N`` (ValueError otherwise).
            host_lengths: a CPU ``[B]`` int tensor of the new lengths ``L_b + 1 + num_accepted[b]`` when the
                caller has them (the generator does): then nothing waits for the device, the host values are
                checked against ``[L_b + 1, L_b + 1 + N]``, the device lengths are derived from them (so host
                and device lengths cannot disagree) and the device inputs are clamped into range (garbage
                in, garbage rows out, never a write outside the step's slots). Without it the inputs are
                read back (one synchronisation on CUDA) and checked: ValueError names the row.
        On a CPU cache every input is checked whether or not ``host_lengths`` is given (reading costs
        nothing there): ``num_accepted`` in range and equal to what ``host_lengths`` says, node indices
        in ``[0, N)`` and strictly increasing along each row's path (a root-to-node path of a tree whose
        parents come before their children; the in-place move also relies on it).
        """
        store = self.store
        if num_nodes is None:
            step = getattr(self, "_tree_step", None)
            if step is None:
                raise RuntimeError("compact_tree: no tree step to compact (run a step built with "
                                   "tree_attention_mask, or pass num_nodes)")
            num_nodes, before = step
            if tuple(before.shape) != (self.batch_size,) or not torch.equal(store.host_lengths,
                                                                            before + num_nodes + 1):
                raise RuntimeError(f"compact_tree: the cache is not one tree step of {num_nodes + 1} positions past "
                                   "the last tree_attention_mask call (pass num_nodes to compact anyway)")
        else:
            step = getattr(self, "_tree_step", None)
            if step is not None and int(num_nodes) != step[0]:
                raise ValueError(f"compact_tree: num_nodes={int(num_nodes)} but the last tree step "
                                 f"(tree_attention_mask / tree_position_ids) had {step[0]} nodes")
        N = int(num_nodes)
        if N < 0:
            raise ValueError(f"compact_tree: num_nodes must be >= 0, got {N}")
        base_host = store.host_lengths - (N + 1)
        short = (base_host < self._host_start).nonzero()
        if short.numel():
            b = int(short[0, 0])
            raise ValueError(f"compact_tree: row {b} holds {int(store.host_lengths[b])} slots, fewer than its left "
                             f"padding plus a tree step of {N + 1}")
        accepted_nodes = _as_index(accepted_nodes, "accepted_nodes")
        num_accepted = num_accepted_in = _as_index(num_accepted, "num_accepted")
        if accepted_nodes.dim() != 2 or accepted_nodes.shape[0] != self.batch_size \
                or tuple(num_accepted.shape) != (self.batch_size,):
            raise ValueError(f"compact_tree: need accepted_nodes [B, D] and num_accepted [B] with B = "
                             f"{self.batch_size}, got {tuple(accepted_nodes.shape)} and {tuple(num_accepted.shape)}")
        depth = min(accepted_nodes.shape[1], N)
        if host_lengths is not None:
            host = _host_copy(host_lengths, self.batch_size, "compact_tree: host_lengths")
            bad = ((host < base_host + 1) | (host > base_host + 1 + depth)).nonzero()
            if bad.numel():
                b = int(bad[0, 0])
                raise ValueError(f"compact_tree: row {b} host length {int(host[b])} outside [{int(base_host[b]) + 1}, "
                                 f"{int(base_host[b]) + 1 + depth}] (root + at most {depth} accepted nodes)")
            # the device lengths follow the host's: one small copy to the device, no wait for it
            num_accepted = (host - base_host - 1).to(store.device, non_blocking=True)
        on_host = accepted_nodes.device.type == "cpu" and num_accepted_in.device.type == "cpu"
        if host_lengths is None or on_host:  # read back (a synchronisation on CUDA) and check
            n_h, nodes_h = num_accepted.cpu().long(), accepted_nodes.cpu().long()
            if host_lengths is not None:
                n_given = num_accepted_in.long()
                bad = (n_given != n_h).nonzero()
                if bad.numel():
                    b = int(bad[0, 0])
                    raise ValueError(f"compact_tree: row {b} host length {int(host[b])} means {int(n_h[b])} "
                                     f"accepted nodes, num_accepted says {int(n_given[b])}")
            bad = ((n_h < 0) | (n_h > depth)).nonzero()
            if bad.numel():
                b = int(bad[0, 0])
                raise ValueError(f"compact_tree: row {b} num_accepted {int(n_h[b])} outside [0, {depth}]")
            cols = torch.arange(nodes_h.shape[1])[None, :] < n_h[:, None]
            bad = (cols & ((nodes_h < 0) | (nodes_h >= N))).nonzero()
            if bad.numel():
                b, j = (int(x) for x in bad[0])
                raise ValueError(f"compact_tree: row {b} accepted_nodes[{j}] = {int(nodes_h[b, j])} outside the "
                                 f"tree's nodes [0, {N})")
            order = cols[:, 1:] & (nodes_h[:, 1:] <= nodes_h[:, :-1])
            bad = order.nonzero()
            if bad.numel():
                b, j = (int(x) for x in bad[0])
                raise ValueError(f"compact_tree: row {b} accepted_nodes[{j + 1}] = {int(nodes_h[b, j + 1])} after "
                                 f"{int(nodes_h[b, j])}: a path's nodes are strictly increasing (duplicates or "
                                 "out-of-order indices would move slots already overwritten)")
            host = base_host + 1 + n_h
        compact_tree_(store.keys, store.values, store.lengths, accepted_nodes.to(store.device),
                      num_accepted.to(store.device), N, backend=store.backend)
        store._set_host(host)
        self._tree_step = None


def tree_ancestors(tree_parents: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, N+1, N+1]`` bool: ``anc[b, t, s]`` = step slot ``s`` is ``t`` itself or an ancestor of ``t``.

    Step index 0 is the root (the pending token), ``i + 1`` node ``i``. ``tree_parents`` ``[B, N]`` int:
    the parent of node ``i`` (``-1`` = the root, else a node index ``< i``). ``valid`` ``[B, N]`` bool
    (None = all used): an unused node is only its own ancestor and nobody else's.

    Computed on the tensors' device without host synchronisation and without a loop over rows: the
    parent relation (plus the identity) is closed transitively by ``ceil(log2 N)`` squarings of the
    ``[N+1, N+1]`` reachability matrix (batched matmuls on 0/1 values, exact in fp32). Parents outside
    ``[-1, N)`` are clamped into it (never an out-of-range read); parents ``>= i`` violate the encoding
    and give whatever relation the resulting graph closes to (still no fully empty row).
    """
    if tree_parents.dim() != 2:
        raise ValueError(f"tree_parents must be [B, N], got {tuple(tree_parents.shape)}")
    if tree_parents.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"tree_parents must be int32/int64, got {tree_parents.dtype}")
    B, N = tree_parents.shape
    dev = tree_parents.device
    if valid is not None:
        if tuple(valid.shape) != (B, N) or valid.dtype != torch.bool:
            raise ValueError(f"valid must be a [B, N] = [{B}, {N}] bool tensor, got {tuple(valid.shape)} {valid.dtype}")
        valid = valid.to(dev)
    parent = tree_parents.long().clamp(-1, max(N - 1, -1)) + 1  # [B, N]: parent's step index (0 = root)
    adj = torch.zeros(B, N + 1, N + 1, device=dev)
    adj[:, 1:].scatter_(2, parent[:, :, None], 1.0)
    eye = torch.eye(N + 1, device=dev, dtype=torch.bool)
    if valid is not None:
        used = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=dev), valid], 1)  # [B, N+1]
        adj *= (used[:, :, None] & used[:, None, :])  # unused: no edge in or out
    adj += eye
    for _ in range(max(N - 1, 0).bit_length()):  # paths of length up to 2^k >= N - 1 edges (+1 from adj)
        adj = (torch.bmm(adj, adj) > 0).float()
    return adj > 0


def compact_tree_(keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, accepted_nodes: torch.Tensor,
                  num_accepted: torch.Tensor, num_nodes: int, *, backend: str | None = None) -> None:
    """Low-level tree compaction over raw store tensors (what :meth:`RaggedCache.compact_tree` runs).

    The last ``num_nodes + 1`` slots of every row are a tree step appended at ``L_b = lengths[b] -
    num_nodes - 1``. Keeps the root slot ``L_b`` and moves slots ``L_b + 1 + accepted_nodes[b, j]``,
    ``j < num_accepted[b]``, to ``L_b + 1 + j``; sets ``lengths[b] = L_b + 1 + num_accepted[b]``. One
    :func:`gather_` call (one kernel for all layers) that copies only the accepted slots.

    Never accesses memory outside the store, on any input: ``num_accepted`` is clamped to
    ``[0, min(D, N)]``, ``accepted_nodes`` to ``[0, N)``, ``L_b`` to ``[0, T_max - N - 1]``, all on the
    device (no synchronisation). Corrupted ``lengths`` (outside ``[N + 1, T_max]``) then raise on CPU
    (the gather's own checks); on CUDA (unchecked, no synchronisation) they give garbage rows in bounds.
    """
    N = int(num_nodes)
    T = keys.shape[3]
    if N < 0 or N + 1 > T:
        raise ValueError(f"compact_tree: num_nodes {N} must be in [0, T_max - 1 = {T - 1}]")
    if accepted_nodes.dim() != 2 or num_accepted.dim() != 1:
        raise ValueError(f"compact_tree: need accepted_nodes [B, D] and num_accepted [B], got "
                         f"{tuple(accepted_nodes.shape)} and {tuple(num_accepted.shape)}")
    depth = min(accepted_nodes.shape[1], N)
    n = num_accepted.long().clamp(0, depth)
    nodes = accepted_nodes.long()[:, :depth].clamp(0, max(N - 1, 0))
    base = (lengths.long() - (N + 1)).clamp(0, T - N - 1)
    offset = base + 1
    check = keys.device.type == "cpu"  # free on CPU; on CUDA the kernels clamp instead of synchronising
    gather_(keys, values, lengths, offset[:, None] + nodes, n, offset, check, backend=backend)
