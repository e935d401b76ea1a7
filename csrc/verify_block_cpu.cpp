// specdec_cpp::verify_block on CPU: block verification of a chain (Sun et al., "Block Verification
// Accelerates Speculative Decoding", ICLR 2025). reference.verify_block is the specification.
//
// Per sampled row, with g = the drafts before the -1 tail or the first id outside [0, Vd):
//  1. forward walk over positions 0..g: the statistics of each position (verify_cpu.cpp's pass)
//     and the weight w_{i+1} = min(1, w_i p_i(x_i) / q_i(x_i)) from the draft's own logit. A
//     weight of 0 (the target gives a draft probability 0, or a position has no finite logit)
//     ends the walk: no later test can hold, so later positions are never read;
//  2. backward scan i = last, ..., 1: "keep i drafts" holds iff u_i <= w_g (i = g) or
//     u_i (R_i + 1 - w_i) <= R_i, R_i the mass of max(0, w_i p_i - q_i): one sweep over position
//     i's vocabulary (and draft_probs row), whose per-race-block sums are also the block sums of
//     the race if the scan stops there. u_i: STREAM_ACCEPT_PREFIX at offset + i - 1, index i - 1;
//  3. at the stop s: the two-level race (sampling_common.h) over that residual on the resample
//     streams (mass 0: over p_s), or, when every draft was kept, the bonus: the target's own
//     sample at g (the sample op's streams), as in verify_cpu.cpp.
// Greedy rows are verify_cpu.cpp's walk (accept while the draft is the argmax, emit the argmax).
// Calls without draft_probs never get here: the dispatcher sends them to verify (block and token
// verification coincide for a one-hot draft). Parallel schedule, dtypes, scratch and the token
// bitmask ([B, K+1, W], read in the loads) as verify_cpu.
#include <torch/library.h>

#include "sampling_common.h"

namespace specdec {
namespace {

struct BlockRow : RowSampling {
  int64_t n_drafts;  // drafts before the first -1 (greedy rows' walk)
  int64_t g;         // the chain: drafts before the -1 tail or an id outside [0, Vd)
};

std::tuple<at::Tensor, at::Tensor> verify_block_cpu(const at::Tensor& target_logits_in,
                                                    const at::Tensor& draft_token_ids,
                                                    const at::Tensor& draft_probs_in,
                                                    const at::Tensor& temperature, const at::Tensor& top_k,
                                                    const at::Tensor& top_p, const at::Tensor& seed,
                                                    const at::Tensor& offset,
                                                    const c10::optional<at::Tensor>& token_bitmask_opt) {
  TORCH_CHECK(target_logits_in.dim() == 3, "verify_block: target_logits must be [B, K+1, V]");
  const at::Tensor logits = target_logits_in.contiguous();
  const int64_t B = logits.size(0), K1 = logits.size(1), Vt = logits.size(2), K = K1 - 1;
  TORCH_CHECK(K1 >= 1 && Vt >= 1, "verify_block: target_logits needs K+1 >= 1 positions and V >= 1");
  TORCH_CHECK(draft_token_ids.dim() == 2 && draft_token_ids.size(0) == B && draft_token_ids.size(1) == K,
              "verify_block: draft_token_ids must be [B, K]");
  const at::Tensor drafts = draft_token_ids.to(at::kLong).contiguous();
  const RowParams rp(temperature, top_k, top_p, seed, offset, B, "verify_block");
  const at::Tensor q_all = draft_probs_in.contiguous();
  TORCH_CHECK(q_all.dim() == 3 && q_all.size(0) == B && q_all.size(1) == K && q_all.size(2) >= 1 &&
                  q_all.size(2) <= Vt,
              "verify_block: draft_probs must be [B, K, Vd] with 1 <= Vd <= V");
  const int64_t Vd = q_all.size(2);
  const at::Tensor mask = check_bitmask(token_bitmask_opt, {B, K1}, "verify_block");
  const int32_t* M = mask.defined() ? mask.data_ptr<int32_t>() : nullptr;
  const int64_t W = mask.defined() ? mask.size(2) : 0;

  auto out_ids = at::full({B, K1}, -1, logits.options().dtype(at::kLong));
  auto num_acc = at::zeros({B}, logits.options().dtype(at::kInt));
  if (B == 0) return {out_ids, num_acc};
  const int64_t* dr = drafts.data_ptr<int64_t>();

  std::vector<BlockRow> rows(B);
  for (int64_t b = 0; b < B; ++b) {
    BlockRow& r = rows[b];
    r.n_drafts = K;
    for (int64_t i = 0; i < K; ++i)
      if (dr[b * K + i] == -1) { r.n_drafts = i; break; }
    r.g = 0;
    while (r.g < K && dr[b * K + r.g] >= 0 && dr[b * K + r.g] < Vd) ++r.g;
    r.set(rp, b, Vt);
  }

  const int64_t nchunk = (Vt + kChunk - 1) / kChunk;
  const int64_t nblock = (Vt + kRaceBlock - 1) / kRaceBlock;
  std::vector<PosStats> stats(B * K1);
  std::vector<double> weight(B * K1);          // w_i per (row, position)
  std::vector<ChunkStats> parts(B * nchunk);
  std::vector<double> block_sums(B * nblock);  // per row: the race's block sums
  std::vector<float> bmax(B * nblock);          // per row, latest position: each block's max logit
  std::vector<double> bsum(B * nblock);         // ... and its sum of exp((x - block max) / t)
  const int64_t grain_chunks = std::max<int64_t>(1, 32768 / std::min(Vt, kChunk));
  int64_t* out = out_ids.data_ptr<int64_t>();
  int32_t* na = num_acc.data_ptr<int32_t>();

  dispatch_float(logits.scalar_type(), "verify_block: target_logits", [&](auto tag) {
    dispatch_float(q_all.scalar_type(), "verify_block: draft_probs", [&](auto qtag) {
      using T = decltype(tag);
      using Q = decltype(qtag);
      const T* L = logits.data_ptr<T>();
      const Q* Qp = q_all.data_ptr<Q>();
      auto row_at = [&](int64_t b, int64_t pos) {  // position (b, pos)'s logits through its mask
        const int64_t i = b * K1 + pos;
        return Logits<T>{L + i * Vt, M ? M + i * W : nullptr, W, 0};
      };
      auto at = [&](int64_t b, int64_t j) { return int64_t(uint64_t(rp.offset[b]) + uint64_t(j)); };

      auto run_row = [&](int64_t b, auto&& exec) {
        const BlockRow& r = rows[b];
        ChunkStats* cs = &parts[b * nchunk];
        double* w = &weight[b * K1];
        double* sums = &block_sums[b * nblock];
        // statistics of (b, pos) into stats[b * K1 + pos] (and bmax / bsum for sampled rows)
        auto stats_at = [&](int64_t pos) -> PosStats& {
          PosStats& st = stats[b * K1 + pos];
          st = position_stats(row_at(b, pos), Vt, r, rp.top_k[b], double(rp.top_p[b]), !r.greedy && !r.filtered,
                              false, &bmax[b * nblock], &bsum[b * nblock], cs, exec);
          return st;
        };

        if (r.greedy) {  // verify_cpu.cpp's greedy walk
          int64_t s = -1;
          for (int64_t pos = 0; pos <= r.n_drafts; ++pos) {
            const PosStats& st = stats_at(pos);
            if (!st.finite()) return;  // the row emits nothing
            const int64_t d = pos < r.n_drafts ? dr[b * K + pos] : -1;
            if (pos == r.n_drafts || !(d >= 0 && d < Vd && d == st.argmax)) {
              s = pos;
              break;
            }
          }
          for (int64_t i = 0; i < s; ++i) out[b * K1 + i] = dr[b * K + i];
          out[b * K1 + s] = stats[b * K1 + s].argmax;
          na[b] = int32_t(s);
          return;
        }

        // 1. forward: statistics and weights up to the last position any test can reach
        w[0] = 1.0;
        int64_t last = 0;
        for (int64_t pos = 0;; ++pos) {
          const PosStats& st = stats_at(pos);
          last = pos;
          if (pos == r.g) break;
          const int64_t d = dr[b * K + pos];
          double p = 0.0;
          if (st.finite()) {
            const float xd = clean1(row_at(b, pos)[d]);
            if (xd > kNegInf && xd >= st.thr) p = std::exp((double(xd) - double(st.max)) * r.inv_t) / st.z;
          }
          const double qd = draft_q1(static_cast<float>(Qp[(b * K + pos) * Vd + d]));
          double wn = 0.0;
          if (p > 0.0 && w[pos] > 0.0) wn = qd > 0.0 ? std::min(1.0, w[pos] * p / qd) : 1.0;
          w[pos + 1] = wn;
          if (wn == 0.0) break;  // no later test can hold
        }

        // the residual max(0, w_i p_i - q_i)'s race-block sums at position i < g (0 if no finite logit)
        auto residual_sums = [&](int64_t i) -> double {
          const PosStats& st = stats[b * K1 + i];
          if (!st.finite() || w[i] <= 0.0) {
            std::fill(sums, sums + nblock, 0.0);
            return 0.0;
          }
          PosStats scaled = st;
          scaled.z = st.z / w[i];  // Weights.p is then w_i p_i
          const Weights wt(scaled, r.inv_t_f);
          const Logits<T> x = row_at(b, i);
          const Q* q = Qp + (b * K + i) * Vd;
          exec(nchunk, [&](int64_t c) {
            const int64_t j0 = c * kChunk, j1 = std::min(Vt, j0 + kChunk);
            race_block_sums<Q>(x, j0, j1, wt, true, q, Vd, -1, nullptr, sums);
          });
          double mass = 0.0;
          for (int64_t k = 0; k < nblock; ++k) mass += sums[k];
          return mass;
        };

        // 2. backward scan: the largest i whose test holds
        int64_t s = 0;
        double mass = -1.0;  // the residual mass at s when the scan computed it
        for (int64_t i = std::min(last, r.g); i >= 1; --i) {
          const double u = uniform_open_closed(PhiloxKey(rp.seed[b], at(b, i - 1), kStreamAcceptPrefix, 0).bits(i - 1));
          bool stop;
          double R = 0.0;
          if (i == r.g) {
            stop = u <= w[i];
          } else {
            R = residual_sums(i);
            stop = u * (R + 1.0 - w[i]) <= R;
          }
          if (stop) {
            s = i;
            mass = R;
            break;
          }
        }

        // 3. the emitted token at s
        const PosStats& st = stats[b * K1 + s];
        if (!st.finite()) return;  // the row emits nothing
        for (int64_t i = 0; i < s; ++i) out[b * K1 + i] = dr[b * K + i];
        na[b] = int32_t(s);
        const Logits<T> x = row_at(b, s);
        int64_t tok;
        if (s == r.g) {  // every draft kept: the bonus, the target's own sample (bmax / bsum are s's)
          tok = race_p(x, Vt, st, r.inv_t, r.inv_t_f, r.filtered, &bmax[b * nblock], &bsum[b * nblock], sums, exec,
                       PhiloxKey(rp.seed[b], at(b, s), kStreamSampleBlock, 0),
                       PhiloxKey(rp.seed[b], at(b, s), kStreamSample, 0));
        } else {
          if (mass < 0.0) mass = residual_sums(s);  // s = 0: not computed by the scan
          const bool use_r = mass > 0.0;
          PosStats scaled = st;
          if (use_r) scaled.z = st.z / w[s];
          const Weights wt(scaled, r.inv_t_f);
          const Q* q = Qp + (b * K + s) * Vd;
          if (!use_r) {  // residual mass 0: a race over p (resample streams), as verify does
            exec(nchunk, [&](int64_t c) {
              const int64_t j0 = c * kChunk, j1 = std::min(Vt, j0 + kChunk);
              race_block_sums<Q>(x, j0, j1, wt, false, q, Vd, -1, nullptr, sums);
            });
          }
          const int64_t k = race_blocks(sums, nblock, PhiloxKey(rp.seed[b], at(b, s), kStreamResampleBlock, 0));
          tok = k < 0 ? -1 : race_in_block<Q>(x, Vt, k, wt, use_r, q, Vd, -1,
                                                 PhiloxKey(rp.seed[b], at(b, s), kStreamResample, 0));
        }
        out[b * K1 + s] = tok >= 0 ? tok : st.argmax;  // tok < 0 only if rounding zeroed every weight
      };
      for_rows(B, Vt, grain_chunks, run_row);
    });
  });
  return {out_ids, num_acc};
}

std::tuple<at::Tensor, at::Tensor> verify_block_meta(const at::Tensor& target_logits, const at::Tensor&,
                                                     const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                     const c10::optional<at::Tensor>&) {
  const auto B = target_logits.sym_size(0), K1 = target_logits.sym_size(1);
  return {at::empty_symint({B, K1}, target_logits.options().dtype(at::kLong)),
          at::empty_symint({B}, target_logits.options().dtype(at::kInt))};
}

}  // namespace
}  // namespace specdec

TORCH_LIBRARY_FRAGMENT(specdec_cpp, m) {
  m.def("verify_block(Tensor target_logits, Tensor draft_token_ids, Tensor draft_probs, Tensor temperature, "
        "Tensor top_k, Tensor top_p, Tensor seed, Tensor offset, Tensor? token_bitmask=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(specdec_cpp, CPU, m) { m.impl("verify_block", &specdec::verify_block_cpu); }
TORCH_LIBRARY_IMPL(specdec_cpp, Meta, m) { m.impl("verify_block", &specdec::verify_block_meta); }
