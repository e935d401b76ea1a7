"""Tests of the KV-cache store (specdec.cache): kernels against index-based references, per-row rollback
through real (tiny) Hugging Face models against a fresh prefill, and clear errors on bad input.

Every store-level test runs over both implementations: the C++ kernels of ``specdec._C`` ("cpp") and
the plain-PyTorch fallback ("torch").
"""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from specdec.hf_compat import cache_kwargs
from specdec import cache as C
from specdec.cache import KVStore, RaggedCache

BACKENDS = ["cpp", "torch"] if C.has_extension() else ["torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _filled_store(backend, L=2, B=4, H=2, T=16, D=8, dtype=torch.float32, lengths=(5, 9, 0, 16), seed=0):
    """Store with random data in every slot and the given lengths."""
    g = torch.Generator().manual_seed(seed)
    s = KVStore(L, B, H, D, T, dtype=dtype, backend=backend)
    s.keys.copy_(torch.randn(s.keys.shape, generator=g))
    s.values.copy_(torch.randn(s.values.shape, generator=g))
    s.lengths.copy_(torch.tensor(lengths, dtype=torch.int32))
    s._set_host(torch.tensor(lengths))
    return s


# ------------------------------------------------------------------------------------------------------
# append / rollback

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_append_writes_at_row_offsets(backend, dtype):
    s = _filled_store(backend, dtype=dtype, lengths=(5, 9, 0, 12))
    ref_k, ref_v = s.keys.clone(), s.values.clone()
    q = 3
    # non-contiguous new keys, as HF produces them ([B, q, H, D] transposed)
    nk = torch.randn(2, 4, q, 2, 8).to(dtype).transpose(2, 3)
    nv = torch.randn(2, 4, q, 2, 8).to(dtype).transpose(2, 3)
    s.append(nk, nv)  # all layers in one call
    for b, n in enumerate((5, 9, 0, 12)):
        ref_k[:, b, :, n:n + q] = nk[:, b]
        ref_v[:, b, :, n:n + q] = nv[:, b]
    assert torch.equal(s.keys, ref_k) and torch.equal(s.values, ref_v)
    assert s.lengths.tolist() == [8, 12, 3, 15] and s.host_lengths.tolist() == [8, 12, 3, 15]
    # one layer, no advance: writes at the same offsets again
    k1 = torch.randn(4, 2, 1, 8).to(dtype)
    s.append(k1, k1, layer=1, advance=False)
    for b, n in enumerate((8, 12, 3, 15)):
        ref_k[1, b, :, n:n + 1] = k1[b]
    assert torch.equal(s.keys, ref_k) and s.lengths.tolist() == [8, 12, 3, 15]


@pytest.mark.parametrize("backend", BACKENDS)
def test_rollback_is_per_row_and_moves_no_data(backend):
    s = _filled_store(backend, lengths=(5, 9, 0, 16))
    k, ptr = s.keys.clone(), s.keys.data_ptr()
    s.rollback(torch.tensor([2, 9, 0, 1]))
    assert s.lengths.tolist() == [2, 9, 0, 1] and s.seq_length == 9
    assert torch.equal(s.keys, k) and s.keys.data_ptr() == ptr
    s.rollback(torch.zeros(4, dtype=torch.int32))
    assert s.seq_length == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_thousand_append_rollback_cycles_no_growth(backend):
    g = torch.Generator().manual_seed(1)
    L, B, H, D, T, K = 2, 4, 2, 8, 64, 4
    s = KVStore(L, B, H, D, T, backend=backend)
    ptrs = (s.keys.data_ptr(), s.values.data_ptr(), s.lengths.data_ptr())
    nbytes = s.keys.untyped_storage().nbytes()
    expect = torch.zeros(B, dtype=torch.int64)
    new = torch.randn(L, B, H, K + 1, D)
    for _ in range(1000):
        if int(expect.max()) + K + 1 > T:  # keep going forever by shortening long rows
            s.rollback(torch.minimum(s.lengths, torch.tensor(T // 4, dtype=torch.int32)))
            expect = torch.minimum(expect, torch.tensor(T // 4))
        s.append(new, new)
        expect += K + 1
        keep = torch.randint(0, K + 2, (B,), generator=g)  # tokens kept of the K+1 appended
        expect = expect - (K + 1) + keep
        s.rollback(expect.to(torch.int32))
        assert s.lengths.tolist() == expect.tolist()
    assert (s.keys.data_ptr(), s.values.data_ptr(), s.lengths.data_ptr()) == ptrs
    assert s.keys.untyped_storage().nbytes() == nbytes
    assert s.host_lengths.tolist() == expect.tolist() and s.seq_length == int(expect.max())


# ------------------------------------------------------------------------------------------------------
# gather / compact / select_rows

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_matches_index_reference(backend, dtype):
    lengths = (12, 9, 16, 4)
    s = _filled_store(backend, dtype=dtype, lengths=lengths, seed=3)
    ref_k, ref_v = s.keys.clone(), s.values.clone()
    # arbitrary per-row lists: reversed, overlapping source/destination, repeated slots, empty
    keep_index = torch.tensor([[11, 10, 3, 0, 7], [1, 2, 4, 8, 0], [15, 15, 0, 2, 3], [0, 0, 0, 0, 0]])
    keep_lengths = torch.tensor([5, 4, 3, 0])
    offset = torch.tensor([0, 1, 10, 2])
    s.gather(keep_index, keep_lengths, offset)
    for b in range(4):
        n, o = int(keep_lengths[b]), int(offset[b])
        idx = keep_index[b, :n]
        ref_k[:, b, :, o:o + n] = ref_k[:, b, :, idx].clone()
        ref_v[:, b, :, o:o + n] = ref_v[:, b, :, idx].clone()
    new_len = (offset + keep_lengths).tolist()
    assert s.lengths.tolist() == new_len and s.host_lengths.tolist() == new_len
    for b, n in enumerate(new_len):  # every stored slot matches; slots past the length are free
        assert torch.equal(s.keys[:, b, :, :n], ref_k[:, b, :, :n])
        assert torch.equal(s.values[:, b, :, :n], ref_v[:, b, :, :n])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_tree_acceptance_keeps_prefix(backend):
    # prefix of 6 slots, a tree of 5 candidate slots 6..10; row 0 accepts path (6, 8, 10), row 1 (7,)
    s = _filled_store(backend, B=2, lengths=(11, 11), seed=4)
    before = s.keys.clone()
    s.gather(torch.tensor([[6, 8, 10], [7, 0, 0]]), torch.tensor([3, 1]), offset=torch.tensor([6, 6]))
    assert s.lengths.tolist() == [9, 7]
    assert torch.equal(s.keys[:, :, :, :6], before[:, :, :, :6])
    assert torch.equal(s.keys[:, 0, :, 6:9], before[:, 0, :, [6, 8, 10]])
    assert torch.equal(s.keys[:, 1, :, 6], before[:, 1, :, 7])


@pytest.mark.parametrize("backend", BACKENDS)
def test_select_rows_drops_reorders_and_repeats(backend):
    lengths = (5, 9, 0, 16)
    s = _filled_store(backend, lengths=lengths, seed=5)
    before_k, before_v = s.keys.clone(), s.values.clone()
    index = torch.tensor([3, 1, 1])  # row 0 and 2 finished; row 1 duplicated (beam style)
    s.select_rows(index)
    assert s.batch_size == 3 and s.lengths.tolist() == [16, 9, 9] and s.keys.shape[3] == 16
    for r, src in enumerate(index.tolist()):
        n = lengths[src]
        assert torch.equal(s.keys[:, r, :, :n], before_k[:, src, :, :n])
        assert torch.equal(s.values[:, r, :, :n], before_v[:, src, :, :n])
        assert not s.keys[:, r, :, n:].any()  # free slots are zero (finite under any mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grow_keeps_data(backend):
    s = _filled_store(backend, lengths=(5, 9, 0, 16), seed=6)
    before = s.keys.clone()
    s.grow(40)
    assert s.capacity == 40 and s.lengths.tolist() == [5, 9, 0, 16]
    for b, n in enumerate((5, 9, 0, 16)):
        assert torch.equal(s.keys[:, b, :, :n], before[:, b, :, :n])
    s.append(torch.randn(2, 4, 2, 20, 8), torch.randn(2, 4, 2, 20, 8))  # would not have fit before
    assert s.lengths.tolist() == [25, 29, 20, 36]


def test_cpp_and_torch_backends_agree():
    if "cpp" not in BACKENDS:
        pytest.skip("specdec._C not built")
    stores = [_filled_store(be, lengths=(3, 7, 1, 10), seed=7) for be in BACKENDS]
    new = torch.randn(2, 4, 2, 4, 8)
    for s in stores:
        s.append(new, new * 2)
        s.rollback(torch.tensor([5, 7, 1, 12]))
        s.gather(torch.tensor([[4, 0], [6, 5], [0, 0], [11, 3]]), torch.tensor([2, 2, 1, 2]),
                 torch.tensor([1, 5, 0, 10]))
        s.select_rows(torch.tensor([3, 0, 1]))
    a, b = stores
    assert torch.equal(a.lengths, b.lengths)
    for r, n in enumerate(a.lengths.tolist()):
        assert torch.equal(a.keys[:, r, :, :n], b.keys[:, r, :, :n])
        assert torch.equal(a.values[:, r, :, :n], b.values[:, r, :, :n])


# ------------------------------------------------------------------------------------------------------
# errors

@pytest.mark.parametrize("backend", BACKENDS)
def test_rollback_errors(backend):
    s = _filled_store(backend, lengths=(5, 9, 0, 16))
    with pytest.raises(ValueError, match="row 1 new length 10 exceeds its current length 9"):
        s.rollback(torch.tensor([5, 10, 0, 16]))
    with pytest.raises(ValueError, match="row 0 new length -1 is negative"):
        s.rollback(torch.tensor([-1, 9, 0, 16]))
    with pytest.raises(TypeError, match="int32 or int64"):
        s.rollback(torch.tensor([1.0, 2.0, 0.0, 3.0]))
    with pytest.raises(ValueError, match="shape"):
        s.rollback(torch.tensor([1, 2, 0]))
    with pytest.raises(ValueError, match="device"):
        s.rollback(torch.zeros(4, dtype=torch.int32, device="meta"))
    assert s.lengths.tolist() == [5, 9, 0, 16]  # nothing changed by a failed rollback


@pytest.mark.parametrize("backend", BACKENDS)
def test_raw_rollback_op_errors(backend):
    lengths = torch.tensor([5, 9], dtype=torch.int32)
    with pytest.raises((RuntimeError, ValueError), match="exceeds its current length"):
        C.rollback_(lengths, torch.tensor([5, 10], dtype=torch.int32), backend=backend)
    with pytest.raises((RuntimeError, ValueError), match="negative"):
        C.rollback_(lengths, torch.tensor([-2, 1]), backend=backend)
    with pytest.raises(RuntimeError, match="int32 or int64"):
        C.rollback_(lengths, torch.tensor([1.0, 1.0]), backend=backend)
    with pytest.raises(RuntimeError, match=r"\[B\] = \[2\]"):
        C.rollback_(lengths, torch.tensor([1, 1, 1]), backend=backend)
    assert lengths.tolist() == [5, 9]


@pytest.mark.parametrize("backend", BACKENDS)
def test_capacity_exceeded_writes_nothing(backend):
    s = _filled_store(backend, T=16, lengths=(5, 15, 0, 2))
    k, v, n = s.keys.clone(), s.values.clone(), s.lengths.clone()
    new = torch.randn(2, 4, 2, 2, 8)
    with pytest.raises(RuntimeError, match="capacity exceeded.*grow"):
        s.append(new, new)
    # the raw op checks on its own too (exact per-row check, row 1 named), before writing any row
    with pytest.raises(RuntimeError, match="capacity exceeded: row 1"):
        C.append_(s.keys, s.values, s.lengths, new, new, 0, True, -1, backend=backend)
    assert torch.equal(s.keys, k) and torch.equal(s.values, v) and torch.equal(s.lengths, n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_append_dtype_device_shape_errors(backend):
    s = _filled_store(backend, lengths=(5, 9, 0, 12))
    with pytest.raises(RuntimeError, match="dtype"):
        s.append(torch.randn(4, 2, 1, 8, dtype=torch.float16), torch.randn(4, 2, 1, 8, dtype=torch.float16), 0)
    with pytest.raises(RuntimeError, match="store"):
        s.append(torch.randn(4, 2, 1, 8, device="meta"), torch.randn(4, 2, 1, 8, device="meta"), 0)
    if backend == "cpp":  # the raw op, mixed devices: raised by whichever kernel the dispatcher picks
        with pytest.raises(RuntimeError, match="device|store"):
            C.append_(s.keys, s.values, s.lengths, torch.randn(1, 4, 2, 1, 8, device="meta"),
                      torch.randn(1, 4, 2, 1, 8, device="meta"), 0, True, -1, backend=backend)
    with pytest.raises(RuntimeError, match="fit the store"):
        s.append(torch.randn(4, 3, 1, 8), torch.randn(4, 3, 1, 8), 0)  # wrong number of heads
    with pytest.raises(RuntimeError, match="L=2"):
        s.append(torch.randn(4, 2, 1, 8), torch.randn(4, 2, 1, 8))  # 4-D without a layer index


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_and_select_errors(backend):
    s = _filled_store(backend, lengths=(5, 9, 0, 16))
    with pytest.raises(RuntimeError, match="row 0 keep_index.*outside"):
        s.gather(torch.tensor([[5], [0], [0], [0]]), torch.tensor([1, 1, 0, 1]))
    with pytest.raises(RuntimeError, match="select_rows: row_index"):
        s.select_rows(torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="below the current capacity"):
        s.grow(8)
    assert s.lengths.tolist() == [5, 9, 0, 16]


# ------------------------------------------------------------------------------------------------------
# memory safety of the raw ops: hostile lengths and indices must raise (CPU) and never touch memory
# outside the op's tensors. The store is a view into the middle of a larger buffer, so a stray write lands
# in a guard region we can inspect instead of in some unrelated allocation.

HOSTILE_LENGTHS = [-1, -2, -2**30, 9, 2**24]  # T_max = 8 in _guarded_store


def _guarded_store(device="cpu", L=2, B=2, H=2, T=8, D=4, dtype=torch.float32, lengths=(3, 5)):
    g = torch.Generator().manual_seed(1)
    n = L * B * H * T * D
    bufs = [torch.randn(3 * n, generator=g).to(dtype).to(device) for _ in range(2)]
    keys, values = (b[n:2 * n].view(L, B, H, T, D) for b in bufs)
    lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    snapshot = [b.clone() for b in bufs]

    def untouched(store_too=True):
        for b, ref in zip(bufs, snapshot):
            assert torch.equal(b[:n], ref[:n]) and torch.equal(b[2 * n:], ref[2 * n:]), "guard overwritten"
            if store_too:
                assert torch.equal(b[n:2 * n], ref[n:2 * n]), "store written by a rejected op"
        return True

    return keys, values, lens, untouched


@pytest.mark.skipif(not C.has_extension(), reason="needs specdec._C")
@pytest.mark.parametrize("bad", HOSTILE_LENGTHS)
def test_raw_append_rejects_hostile_lengths(bad):
    keys, values, lens, untouched = _guarded_store(lengths=(3, 5))
    lens[1] = bad
    new = torch.randn(2, 2, 2, 1, 4)
    for max_length in (-1, 0):  # a wrong host hint must not matter on CPU
        with pytest.raises(RuntimeError, match="row 1"):
            torch.ops.specdec_cpp.cache_append(keys, values, lens, new, new, 0, True, max_length)
    assert untouched() and lens.tolist() == [3, bad]


@pytest.mark.skipif(not C.has_extension(), reason="needs specdec._C")
@pytest.mark.parametrize("bad", [-2, -2**30])
def test_raw_rollback_unchecked_then_append_cannot_write_outside(bad):
    keys, values, lens, untouched = _guarded_store(lengths=(3, 5))
    torch.ops.specdec_cpp.cache_rollback(lens, torch.tensor([bad, 5], dtype=torch.int32), False)
    new = torch.randn(2, 2, 2, 2, 4)
    with pytest.raises(RuntimeError, match="row 0.*negative"):
        torch.ops.specdec_cpp.cache_append(keys, values, lens, new, new, 0, True, -1)
    assert untouched()


@pytest.mark.skipif(not C.has_extension(), reason="needs specdec._C")
@pytest.mark.parametrize("bad", HOSTILE_LENGTHS)
def test_raw_select_rows_rejects_hostile_lengths(bad):
    keys, values, lens, untouched = _guarded_store(dtype=torch.float16, D=1, lengths=(3, 5))
    lens[0] = bad
    # a new capacity above the bad length, so only the comparison with the old T_max can catch it
    max_length = max(bad, 0) + 1 if bad < 2**24 else bad
    for row_index in (torch.tensor([0]), torch.tensor([1, 0], dtype=torch.int32)):
        with pytest.raises(RuntimeError, match=r"select_rows: row 0 length .* outside \[0, 8\]"):
            torch.ops.specdec_cpp.cache_select_rows(keys, values, lens, row_index, max_length)
    k, v, n = torch.ops.specdec_cpp.cache_select_rows(keys, values, lens, torch.tensor([1]), 8)  # row 1 is fine
    assert n.tolist() == [5] and torch.equal(k[:, 0, :, :5], keys[:, 1, :, :5]) and untouched()


@pytest.mark.skipif(not C.has_extension(), reason="needs specdec._C")
@pytest.mark.parametrize("row", [-1, 2, -2**40, 2**40])
def test_raw_select_rows_rejects_hostile_row_index(row):
    keys, values, lens, untouched = _guarded_store()
    with pytest.raises(RuntimeError, match=r"select_rows: row_index\[1\]"):
        torch.ops.specdec_cpp.cache_select_rows(keys, values, lens, torch.tensor([0, row]), 8)
    assert untouched()


@pytest.mark.skipif(not C.has_extension(), reason="needs specdec._C")
@pytest.mark.parametrize("check", [True, False])
@pytest.mark.parametrize("bad", HOSTILE_LENGTHS)
def test_raw_gather_rejects_hostile_lengths(bad, check):
    keys, values, lens, untouched = _guarded_store(lengths=(3, 5))
    lens[1] = bad
    # indices that are "valid" for the claimed length but lie past T_max (or before 0)
    src = min(max(bad - 1, 0), 2**24 - 1)
    keep = torch.tensor([[0], [src]])
    with pytest.raises(RuntimeError, match=r"gather: row 1 length .* outside \[0, 8\]"):
        torch.ops.specdec_cpp.cache_gather(keys, values, lens, keep, torch.tensor([1, 1]), torch.tensor([0, 0]),
                                           check)
    assert untouched() and lens.tolist() == [3, bad]


@pytest.mark.skipif(not C.has_extension(), reason="needs specdec._C")
@pytest.mark.parametrize("check", [True, False])
@pytest.mark.parametrize("keep_index, keep_lengths, offset, match", [
    ([[0], [-1]], [1, 1], [0, 0], r"row 1 keep_index\[0\] = -1"),
    ([[0], [8]], [1, 1], [0, 0], r"row 1 keep_index\[0\] = 8"),
    ([[0], [2**40]], [1, 1], [0, 0], r"row 1 keep_index\[0\]"),
    ([[0], [0]], [1, 2], [0, 0], r"row 1 keep_length 2 outside \[0, 1\]"),
    ([[0], [0]], [1, -1], [0, 0], r"row 1 keep_length -1"),
    ([[0], [0]], [1, 1], [0, -1], r"row 1 offset -1"),
    ([[0], [0]], [1, 1], [0, 2**62], r"row 1 offset"),
])
def test_raw_gather_rejects_hostile_indices(keep_index, keep_lengths, offset, match, check):
    keys, values, lens, untouched = _guarded_store(lengths=(3, 5))
    with pytest.raises(RuntimeError, match=match):
        torch.ops.specdec_cpp.cache_gather(keys, values, lens, torch.tensor(keep_index), torch.tensor(keep_lengths),
                                           torch.tensor(offset), check)
    assert untouched() and lens.tolist() == [3, 5]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer_start", [-1, 1, 2**63 - 1, 2**63 - 2])
def test_append_rejects_hostile_layer_start(backend, layer_start):
    keys, values, lens, untouched = _guarded_store(lengths=(3, 5))
    new = torch.randn(2, 2, 2, 1, 4)  # L' = 2 layers: only layer_start 0 fits
    with pytest.raises(RuntimeError, match=r"append: layers \[.*outside the store's 2 layers"):
        C.append_(keys, values, lens, new, new, layer_start, backend=backend)
    assert untouched() and lens.tolist() == [3, 5]


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_on_corrupted_lengths(backend):
    keys, values, lens, untouched = _guarded_store(lengths=(3, 5))
    C.rollback_(lens, torch.tensor([-2, 9], dtype=torch.int32), False, backend=backend)  # stores garbage
    new = torch.randn(2, 2, 2, 1, 4)
    with pytest.raises(RuntimeError, match="append: row 0 length -2 is negative"):
        C.append_(keys, values, lens, new, new, backend=backend)
    with pytest.raises(RuntimeError, match=r"gather: row 0 length -2 outside \[0, 8\]"):
        C.gather_(keys, values, lens, torch.tensor([[0], [0]]), torch.tensor([0, 0]), torch.tensor([0, 0]),
                  backend=backend)
    with pytest.raises(RuntimeError, match=r"select_rows: row 1 length 9 outside \[0, 8\]"):
        C.select_rows(keys, values, lens, torch.tensor([1]), 16, backend=backend)
    assert untouched() and lens.tolist() == [-2, 9]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_kernels_clamp_hostile_inputs_without_check():
    # On CUDA the unchecked paths do not synchronise; the kernels clamp instead, so nothing outside the
    # store may change (the store itself may, these inputs are garbage).
    keys, values, lens, untouched = _guarded_store("cuda", lengths=(3, 5))
    new = torch.randn(2, 2, 2, 3, 4, device="cuda")
    t = lambda x: torch.tensor(x, device="cuda")  # noqa: E731
    for bad in HOSTILE_LENGTHS:
        lens.copy_(torch.tensor([bad, 7], dtype=torch.int32))
        torch.ops.specdec_cpp.cache_append(keys, values, lens, new, new, 0, True, 0)  # host hint lies
        torch.ops.specdec_cpp.cache_rollback(lens, torch.tensor([bad, -5], device="cuda"), False)
        for keep, kl, off in (([[2**40, -1], [9, 3]], [2, 2], [0, 7]), ([[0, 1], [1, 0]], [5, -3], [-4, 2**62])):
            torch.ops.specdec_cpp.cache_gather(keys, values, lens, t(keep), t(kl), t(off), False)
            assert 0 <= int(lens.min()) and int(lens.max()) <= 8
        wide = torch.tensor([[0] * 4000, [1] * 4000], device="cuda")  # too long to stage: scratch path
        torch.ops.specdec_cpp.cache_gather(keys, values, lens, wide, t([4000, 9]), t([-1, 6]), False)
        torch.cuda.synchronize()
        assert untouched(store_too=False)


def test_ops_pass_opcheck():
    """Schemas (mutation annotations), fake kernels and real kernels agree (torch.library.opcheck)."""
    if "cpp" not in BACKENDS:
        pytest.skip("specdec._C not built")
    ops = torch.ops.specdec_cpp
    keys, values = torch.randn(2, 3, 2, 8, 4), torch.randn(2, 3, 2, 8, 4)
    lengths = torch.tensor([1, 4, 0], dtype=torch.int32)
    new = torch.randn(2, 3, 2, 2, 4)
    torch.library.opcheck(ops.cache_append.default, (keys, values, lengths, new, new, 0, True, -1))
    torch.library.opcheck(ops.cache_rollback.default, (lengths, torch.tensor([1, 2, 0], dtype=torch.int32), True))
    lengths = torch.tensor([3, 4, 2], dtype=torch.int32)
    torch.library.opcheck(ops.cache_gather.default,
                          (keys, values, lengths, torch.tensor([[2, 0], [3, 1], [1, 0]]), torch.tensor([2, 1, 1]),
                           torch.tensor([0, 1, 1]), True))
    torch.library.opcheck(ops.cache_select_rows.default, (keys, values, lengths, torch.tensor([2, 0]), 10))


# ------------------------------------------------------------------------------------------------------
# Hugging Face models: per-row rollback reproduces a fresh prefill of each row's kept prefix

transformers = pytest.importorskip("transformers")

VOCAB = 128


def _tiny_model(arch, attn):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if arch == "llama":
        config = transformers.LlamaConfig(**common)
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**common)
    elif arch == "qwen3":
        config = transformers.Qwen3Config(head_dim=16, **common)
    elif arch == "mistral":
        config = transformers.MistralConfig(sliding_window=6, **common)  # small window: the mask must apply it
    else:
        raise ValueError(arch)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return model.eval()


def _fresh_last_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1]


def _forward(model, cache, ids):
    q = ids.shape[1]
    with torch.no_grad():
        return model(input_ids=ids, position_ids=cache.position_ids(q), attention_mask=cache.attention_mask(q),
                     **cache_kwargs(model, cache), use_cache=True).logits


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_hf_rollback_matches_fresh_prefill_left_padded(arch, attn):
    model = _tiny_model(arch, attn)
    g = torch.Generator().manual_seed(11)
    prompt_lens, K = [5, 9, 3, 7], 3
    T0, B = max(prompt_lens), len(prompt_lens)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in prompt_lens]
    pad = [T0 - n for n in prompt_lens]
    ids = torch.tensor([[0] * p + pr for p, pr in zip(pad, prompts)])  # left padded

    cache = RaggedCache.from_model(model, batch_size=B, max_length=32)
    assert cache.sliding_window == (6 if arch == "mistral" else None)
    cache.set_left_padding(torch.tensor(pad))
    logits = _forward(model, cache, ids)
    for b in range(B):  # the prefill itself is right for every row
        torch.testing.assert_close(logits[b, -1], _fresh_last_logits(model, prompts[b]), rtol=1e-4, atol=1e-5)

    drafts = torch.randint(1, VOCAB, (B, K + 1), generator=g)
    _forward(model, cache, drafts)  # append K+1 positions
    assert cache.lengths.tolist() == [T0 + K + 1] * B
    kept = [0, 2, 4, 1]  # each row keeps a different number of the K+1 tokens
    cache.rollback(torch.tensor([T0 + k for k in kept], dtype=torch.int32))
    nxt = torch.randint(1, VOCAB, (B, 1), generator=g)
    logits = _forward(model, cache, nxt)
    for b in range(B):
        seq = prompts[b] + drafts[b, :kept[b]].tolist() + nxt[b].tolist()
        torch.testing.assert_close(logits[b, -1], _fresh_last_logits(model, seq), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hf_right_padded_prefill_then_rollback(attn):
    """The generator's recipe: right-padded prefill, pad slots dropped by rollback, then several steps."""
    model = _tiny_model("llama", attn)
    g = torch.Generator().manual_seed(12)
    prompt_lens = [4, 8, 6]
    B, T0 = len(prompt_lens), max(prompt_lens)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in prompt_lens]
    ids = torch.tensor([pr + [0] * (T0 - len(pr)) for pr in prompts])
    cache = RaggedCache.from_model(model, batch_size=B, max_length=24)
    _forward(model, cache, ids)
    cache.rollback(torch.tensor(prompt_lens, dtype=torch.int32))
    seqs = [list(p) for p in prompts]
    for step in range(3):
        drafts = torch.randint(1, VOCAB, (B, 3), generator=g)
        logits = _forward(model, cache, drafts)
        for b in range(B):
            torch.testing.assert_close(logits[b, -1], _fresh_last_logits(model, seqs[b] + drafts[b].tolist()),
                                       rtol=1e-4, atol=1e-5)
        kept = [(step + b) % 4 for b in range(B)]
        new_len = cache.lengths - 3 + torch.tensor(kept, dtype=torch.int32)
        cache.rollback(new_len)
        for b in range(B):
            seqs[b] += drafts[b, :kept[b]].tolist()
    cache.select_rows(torch.tensor([2, 0]))  # row 1 finished; rows reordered
    nxt = torch.randint(1, VOCAB, (2, 1), generator=g)
    logits = _forward(model, cache, nxt)
    for r, b in enumerate([2, 0]):
        torch.testing.assert_close(logits[r, -1], _fresh_last_logits(model, seqs[b] + nxt[r].tolist()),
                                   rtol=1e-4, atol=1e-5)


def test_hf_tree_gather_matches_fresh_prefill():
    """Tree-style acceptance: keep non-contiguous slots of the appended block, compacted after the prefix."""
    model = _tiny_model("qwen2", "sdpa")
    g = torch.Generator().manual_seed(13)
    prompts = [torch.randint(1, VOCAB, (6,), generator=g).tolist() for _ in range(2)]
    cache = RaggedCache.from_model(model, batch_size=2, max_length=24)
    _forward(model, cache, torch.tensor(prompts))
    # a linear block of 4 tokens; row 0 keeps tokens 0 and 1, row 1 keeps token 0 only (chain case of gather)
    block = torch.randint(1, VOCAB, (2, 4), generator=g)
    _forward(model, cache, block)
    cache.gather(torch.tensor([[6, 7], [6, 0]]), torch.tensor([2, 1]), offset=torch.tensor([6, 6]))
    assert cache.lengths.tolist() == [8, 7]
    nxt = torch.randint(1, VOCAB, (2, 1), generator=g)
    logits = _forward(model, cache, nxt)
    for b, k in enumerate([2, 1]):
        seq = prompts[b] + block[b, :k].tolist() + nxt[b].tolist()
        torch.testing.assert_close(logits[b, -1], _fresh_last_logits(model, seq), rtol=1e-4, atol=1e-5)


def test_hf_batch1_without_explicit_mask():
    """Batch 1 works like a DynamicCache: no position_ids, no mask; crop uses HF's negative count."""
    model = _tiny_model("llama", "sdpa")
    g = torch.Generator().manual_seed(14)
    prompt = torch.randint(1, VOCAB, (1, 7), generator=g)
    cache = RaggedCache.from_model(model, batch_size=1, max_length=20)
    with torch.no_grad():
        model(input_ids=prompt, **cache_kwargs(model, cache), use_cache=True)
        block = torch.randint(1, VOCAB, (1, 4), generator=g)
        model(input_ids=block, **cache_kwargs(model, cache), use_cache=True)
        cache.crop(-3)  # keep 1 of the 4
        assert cache.get_seq_length() == 8
        nxt = torch.randint(1, VOCAB, (1, 1), generator=g)
        logits = model(input_ids=nxt, **cache_kwargs(model, cache), use_cache=True).logits[0, -1]
    seq = prompt[0].tolist() + block[0, :1].tolist() + nxt[0].tolist()
    torch.testing.assert_close(logits, _fresh_last_logits(model, seq), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hf_partial_depth_commits_after_last_active_layer(attn):
    """Early exit over the full model's cache: layers 0..n-1 only, lengths committed after layer n-1 and
    restored on exit (deeper layers untouched); the next full forward overwrites the shallow slots."""
    from specdec.drafters import truncated_model

    model = _tiny_model("llama", attn)  # 2 layers
    shallow = truncated_model(model, 1)
    g = torch.Generator().manual_seed(15)
    prompt_lens = [5, 8]
    B, T0 = len(prompt_lens), max(prompt_lens)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in prompt_lens]
    cache = RaggedCache.from_model(model, batch_size=B, max_length=24)
    _forward(model, cache, torch.tensor([pr + [0] * (T0 - len(pr)) for pr in prompts]))
    cache.rollback(torch.tensor(prompt_lens, dtype=torch.int32))
    deep_keys = cache.store.keys[1].clone()
    drafts = torch.randint(1, VOCAB, (B, 3), generator=g)
    with cache.partial_depth(1):
        for j in range(3):  # one token at a time, like a drafter
            logits = _forward(shallow, cache, drafts[:, j:j + 1])
            assert cache.lengths.tolist() == [n + j + 1 for n in prompt_lens]
            for b in range(B):
                seq = prompts[b] + drafts[b, :j + 1].tolist()
                torch.testing.assert_close(logits[b, -1], _fresh_last_logits(shallow, seq), rtol=1e-4, atol=1e-5)
        kv = torch.zeros(B, 2, 2, 16)
        cache.update(kv, kv, 0)  # the commit happens at layer 0's update, not the model's last layer
        assert cache.lengths.tolist() == [n + 5 for n in prompt_lens] and cache.get_seq_length() == T0 + 5
        with pytest.raises(RuntimeError, match="partial_depth"):
            cache.update(kv, kv, 1)
        with pytest.raises(RuntimeError, match="already"):
            with cache.partial_depth(1):
                pass
    assert cache.lengths.tolist() == prompt_lens and cache.store.host_lengths.tolist() == prompt_lens
    assert cache.get_seq_length() == T0 and torch.equal(cache.store.keys[1], deep_keys)
    nxt = torch.randint(1, VOCAB, (B, 2), generator=g)
    logits = _forward(model, cache, nxt)
    for b in range(B):
        torch.testing.assert_close(logits[b, -1], _fresh_last_logits(model, prompts[b] + nxt[b].tolist()),
                                   rtol=1e-4, atol=1e-5)
    for bad in (0, 3):
        with pytest.raises(ValueError, match="num_layers"):
            with cache.partial_depth(bad):
                pass
    with pytest.raises(KeyError), cache.partial_depth(1):  # an exception inside still restores the lengths
        _forward(shallow, cache, nxt)
        raise KeyError
    assert cache.lengths.tolist() == [n + 2 for n in prompt_lens]
    _forward(model, cache, nxt)  # full depth again: the commit is back at the last layer
    assert cache.lengths.tolist() == [n + 4 for n in prompt_lens]


def test_ragged_cache_interface():
    model = _tiny_model("llama", "eager")
    cache = RaggedCache.from_model(model, batch_size=3, max_length=10)
    assert (len(cache), cache.batch_size, cache.max_length) == (2, 3, 10)
    assert cache.store.num_kv_heads == 2 and cache.store.head_dim == 16 and cache.store.dtype == torch.float32
    cache.set_left_padding(torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1]]))  # HF 2D padding mask
    assert cache.start.tolist() == [1, 0, 2]
    assert cache.position_ids(3).tolist() == [[-1, 0, 1], [0, 1, 2], [-2, -1, 0]]
    m = cache.attention_mask(3, additive=False)
    assert m.shape == (3, 1, 3, 3) and m.dtype == torch.bool
    assert m[0, 0].tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    assert cache.attention_mask(3).dtype == torch.float32  # eager model: additive mask
    assert cache.get_mask_sizes(3, 0) == (3, 0) and cache.get_mask_sizes(torch.arange(3), 0) == (3, 0)
    with pytest.raises(ValueError, match="left padding"):
        cache.store.append(torch.zeros(2, 3, 2, 3, 16), torch.zeros(2, 3, 2, 3, 16))
        cache.rollback(torch.tensor([3, 3, 1], dtype=torch.int32))
    cache.batch_repeat_interleave(2)
    assert cache.batch_size == 6 and cache.start.tolist() == [1, 1, 0, 0, 2, 2]
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.lengths.tolist() == [0] * 6


# ------------------------------------------------------------------------------------------------------
# CUDA sources

@pytest.mark.skipif(os.environ.get("SPECDEC_TEST_NVCC") != "1" or shutil.which("nvcc") is None
                    and not os.path.exists("/usr/local/cuda/bin/nvcc"),
                    reason="set SPECDEC_TEST_NVCC=1 (CI) with nvcc installed to compile the CUDA sources (~1 min)")
def test_cuda_sources_compile(tmp_path):
    from torch.utils.cpp_extension import include_paths
    import sysconfig

    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [nvcc, "-std=c++20", "-O1", "-arch=sm_90", "-c", os.path.join(root, "csrc", "cache_cuda.cu"),
           "-o", str(tmp_path / "cache_cuda.o"), "-I" + sysconfig.get_paths()["include"]]
    cmd += ["-I" + p for p in include_paths(device_type="cuda")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu():
    assert torch.ops.specdec_cpp.has_cuda_kernels()
    cpu = _filled_store("cpp", lengths=(3, 7, 1, 10), seed=8)
    gpu = KVStore(2, 4, 2, 8, 16, backend="cpp", device="cuda")
    gpu.keys.copy_(cpu.keys)
    gpu.values.copy_(cpu.values)
    gpu.lengths.copy_(cpu.lengths)
    gpu._set_host(cpu.host_lengths)
    new = torch.randn(2, 4, 2, 4, 8)
    for s in (cpu, gpu):
        dev = s.device
        s.append(new.to(dev), (new * 2).to(dev))
        s.rollback(torch.tensor([5, 7, 1, 12], device=dev))
        s.gather(torch.tensor([[4, 0], [6, 5], [0, 0], [11, 3]]), torch.tensor([2, 2, 1, 2]),
                 torch.tensor([1, 5, 0, 10]))
        s.select_rows(torch.tensor([3, 0, 1], device=dev))
    assert gpu.lengths.tolist() == cpu.lengths.tolist()
    for r, n in enumerate(cpu.lengths.tolist()):
        assert torch.equal(gpu.keys[:, r, :, :n].cpu(), cpu.keys[:, r, :, :n])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_store_never_waits_for_the_device_given_host_copies():
    """rollback / select_rows with the caller's host copies read nothing back from the device. On the
    meta device any device-to-host copy raises, so the calls below prove there is none."""
    meta = "meta"
    store = KVStore(2, 3, 2, 8, 16, device=meta)
    store.append(torch.empty(2, 3, 2, 4, 8, device=meta), torch.empty(2, 3, 2, 4, 8, device=meta))
    store.rollback(torch.empty(3, dtype=torch.int64, device=meta), host_lengths=torch.tensor([1, 2, 3]))
    assert store.host_lengths.tolist() == [1, 2, 3] and store.seq_length == 3
    store.select_rows(torch.empty(2, dtype=torch.int64, device=meta), host_index=torch.tensor([2, 0]))
    assert store.host_lengths.tolist() == [3, 1] and store.batch_size == 2
    with pytest.raises(NotImplementedError):  # without them: a copy back (a sync on CUDA)
        store.rollback(torch.empty(2, dtype=torch.int64, device=meta))
    # the host copies are checked like device values would be
    with pytest.raises(ValueError, match="row 0"):
        store.rollback(torch.empty(2, dtype=torch.int64, device=meta), host_lengths=torch.tensor([5, 0]))
    with pytest.raises(TypeError, match="host_lengths"):
        store.rollback(torch.empty(2, dtype=torch.int64, device=meta), host_lengths=[1, 0])
    with pytest.raises(RuntimeError, match="row_index"):
        store.select_rows(torch.empty(1, dtype=torch.int64, device=meta), host_index=torch.tensor([2]))
