// KV-cache store with per-row rollback: CUDA kernels (schemas and checks are in cache_cpu.cpp).
//
// All copies move whole D-rows as raw bytes in the widest unit (16/8/4/2/1 bytes) that every address
// involved is aligned to, so one kernel serves every float dtype. Nothing here synchronises with the host
// unless a caller asks for value checks (`check=true`, or append without a host-known max length).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>

#include "cache.h"

namespace specdec {
namespace cache {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxStageBytes = 48 * 1024;  // default dynamic shared memory limit, no opt-in needed

// Widest copy unit that divides every byte offset/size given (pointers are passed as integers).
int pick_unit(std::initializer_list<int64_t> offsets) {
  for (int unit : {16, 8, 4, 2}) {
    bool ok = true;
    for (int64_t o : offsets) ok = ok && (o % unit == 0);
    if (ok) return unit;
  }
  return 1;
}

template <int N>
struct Unit;
template <>
struct Unit<16> { using type = uint4; };
template <>
struct Unit<8> { using type = uint2; };
template <>
struct Unit<4> { using type = uint32_t; };
template <>
struct Unit<2> { using type = uint16_t; };
template <>
struct Unit<1> { using type = uint8_t; };

template <typename F>
void dispatch_unit(int unit, F&& f) {
  switch (unit) {
    case 16: f(Unit<16>{}); break;
    case 8: f(Unit<8>{}); break;
    case 4: f(Unit<4>{}); break;
    case 2: f(Unit<2>{}); break;
    default: f(Unit<1>{}); break;
  }
}

// Clamp used wherever a kernel reads an unchecked length or offset: checking on the host would cost a
// synchronisation, so garbage values are clamped on the device instead (garbage out, but in bounds).
__device__ __forceinline__ int64_t clamp_to(int64_t x, int64_t hi) { return x < 0 ? 0 : (x > hi ? hi : x); }

int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 32)); }

// ---------------------------------------------------------------------------------------------------
// append: one thread per copy unit of one (l, b, h, t) row; grid-stride loop.
template <typename U>
__global__ void append_kernel(U* __restrict__ kd, U* __restrict__ vd, const char* __restrict__ ks,
                              const char* __restrict__ vs, const int32_t* __restrict__ len, int64_t layer_start,
                              int64_t Lp, int64_t B, int64_t H, int64_t q, int64_t T, int64_t upr,
                              int64_t ks0, int64_t ks1, int64_t ks2, int64_t ks3, int64_t vs0, int64_t vs1,
                              int64_t vs2, int64_t vs3) {
  const int64_t total = Lp * B * H * q * upr;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t u = idx % upr, row = idx / upr;
    const int64_t t = row % q, h = (row / q) % H, b = (row / (q * H)) % B, l = row / (q * H * B);
    // The host checked the capacity only against the caller's max_length hint: a length outside [0, T]
    // (wrong hint, unchecked rollback) is clamped and slots past T are skipped, so no write leaves the row.
    const int64_t pos = clamp_to(len[b], T) + t;
    if (pos >= T) continue;
    const int64_t dst = ((((layer_start + l) * B + b) * H + h) * T + pos) * upr + u;
    kd[dst] = *reinterpret_cast<const U*>(ks + l * ks0 + b * ks1 + h * ks2 + t * ks3 + u * sizeof(U));
    vd[dst] = *reinterpret_cast<const U*>(vs + l * vs0 + b * vs1 + h * vs2 + t * vs3 + u * sizeof(U));
  }
}

void cache_append_cuda(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& lengths,
                       const at::Tensor& new_keys, const at::Tensor& new_values, int64_t layer_start, bool advance,
                       int64_t max_length) {
  check_store(keys, values, lengths, "append");
  TORCH_CHECK(new_keys.dim() == 5 && new_values.sizes() == new_keys.sizes(),
              "append: new_keys/new_values must both be [L', B, H_kv, q, D], got ", new_keys.sizes(), " and ",
              new_values.sizes());
  TORCH_CHECK(new_keys.scalar_type() == keys.scalar_type() && new_values.scalar_type() == keys.scalar_type(),
              "append: new keys/values dtype must match the store dtype ", keys.scalar_type());
  TORCH_CHECK(new_keys.device() == keys.device() && new_values.device() == keys.device(),
              "append: new keys/values on ", new_keys.device(), ", store on ", keys.device());
  // written as a difference: layer_start + L' overflows (and wraps past the check) for a huge layer_start
  TORCH_CHECK(layer_start >= 0 && layer_start <= keys.size(0) - new_keys.size(0), "append: layers [", layer_start,
              ", ", layer_start + new_keys.size(0), ") outside the store's ", keys.size(0), " layers");
  TORCH_CHECK(new_keys.size(1) == keys.size(1) && new_keys.size(2) == keys.size(2) &&
                  new_keys.size(4) == keys.size(4),
              "append: new_keys ", new_keys.sizes(), " do not fit the store ", keys.sizes());
  const int64_t q = new_keys.size(3), T = keys.size(3);
  // Capacity before any write. The host-known maximum avoids a synchronisation on the hot path.
  if (max_length >= 0) {
    TORCH_CHECK(max_length + q <= T, "KV cache capacity exceeded: the longest row holds ", max_length,
                " positions, appending ", q, " needs ", max_length + q, " but T_max is ", T,
                "; nothing was written (call grow() first)");
  } else {
    check_capacity(lengths.cpu(), q, T);
  }
  if (q == 0 || new_keys.numel() == 0) return;
  c10::cuda::CUDAGuard guard(keys.device());
  auto nk = new_keys.stride(4) == 1 ? new_keys : new_keys.contiguous();
  auto nv = new_values.stride(4) == 1 ? new_values : new_values.contiguous();
  const int64_t es = keys.element_size(), hb = keys.size(4) * es;
  const int unit = pick_unit({(int64_t)(uintptr_t)keys.data_ptr(), (int64_t)(uintptr_t)values.data_ptr(),
                              (int64_t)(uintptr_t)nk.data_ptr(), (int64_t)(uintptr_t)nv.data_ptr(), hb,
                              nk.stride(0) * es, nk.stride(1) * es, nk.stride(2) * es, nk.stride(3) * es,
                              nv.stride(0) * es, nv.stride(1) * es, nv.stride(2) * es, nv.stride(3) * es});
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_unit(unit, [&](auto tag) {
    using U = typename decltype(tag)::type;
    const int64_t upr = hb / (int64_t)sizeof(U);
    const int64_t total = nk.size(0) * nk.size(1) * nk.size(2) * q * upr;
    append_kernel<U><<<blocks_for(total), kThreads, 0, stream>>>(
        static_cast<U*>(keys.data_ptr()), static_cast<U*>(values.data_ptr()),
        static_cast<const char*>(nk.data_ptr()), static_cast<const char*>(nv.data_ptr()),
        lengths.data_ptr<int32_t>(), layer_start, nk.size(0), keys.size(1), keys.size(2), q, T, upr,
        nk.stride(0) * es, nk.stride(1) * es, nk.stride(2) * es, nk.stride(3) * es, nv.stride(0) * es,
        nv.stride(1) * es, nv.stride(2) * es, nv.stride(3) * es);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (advance) lengths.add_(static_cast<int32_t>(q));  // async, stays on the device
}

void cache_rollback_cuda(const at::Tensor& lengths, const at::Tensor& new_lengths, bool check) {
  c10::cuda::CUDAGuard guard(lengths.device());
  at::Tensor l = lengths;
  rollback_impl(l, new_lengths, check);
}

// ---------------------------------------------------------------------------------------------------
// gather: one block per (l, b, h). The kept rows are staged in shared memory before any is written, so
// any index order is safe in place (source and destination ranges may overlap).
template <typename U>
__global__ void gather_staged_kernel(U* __restrict__ kd, U* __restrict__ vd, const int64_t* __restrict__ idx,
                                     const int64_t* __restrict__ keep_len, const int64_t* __restrict__ off,
                                     int64_t B, int64_t H, int64_t T, int64_t n_max, int64_t upr) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  U* stage = reinterpret_cast<U*>(smem_raw);
  const int64_t i = blockIdx.x;  // (l, b, h) in storage order
  const int64_t b = (i / H) % B;
  // Unchecked (check=false) values are clamped: n bounds the idx row and the shared stage, o the destination.
  const int64_t n = clamp_to(keep_len[b], n_max), o = clamp_to(off[b], T);
  U* bases[2] = {kd, vd};
  for (int k = 0; k < 2; ++k) {
    U* row = bases[k] + i * T * upr;
    for (int64_t e = threadIdx.x; e < n * upr; e += blockDim.x) {
      const int64_t j = e / upr, src = idx[b * n_max + j];
      if (src >= 0 && src < T) stage[e] = row[src * upr + e % upr];
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < n * upr; e += blockDim.x) {
      const int64_t j = e / upr, src = idx[b * n_max + j];
      if (src >= 0 && src < T && o + j < T) row[(o + j) * upr + e % upr] = stage[e];
    }
    __syncthreads();
  }
}

// Fallback for kept lists too long to stage in shared memory: gather into scratch [L, B, H, n_max, D],
// then write back (two kernels; only reached for very long compactions).
template <typename U>
__global__ void gather_to_scratch_kernel(const U* __restrict__ src_base, U* __restrict__ scratch,
                                         const int64_t* __restrict__ idx, const int64_t* __restrict__ keep_len,
                                         int64_t rows, int64_t B, int64_t H, int64_t T, int64_t n_max,
                                         int64_t upr) {
  const int64_t total = rows * n_max * upr;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t u = e % upr, j = (e / upr) % n_max, i = e / (upr * n_max), b = (i / H) % B;
    if (j >= keep_len[b]) continue;
    const int64_t src = idx[b * n_max + j];
    if (src >= 0 && src < T) scratch[e] = src_base[(i * T + src) * upr + u];
  }
}

template <typename U>
__global__ void scatter_from_scratch_kernel(U* __restrict__ dst_base, const U* __restrict__ scratch,
                                            const int64_t* __restrict__ keep_len, const int64_t* __restrict__ off,
                                            int64_t rows, int64_t B, int64_t H, int64_t T, int64_t n_max,
                                            int64_t upr) {
  const int64_t total = rows * n_max * upr;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t u = e % upr, j = (e / upr) % n_max, i = e / (upr * n_max), b = (i / H) % B;
    const int64_t o = clamp_to(off[b], T);  // unchecked offsets clamped as in gather_staged_kernel
    if (j >= keep_len[b] || o + j >= T) continue;
    dst_base[(i * T + o + j) * upr + u] = scratch[e];
  }
}

void cache_gather_cuda(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& lengths,
                       const at::Tensor& keep_index, const at::Tensor& keep_lengths, const at::Tensor& offset,
                       bool check) {
  check_store(keys, values, lengths, "gather");
  check_index_tensor(keep_index, keys, 2, "gather", "keep_index");
  check_index_tensor(keep_lengths, keys, 1, "gather", "keep_lengths");
  check_index_tensor(offset, keys, 1, "gather", "offset");
  const int64_t B = keys.size(1), H = keys.size(2), T = keys.size(3), L = keys.size(0);
  TORCH_CHECK(keep_index.size(0) == B && keep_lengths.size(0) == B && offset.size(0) == B,
              "gather: keep_index [B, N], keep_lengths [B] and offset [B] need B = ", B);
  if (check) check_gather_values(lengths.cpu(), keep_index.cpu(), keep_lengths.cpu(), offset.cpu(), T);
  c10::cuda::CUDAGuard guard(keys.device());
  auto idx = keep_index.to(at::kLong).contiguous();
  auto kl = keep_lengths.to(at::kLong).contiguous();
  auto off = offset.to(at::kLong).contiguous();
  const int64_t n_max = idx.size(1), hb = keys.size(4) * keys.element_size(), rows = L * B * H;
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (n_max > 0 && rows > 0) {
    const int unit = pick_unit({(int64_t)(uintptr_t)keys.data_ptr(), (int64_t)(uintptr_t)values.data_ptr(), hb});
    dispatch_unit(unit, [&](auto tag) {
      using U = typename decltype(tag)::type;
      const int64_t upr = hb / (int64_t)sizeof(U);
      if (n_max * hb <= kMaxStageBytes) {
        gather_staged_kernel<U><<<static_cast<unsigned>(rows), kThreads, n_max * hb, stream>>>(
            static_cast<U*>(keys.data_ptr()), static_cast<U*>(values.data_ptr()), idx.data_ptr<int64_t>(),
            kl.data_ptr<int64_t>(), off.data_ptr<int64_t>(), B, H, T, n_max, upr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        auto scratch = at::empty({L, B, H, n_max, keys.size(4)}, keys.options());
        const int64_t total = rows * n_max * upr;
        for (const at::Tensor* side : {&keys, &values}) {
          gather_to_scratch_kernel<U><<<blocks_for(total), kThreads, 0, stream>>>(
              static_cast<const U*>(side->data_ptr()), static_cast<U*>(scratch.data_ptr()),
              idx.data_ptr<int64_t>(), kl.data_ptr<int64_t>(), rows, B, H, T, n_max, upr);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          scatter_from_scratch_kernel<U><<<blocks_for(total), kThreads, 0, stream>>>(
              static_cast<U*>(side->data_ptr()), static_cast<const U*>(scratch.data_ptr()),
              kl.data_ptr<int64_t>(), off.data_ptr<int64_t>(), rows, B, H, T, n_max, upr);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      }
    });
  }
  // new length = offset + kept count, on the device; unchecked, the same clamps as the kernels keep it in [0, T]
  if (check) {
    lengths.copy_(off + kl);
  } else {
    lengths.copy_((off.clamp(0, T) + kl.clamp(0, n_max)).clamp_max_(T));
  }
}

// ---------------------------------------------------------------------------------------------------
// select_rows: new store, one block per (l, r, h); copies the stored prefix and zero-fills the rest.
template <typename U>
__global__ void select_rows_kernel(const U* __restrict__ ks, const U* __restrict__ vs, U* __restrict__ kd,
                                   U* __restrict__ vd, const int64_t* __restrict__ row_index,
                                   const int32_t* __restrict__ len, int64_t B, int64_t Bn, int64_t H, int64_t T,
                                   int64_t Tn, int64_t upr) {
  const int64_t i = blockIdx.x;  // (l, r, h) in the new store's storage order
  const int64_t l = i / (Bn * H), r = (i / H) % Bn, h = i % H;
  const int64_t s = row_index[r];
  // The host always validates row_index and lengths here; the device guards anyway (a bad row reads as
  // zeros, a length is clamped to both capacities) so the kernel alone can never read out of bounds.
  const bool ok = s >= 0 && s < B;
  const int64_t n = ok ? clamp_to(len[s], T < Tn ? T : Tn) * upr : 0, total = Tn * upr;
  const int64_t src = ((l * B + (ok ? s : 0)) * H + h) * T * upr, dst = i * Tn * upr;
  const U zero = U();
  for (int64_t e = threadIdx.x; e < total; e += blockDim.x) {
    kd[dst + e] = e < n ? ks[src + e] : zero;
    vd[dst + e] = e < n ? vs[src + e] : zero;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cache_select_rows_cuda(const at::Tensor& keys,
                                                                     const at::Tensor& values,
                                                                     const at::Tensor& lengths,
                                                                     const at::Tensor& row_index,
                                                                     int64_t max_length) {
  check_store(keys, values, lengths, "select_rows");
  check_index_tensor(row_index, keys, 1, "select_rows", "row_index");
  TORCH_CHECK(max_length >= 0, "select_rows: max_length must be >= 0, got ", max_length);
  // Always checked (one synchronisation): selecting rows is rare and a bad index would read out of bounds.
  const int64_t longest = check_select_values(lengths.cpu(), row_index.cpu(), keys.size(3));
  TORCH_CHECK(longest <= max_length, "select_rows: a selected row holds ", longest,
              " positions, more than the new capacity max_length = ", max_length);
  c10::cuda::CUDAGuard guard(keys.device());
  auto idx = row_index.to(at::kLong).contiguous();
  const int64_t L = keys.size(0), B = keys.size(1), H = keys.size(2), T = keys.size(3), Bn = idx.numel();
  auto new_keys = at::empty({L, Bn, H, max_length, keys.size(4)}, keys.options());
  auto new_values = at::empty_like(new_keys);
  const int64_t rows = L * Bn * H, hb = keys.size(4) * keys.element_size();
  if (rows > 0 && max_length > 0) {
    const int unit = pick_unit({(int64_t)(uintptr_t)keys.data_ptr(), (int64_t)(uintptr_t)values.data_ptr(),
                                (int64_t)(uintptr_t)new_keys.data_ptr(), (int64_t)(uintptr_t)new_values.data_ptr(),
                                hb});
    auto stream = c10::cuda::getCurrentCUDAStream();
    dispatch_unit(unit, [&](auto tag) {
      using U = typename decltype(tag)::type;
      select_rows_kernel<U><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
          static_cast<const U*>(keys.data_ptr()), static_cast<const U*>(values.data_ptr()),
          static_cast<U*>(new_keys.data_ptr()), static_cast<U*>(new_values.data_ptr()), idx.data_ptr<int64_t>(),
          lengths.data_ptr<int32_t>(), B, Bn, H, T, max_length, hb / (int64_t)sizeof(U));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {new_keys, new_values, lengths.index_select(0, idx)};
}

}  // namespace
}  // namespace cache
}  // namespace specdec

TORCH_LIBRARY_IMPL(specdec_cpp, CUDA, m) {
  m.impl("cache_append", &specdec::cache::cache_append_cuda);
  m.impl("cache_rollback", &specdec::cache::cache_rollback_cuda);
  m.impl("cache_gather", &specdec::cache::cache_gather_cuda);
  m.impl("cache_select_rows", &specdec::cache::cache_select_rows_cuda);
}
