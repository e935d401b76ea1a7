// KV-cache store with per-row lengths: shared checks and declarations for the CPU and CUDA kernels.
//
// Layout: all layers of a store live in one tensor per side,
//   keys, values : [L, B, H_kv, T_max, D], contiguous, any floating dtype (copies are byte-wise)
//   lengths      : [B] int32 on the store's device, tokens stored per row
// One tensor for all layers means "all layers in one call" is one kernel over a 5-D index space, and a
// single layer is just the contiguous view keys[l:l+1].
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace specdec {
namespace cache {

// Byte geometry of a contiguous store, used by every kernel (they copy whole D-rows as raw bytes).
struct StoreGeometry {
  int64_t num_layers, batch, heads, max_len, head_bytes;  // head_bytes = D * element_size
};

inline void check_store(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& lengths,
                        const char* op) {
  TORCH_CHECK(keys.dim() == 5, op, ": keys must be [L, B, H_kv, T_max, D], got ", keys.sizes());
  TORCH_CHECK(values.sizes() == keys.sizes(), op, ": values shape ", values.sizes(),
              " differs from keys shape ", keys.sizes());
  TORCH_CHECK(values.scalar_type() == keys.scalar_type(), op, ": values dtype ", values.scalar_type(),
              " differs from keys dtype ", keys.scalar_type());
  TORCH_CHECK(at::isFloatingType(keys.scalar_type()), op, ": the store must hold a floating dtype, got ",
              keys.scalar_type());
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous(), op, ": keys and values must be contiguous");
  TORCH_CHECK(values.device() == keys.device(), op, ": values on ", values.device(), ", keys on ", keys.device());
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == keys.size(1), op, ": lengths must be [B] = [",
              keys.size(1), "], got ", lengths.sizes());
  TORCH_CHECK(lengths.scalar_type() == at::kInt, op, ": lengths must be int32, got ", lengths.scalar_type());
  TORCH_CHECK(lengths.device() == keys.device(), op, ": lengths on ", lengths.device(), ", store on ",
              keys.device());
  TORCH_CHECK(lengths.is_contiguous(), op, ": lengths must be contiguous");
}

inline StoreGeometry geometry(const at::Tensor& keys) {
  return {keys.size(0), keys.size(1), keys.size(2), keys.size(3), keys.size(4) * (int64_t)keys.element_size()};
}

inline void check_index_tensor(const at::Tensor& t, const at::Tensor& keys, int64_t dim, const char* op,
                               const char* name) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dimension(s), got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, ": ", name,
              " must be int32 or int64, got ", t.scalar_type());
  TORCH_CHECK(t.device() == keys.device(), op, ": ", name, " on ", t.device(), ", store on ", keys.device());
}

// Validation that needs the values of small index tensors; on CUDA the caller copies them to the host
// first (one synchronisation), which is why the ops take a `check` flag.
void check_rollback_values(const at::Tensor& lengths_cpu, const at::Tensor& new_lengths_cpu);
void check_gather_values(const at::Tensor& lengths_cpu, const at::Tensor& keep_index_cpu,
                         const at::Tensor& keep_lengths_cpu, const at::Tensor& offset_cpu, int64_t max_len);
// Returns max(lengths[row_index]) after checking that every index lies in [0, B) and every selected
// length in [0, max_len] (the old store's T_max).
int64_t check_select_values(const at::Tensor& lengths_cpu, const at::Tensor& row_index_cpu, int64_t max_len);
// Raises (naming the row) when some lengths[b] < 0, or "capacity exceeded" when lengths[b] + q > max_len.
void check_capacity(const at::Tensor& lengths_cpu, int64_t q, int64_t max_len);

// Shared, device-agnostic entry points (ATen only).
void rollback_impl(at::Tensor& lengths, const at::Tensor& new_lengths, bool check);

}  // namespace cache
}  // namespace specdec
