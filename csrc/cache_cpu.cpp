// KV-cache store with per-row rollback: op schemas, input checks and CPU kernels (at::parallel_for).
// The CUDA kernels for the same ops live in cache_cuda.cu; the fake (meta) kernels in specdec/cache.py.
//
// Every kernel copies whole D-rows as raw bytes, so one implementation serves every float dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cache.h"

namespace specdec {
namespace cache {

// ---------------------------------------------------------------------------------------------------
// Value checks shared by the CPU and CUDA paths (they run on host copies of small index tensors).

void check_rollback_values(const at::Tensor& lengths_cpu, const at::Tensor& new_lengths_cpu) {
  auto cur = lengths_cpu.to(at::kLong).contiguous();
  auto nxt = new_lengths_cpu.to(at::kLong).contiguous();
  const int64_t* c = cur.data_ptr<int64_t>();
  const int64_t* n = nxt.data_ptr<int64_t>();
  for (int64_t b = 0; b < cur.numel(); ++b) {
    TORCH_CHECK(n[b] >= 0, "rollback: row ", b, " new length ", n[b], " is negative");
    TORCH_CHECK(n[b] <= c[b], "rollback: row ", b, " new length ", n[b], " exceeds its current length ", c[b],
                " (rollback only shortens rows; append to extend them)");
  }
}

void check_gather_values(const at::Tensor& lengths_cpu, const at::Tensor& keep_index_cpu,
                         const at::Tensor& keep_lengths_cpu, const at::Tensor& offset_cpu, int64_t max_len) {
  auto len = lengths_cpu.to(at::kLong).contiguous();
  auto idx = keep_index_cpu.to(at::kLong).contiguous();
  auto kl = keep_lengths_cpu.to(at::kLong).contiguous();
  auto off = offset_cpu.to(at::kLong).contiguous();
  const int64_t n_max = idx.size(1);
  for (int64_t b = 0; b < len.numel(); ++b) {
    const int64_t L = len.data_ptr<int64_t>()[b], n = kl.data_ptr<int64_t>()[b], o = off.data_ptr<int64_t>()[b];
    // keep_index and offset are bounded by the row length, so the length must be a valid slot count first
    TORCH_CHECK(L >= 0 && L <= max_len, "gather: row ", b, " length ", L, " outside [0, ", max_len,
                "] (lengths corrupted, e.g. by an unchecked rollback)");
    TORCH_CHECK(n >= 0 && n <= n_max, "gather: row ", b, " keep_length ", n, " outside [0, ", n_max, "]");
    TORCH_CHECK(o >= 0 && o <= L, "gather: row ", b, " offset ", o, " outside [0, current length ", L, "]");
    TORCH_CHECK(o + n <= max_len, "gather: row ", b, " would hold ", o + n, " positions, capacity is ", max_len);
    const int64_t* row = idx.data_ptr<int64_t>() + b * n_max;
    for (int64_t j = 0; j < n; ++j) {
      TORCH_CHECK(row[j] >= 0 && row[j] < L, "gather: row ", b, " keep_index[", j, "] = ", row[j],
                  " outside the row's stored positions [0, ", L, ")");
    }
  }
}

int64_t check_select_values(const at::Tensor& lengths_cpu, const at::Tensor& row_index_cpu, int64_t max_len) {
  auto len = lengths_cpu.to(at::kLong).contiguous();
  auto idx = row_index_cpu.to(at::kLong).contiguous();
  const int64_t B = len.numel();
  int64_t longest = 0;
  for (int64_t i = 0; i < idx.numel(); ++i) {
    const int64_t r = idx.data_ptr<int64_t>()[i];
    TORCH_CHECK(r >= 0 && r < B, "select_rows: row_index[", i, "] = ", r, " outside [0, ", B, ")");
    // the kernels copy lengths[r] slots of the old row: it must fit the old store, not just the new one
    const int64_t L = len.data_ptr<int64_t>()[r];
    TORCH_CHECK(L >= 0 && L <= max_len, "select_rows: row ", r, " length ", L, " outside [0, ", max_len,
                "] (lengths corrupted, e.g. by an unchecked rollback)");
    longest = std::max(longest, L);
  }
  return longest;
}

void check_capacity(const at::Tensor& lengths_cpu, int64_t q, int64_t max_len) {
  auto len = lengths_cpu.to(at::kLong).contiguous();
  for (int64_t b = 0; b < len.numel(); ++b) {
    const int64_t L = len.data_ptr<int64_t>()[b];
    // a negative length would write before the row (rollback with check=false can store one)
    TORCH_CHECK(L >= 0, "append: row ", b, " length ", L,
                " is negative (lengths corrupted, e.g. by an unchecked rollback); nothing was written");
    TORCH_CHECK(L + q <= max_len, "KV cache capacity exceeded: row ", b, " holds ", L, " positions, appending ", q,
                " needs ", L + q, " but T_max is ", max_len, "; nothing was written (call grow() first)");
  }
}

void rollback_impl(at::Tensor& lengths, const at::Tensor& new_lengths, bool check) {
  TORCH_CHECK(lengths.dim() == 1 && lengths.scalar_type() == at::kInt, "rollback: lengths must be a [B] int32 tensor");
  TORCH_CHECK(new_lengths.dim() == 1 && new_lengths.size(0) == lengths.size(0),
              "rollback: new_lengths must be [B] = [", lengths.size(0), "], got ", new_lengths.sizes());
  TORCH_CHECK(new_lengths.scalar_type() == at::kInt || new_lengths.scalar_type() == at::kLong,
              "rollback: new_lengths must be int32 or int64, got ", new_lengths.scalar_type());
  TORCH_CHECK(new_lengths.device() == lengths.device(), "rollback: new_lengths on ", new_lengths.device(),
              ", store lengths on ", lengths.device());
  if (check) check_rollback_values(lengths.cpu(), new_lengths.cpu());
  // O(1) in the sequence length: only B integers change; stale slots are overwritten by the next append.
  lengths.copy_(new_lengths);
}

// ---------------------------------------------------------------------------------------------------
// Op entry points shared by both devices: argument checks, then the device kernel.

namespace {

void check_append_args(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& lengths,
                       const at::Tensor& new_keys, const at::Tensor& new_values, int64_t layer_start) {
  check_store(keys, values, lengths, "append");
  TORCH_CHECK(new_keys.dim() == 5, "append: new_keys must be [L', B, H_kv, q, D], got ", new_keys.sizes());
  TORCH_CHECK(new_values.sizes() == new_keys.sizes(), "append: new_values shape ", new_values.sizes(),
              " differs from new_keys shape ", new_keys.sizes());
  TORCH_CHECK(new_keys.scalar_type() == keys.scalar_type() && new_values.scalar_type() == keys.scalar_type(),
              "append: new keys/values dtype ", new_keys.scalar_type(), "/", new_values.scalar_type(),
              " must match the store dtype ", keys.scalar_type());
  TORCH_CHECK(new_keys.device() == keys.device() && new_values.device() == keys.device(),
              "append: new keys/values on ", new_keys.device(), "/", new_values.device(), ", store on ",
              keys.device());
  // written as a difference: layer_start + L' overflows (and wraps past the check) for a huge layer_start
  TORCH_CHECK(layer_start >= 0 && layer_start <= keys.size(0) - new_keys.size(0), "append: layers [", layer_start,
              ", ", layer_start + new_keys.size(0), ") outside the store's ", keys.size(0), " layers");
  TORCH_CHECK(new_keys.size(1) == keys.size(1) && new_keys.size(2) == keys.size(2) &&
                  new_keys.size(4) == keys.size(4),
              "append: new_keys ", new_keys.sizes(), " do not fit the store [L, B, H_kv, T_max, D] = ", keys.sizes(),
              " (B, H_kv and D must match)");
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// CPU kernels.

namespace {

// Copies new_keys/new_values [L', B, H, q, D] (any strides, unit stride in D) to positions
// lengths[b] + t of layers layer_start + l.
void append_cpu_kernel(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& lengths,
                       const at::Tensor& nk, const at::Tensor& nv, int64_t layer_start) {
  const StoreGeometry g = geometry(keys);
  const int64_t Lp = nk.size(0), q = nk.size(3), es = keys.element_size();
  const int32_t* len = lengths.data_ptr<int32_t>();
  char* kd = static_cast<char*>(keys.data_ptr());
  char* vd = static_cast<char*>(values.data_ptr());
  const char* ks = static_cast<const char*>(nk.data_ptr());
  const char* vs = static_cast<const char*>(nv.data_ptr());
  const int64_t total = Lp * g.batch * g.heads;
  at::parallel_for(0, total, std::max<int64_t>(1, 2048 / std::max<int64_t>(1, q)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t l = i / (g.batch * g.heads), b = (i / g.heads) % g.batch, h = i % g.heads;
      const int64_t dst_row = (((layer_start + l) * g.batch + b) * g.heads + h) * g.max_len + len[b];
      for (int64_t t = 0; t < q; ++t) {
        const int64_t koff = (l * nk.stride(0) + b * nk.stride(1) + h * nk.stride(2) + t * nk.stride(3)) * es;
        const int64_t voff = (l * nv.stride(0) + b * nv.stride(1) + h * nv.stride(2) + t * nv.stride(3)) * es;
        std::memcpy(kd + (dst_row + t) * g.head_bytes, ks + koff, g.head_bytes);
        std::memcpy(vd + (dst_row + t) * g.head_bytes, vs + voff, g.head_bytes);
      }
    }
  });
}

void cache_append_cpu(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& lengths,
                      const at::Tensor& new_keys, const at::Tensor& new_values, int64_t layer_start, bool advance,
                      int64_t max_length) {
  (void)max_length;  // the CPU path always checks the exact lengths (no synchronisation to avoid)
  check_append_args(keys, values, lengths, new_keys, new_values, layer_start);
  const int64_t q = new_keys.size(3);
  check_capacity(lengths, q, keys.size(3));  // before any write: a failed append leaves the store untouched
  // memcpy of whole D-rows needs unit stride in D; HF's k/v ([B, q, H, D] transposed) already have it.
  auto nk = new_keys.stride(4) == 1 ? new_keys : new_keys.contiguous();
  auto nv = new_values.stride(4) == 1 ? new_values : new_values.contiguous();
  append_cpu_kernel(keys, values, lengths, nk, nv, layer_start);
  if (advance) {
    int32_t* len = lengths.data_ptr<int32_t>();
    for (int64_t b = 0; b < lengths.numel(); ++b) len[b] += static_cast<int32_t>(q);
  }
}

void cache_rollback_any(const at::Tensor& lengths, const at::Tensor& new_lengths, bool check) {
  at::Tensor l = lengths;
  rollback_impl(l, new_lengths, check);
}

// In place, per (layer, row, head): positions keep_index[b, j] move to offset[b] + j for j < keep_lengths[b].
// Each task stages its rows in a local buffer, so any index order (overlapping source and destination) is safe.
void cache_gather_cpu(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& lengths,
                      const at::Tensor& keep_index, const at::Tensor& keep_lengths, const at::Tensor& offset,
                      bool check) {
  (void)check;  // always checked on CPU: the values are already on the host
  check_store(keys, values, lengths, "gather");
  check_index_tensor(keep_index, keys, 2, "gather", "keep_index");
  check_index_tensor(keep_lengths, keys, 1, "gather", "keep_lengths");
  check_index_tensor(offset, keys, 1, "gather", "offset");
  const int64_t B = keys.size(1);
  TORCH_CHECK(keep_index.size(0) == B && keep_lengths.size(0) == B && offset.size(0) == B,
              "gather: keep_index [B, N], keep_lengths [B] and offset [B] need B = ", B, ", got ",
              keep_index.sizes(), ", ", keep_lengths.sizes(), ", ", offset.sizes());
  check_gather_values(lengths, keep_index, keep_lengths, offset, keys.size(3));

  const StoreGeometry g = geometry(keys);
  auto idx = keep_index.to(at::kLong).contiguous();
  auto kl = keep_lengths.to(at::kLong).contiguous();
  auto off = offset.to(at::kLong).contiguous();
  const int64_t n_max = idx.size(1);
  const int64_t* ip = idx.data_ptr<int64_t>();
  const int64_t* klp = kl.data_ptr<int64_t>();
  const int64_t* offp = off.data_ptr<int64_t>();
  char* bases[2] = {static_cast<char*>(keys.data_ptr()), static_cast<char*>(values.data_ptr())};
  at::parallel_for(0, g.num_layers * B * g.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<char> stage;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = (i / g.heads) % B, n = klp[b];
      if (n == 0) continue;
      stage.resize(n * g.head_bytes);
      for (char* base : bases) {
        char* row = base + i * g.max_len * g.head_bytes;  // i enumerates (l, b, h) in storage order
        for (int64_t j = 0; j < n; ++j)
          std::memcpy(stage.data() + j * g.head_bytes, row + ip[b * n_max + j] * g.head_bytes, g.head_bytes);
        std::memcpy(row + offp[b] * g.head_bytes, stage.data(), n * g.head_bytes);
      }
    }
  });
  int32_t* len = lengths.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) len[b] = static_cast<int32_t>(offp[b] + klp[b]);
}

// Out of place: new store [L, B', H, max_length, D] whose row r is old row row_index[r] (drop, reorder,
// duplicate rows; grow or shrink capacity). One pass writes every byte (copy or zero), no separate memset.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cache_select_rows_cpu(const at::Tensor& keys,
                                                                    const at::Tensor& values,
                                                                    const at::Tensor& lengths,
                                                                    const at::Tensor& row_index,
                                                                    int64_t max_length) {
  check_store(keys, values, lengths, "select_rows");
  check_index_tensor(row_index, keys, 1, "select_rows", "row_index");
  TORCH_CHECK(max_length >= 0, "select_rows: max_length must be >= 0, got ", max_length);
  const int64_t longest = check_select_values(lengths, row_index, keys.size(3));
  TORCH_CHECK(longest <= max_length, "select_rows: a selected row holds ", longest,
              " positions, more than the new capacity max_length = ", max_length);
  const StoreGeometry g = geometry(keys);
  auto idx = row_index.to(at::kLong).contiguous();
  const int64_t Bn = idx.numel();
  auto new_keys = at::empty({g.num_layers, Bn, g.heads, max_length, keys.size(4)}, keys.options());
  auto new_values = at::empty_like(new_keys);
  const int64_t* ip = idx.data_ptr<int64_t>();
  const int32_t* len = lengths.data_ptr<int32_t>();
  const char* src[2] = {static_cast<const char*>(keys.data_ptr()), static_cast<const char*>(values.data_ptr())};
  char* dst[2] = {static_cast<char*>(new_keys.data_ptr()), static_cast<char*>(new_values.data_ptr())};
  at::parallel_for(0, g.num_layers * Bn * g.heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t l = i / (Bn * g.heads), r = (i / g.heads) % Bn, h = i % g.heads;
      const int64_t s = ip[r], n = len[s];
      const int64_t src_row = ((l * g.batch + s) * g.heads + h) * g.max_len;
      for (int k = 0; k < 2; ++k) {
        char* d = dst[k] + i * max_length * g.head_bytes;
        std::memcpy(d, src[k] + src_row * g.head_bytes, n * g.head_bytes);  // positions are contiguous
        std::memset(d + n * g.head_bytes, 0, (max_length - n) * g.head_bytes);  // zeros: finite under any mask
      }
    }
  });
  return {new_keys, new_values, lengths.index_select(0, idx)};
}

}  // namespace
}  // namespace cache
}  // namespace specdec

TORCH_LIBRARY_FRAGMENT(specdec_cpp, m) {
  m.def(
      "cache_append(Tensor(a!) keys, Tensor(b!) values, Tensor(c!) lengths, Tensor new_keys, Tensor new_values, "
      "int layer_start, bool advance, int max_length) -> ()");
  m.def("cache_rollback(Tensor(a!) lengths, Tensor new_lengths, bool check) -> ()");
  m.def(
      "cache_gather(Tensor(a!) keys, Tensor(b!) values, Tensor(c!) lengths, Tensor keep_index, "
      "Tensor keep_lengths, Tensor offset, bool check) -> ()");
  m.def(
      "cache_select_rows(Tensor keys, Tensor values, Tensor lengths, Tensor row_index, int max_length) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(specdec_cpp, CPU, m) {
  m.impl("cache_append", &specdec::cache::cache_append_cpu);
  m.impl("cache_rollback", &specdec::cache::cache_rollback_any);
  m.impl("cache_gather", &specdec::cache::cache_gather_cpu);
  m.impl("cache_select_rows", &specdec::cache::cache_select_rows_cpu);
}
