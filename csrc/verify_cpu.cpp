// specdec_cpp::verify on CPU: fused chain verification (reference.verify is the specification).
//
// Per row the work is a chain: position i only matters if drafts 0..i-1 were accepted. So the
// kernel walks the positions in order, and at each one, for the rows still running:
//  1. statistics of (row, pos): max / argmax / softmax denominator in one streaming pass, split
//     into vocabulary chunks for at::parallel_for (rows with top-k/top-p also get their kept
//     threshold from a scratch copy of the row);
//  2. the acceptance test: a few scalars (the draft's logit, its draft probability, one Philox
//     uniform). A rejection or the bonus position stops the row: later positions are not read.
// Then 3. per sampling row, one pass over the vocabulary at the stop position: the exponential
// race for the residual (after a rejection) and for p (bonus token / zero residual) at once.
// Nothing of size [B, K+1, V] is allocated; logits are read as they are (fp32/fp16/bf16).
#include <torch/library.h>

#include "sampling_common.h"

namespace specdec {
namespace {

struct RowInfo {
  int64_t n_drafts;  // drafts before the first -1
  bool greedy;
  bool filtered;     // top-k or top-p active (sampled rows only: greedy rows need just the argmax)
  double inv_t;      // 1 / temperature (1 for greedy rows, as in the reference)
  float inv_t_f;     // the same in float, clamped so that 0 * inv_t stays 0
};

std::tuple<at::Tensor, at::Tensor> verify_cpu(const at::Tensor& target_logits_in,
                                              const at::Tensor& draft_token_ids,
                                              const c10::optional<at::Tensor>& draft_probs_opt,
                                              const at::Tensor& temperature, const at::Tensor& top_k,
                                              const at::Tensor& top_p, const at::Tensor& seed,
                                              const at::Tensor& offset) {
  TORCH_CHECK(target_logits_in.dim() == 3, "verify: target_logits must be [B, K+1, V]");
  const at::Tensor logits = target_logits_in.contiguous();  // no copy when already contiguous
  const int64_t B = logits.size(0), K1 = logits.size(1), Vt = logits.size(2), K = K1 - 1;
  TORCH_CHECK(K1 >= 1 && Vt >= 1, "verify: target_logits needs K+1 >= 1 positions and V >= 1");
  TORCH_CHECK(draft_token_ids.dim() == 2 && draft_token_ids.size(0) == B && draft_token_ids.size(1) == K,
              "verify: draft_token_ids must be [B, K]");
  // Per-row parameters are tiny; normalising them costs nothing.
  const at::Tensor drafts = draft_token_ids.to(at::kLong).contiguous();
  const at::Tensor temp = temperature.to(at::kFloat).contiguous();
  const at::Tensor tk = top_k.to(at::kLong).contiguous();
  const at::Tensor tp = top_p.to(at::kFloat).contiguous();
  const at::Tensor sd = seed.to(at::kLong).contiguous();
  const at::Tensor of = offset.to(at::kLong).contiguous();
  for (const auto* t : {&temp, &tk, &tp, &sd, &of})
    TORCH_CHECK(t->numel() == B, "verify: temperature/top_k/top_p/seed/offset must have B entries");
  at::Tensor q_all;
  int64_t Vd = Vt;
  if (draft_probs_opt.has_value() && draft_probs_opt->defined()) {
    q_all = draft_probs_opt->contiguous();
    TORCH_CHECK(q_all.dim() == 3 && q_all.size(0) == B && q_all.size(1) == K && q_all.size(2) <= Vt,
                "verify: draft_probs must be [B, K, Vd] with Vd <= V");
    Vd = q_all.size(2);
  }
  const bool has_q = q_all.defined();

  auto out_ids = at::full({B, K1}, -1, logits.options().dtype(at::kLong));
  auto num_acc = at::zeros({B}, logits.options().dtype(at::kInt));
  if (B == 0) return {out_ids, num_acc};

  const int64_t* dr = drafts.data_ptr<int64_t>();
  const float* tmp = temp.data_ptr<float>();
  const int64_t* tkp = tk.data_ptr<int64_t>();
  const float* tpp = tp.data_ptr<float>();
  const int64_t* sdp = sd.data_ptr<int64_t>();
  const int64_t* ofp = of.data_ptr<int64_t>();

  std::vector<RowInfo> rows(B);
  for (int64_t b = 0; b < B; ++b) {
    RowInfo& r = rows[b];
    r.n_drafts = K;
    for (int64_t i = 0; i < K; ++i)
      if (dr[b * K + i] == -1) { r.n_drafts = i; break; }
    const double t = tmp[b];
    r.greedy = !(t > 0.0);  // temperature <= 0 (NaN would also be greedy; the dispatcher rejects it)
    r.inv_t = r.greedy ? 1.0 : 1.0 / t;
    r.inv_t_f = float(std::min(r.inv_t, double(FLT_MAX)));
    r.filtered = !r.greedy && ((tkp[b] > 0 && tkp[b] < Vt) || double(tpp[b]) < 1.0);
  }

  const int64_t nchunk = (Vt + kChunk - 1) / kChunk;
  std::vector<PosStats> stats(B * K1);
  std::vector<ChunkStats> parts(B * nchunk);
  std::vector<RaceOut> races(B * nchunk);
  const int64_t grain_chunks = std::max<int64_t>(1, 32768 / std::min(Vt, kChunk));  // tiny inputs: one thread

  dispatch_float(logits.scalar_type(), "verify: target_logits", [&](auto tag) {
    using T = decltype(tag);
    const T* L = logits.data_ptr<T>();
    int64_t* out = out_ids.data_ptr<int64_t>();
    int32_t* na = num_acc.data_ptr<int32_t>();

    // ---- phases 1 + 2, position by position: statistics of (row, pos) for the rows still
    // running, then one acceptance step for each. A row stops at its first rejection or at its
    // bonus position, so positions after the stop are never read (beyond the finiteness check).
    std::vector<int64_t> stop(B, -1);
    std::vector<char> row_ok(B, 1), resid_row(B, 0);
    std::vector<int64_t> active(B);
    for (int64_t b = 0; b < B; ++b) active[b] = b;
    for (int64_t pos = 0; pos <= K && !active.empty(); ++pos) {
      const int64_t na_rows = int64_t(active.size());
      at::parallel_for(0, na_rows * nchunk, grain_chunks, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t b = active[t / nchunk], c = t % nchunk;
          const int64_t j0 = c * kChunk, n = std::min(kChunk, Vt - j0);
          const RowInfo& r = rows[b];
          // the softmax denominator is needed to test a draft; at the bonus position the race
          // alone is scale-free and needs none
          const bool want_sum = !r.greedy && !r.filtered && pos < r.n_drafts;
          parts[b * nchunk + c] = chunk_stats(L + (b * K1 + pos) * Vt + j0, n, j0, r.inv_t_f, want_sum);
        }
      });
      std::vector<int64_t> filt;  // rows with top-k/top-p: threshold from a scratch copy of the row
      for (int64_t b : active) {
        stats[b * K1 + pos] = merge_chunks(&parts[b * nchunk], nchunk, rows[b].inv_t);
        if (rows[b].filtered && stats[b * K1 + pos].finite()) filt.push_back(b);
      }
      if (!filt.empty()) {
        at::parallel_for(0, int64_t(filt.size()), 1, [&](int64_t begin, int64_t end) {
          std::vector<float> buf;
          for (int64_t i = begin; i < end; ++i) {
            const int64_t b = filt[i];
            filter_stats(L + (b * K1 + pos) * Vt, Vt, rows[b].inv_t, tkp[b], double(tpp[b]),
                         stats[b * K1 + pos], buf);
          }
        });
      }
      std::vector<int64_t> still;
      for (int64_t b : active) {
        const RowInfo& r = rows[b];
        const PosStats& st = stats[b * K1 + pos];
        if (!st.finite()) {  // a live position without a finite logit: the row emits nothing
          row_ok[b] = 0;
          continue;
        }
        if (pos == r.n_drafts) {  // every draft accepted: bonus token here
          stop[b] = pos;
          continue;
        }
        const int64_t d = dr[b * K + pos];
        bool accept = false;  // out-of-range ids are rejected without being read
        if (d >= 0 && d < Vd) {
          if (r.greedy) {
            accept = d == st.argmax;
          } else {
            // p(d) in double from the draft's own logit (reference: softmax in float64)
            const float x = clean1(static_cast<float>(L[(b * K1 + pos) * Vt + d]));
            double p = 0.0;
            if (x > kNegInf && x >= st.thr) p = std::exp((double(x) - double(st.max)) * r.inv_t) / st.z;
            double qd = 1.0;  // deterministic drafter: q is one-hot at the draft
            if (has_q) {
              dispatch_float(q_all.scalar_type(), "verify: draft_probs", [&](auto qtag) {
                using Q = decltype(qtag);
                qd = double(static_cast<float>(q_all.data_ptr<Q>()[(b * K + pos) * Vd + d]));
              });
            }
            const double u = uniform_open_closed(PhiloxKey(sdp[b], ofp[b], kStreamAccept, pos).bits(0));
            accept = p > 0.0 && u * qd <= p;  // q(d) = 0 < p(d): accepted; p(d) = 0: rejected
          }
        }
        if (accept) {
          still.push_back(b);
        } else {
          stop[b] = pos;
          resid_row[b] = d >= 0 && d < Vd;  // residual after rejecting an in-range draft, else p
        }
      }
      active.swap(still);
    }

    // The reference also voids a row when a live position after its stop has no finite logit;
    // checking needs only the first finite value of each such position (usually the first entry).
    for (int64_t b = 0; b < B; ++b) {
      if (!row_ok[b]) continue;
      for (int64_t pos = stop[b] + 1; pos <= rows[b].n_drafts && row_ok[b]; ++pos)
        row_ok[b] = has_finite(L + (b * K1 + pos) * Vt, Vt);
    }
    std::vector<int64_t> rr;  // rows that race
    for (int64_t b = 0; b < B; ++b) {
      if (!row_ok[b]) continue;
      const int64_t s = stop[b];
      for (int64_t i = 0; i < s; ++i) out[b * K1 + i] = dr[b * K + i];
      na[b] = int32_t(s);
      if (rows[b].greedy) {
        out[b * K1 + s] = stats[b * K1 + s].argmax;
      } else {
        rr.push_back(b);
      }
    }

    // ---- phase 3: exponential race at the stop position of every sampling row
    if (rr.empty()) return;
    auto run = [&](auto qtag, bool with_q) {
      using Q = decltype(qtag);
      const Q* qbase = with_q ? q_all.data_ptr<Q>() : nullptr;
      at::parallel_for(0, int64_t(rr.size()) * nchunk, grain_chunks, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t b = rr[t / nchunk], c = t % nchunk, s = stop[b];
          const int64_t j0 = c * kChunk, j1 = std::min(Vt, j0 + kChunk);
          const bool resid = resid_row[b];
          const Q* q = (resid && qbase) ? qbase + (b * K + s) * Vd : nullptr;
          const int64_t d = resid ? dr[b * K + s] : -1;
          RaceOut ro;
          race_chunk<T, Q>(L + (b * K1 + s) * Vt, j0, j1, stats[b * K1 + s], rows[b].inv_t_f,
                           PhiloxKey(sdp[b], ofp[b], kStreamResample, s), resid, q, Vd, d, nullptr, ro);
          races[b * nchunk + c] = ro;
        }
      });
    };
    if (has_q) {
      dispatch_float(q_all.scalar_type(), "verify: draft_probs", [&](auto qtag) { run(qtag, true); });
    } else {
      run(float{}, false);
    }
    for (int64_t b : rr) {
      RaceOut tot;
      for (int64_t c = 0; c < nchunk; ++c) {
        const RaceOut& ro = races[b * nchunk + c];
        tot.p.merge(ro.p);
        tot.r.merge(ro.r);
        tot.r_any = tot.r_any || ro.r_any;
      }
      // residual mass 0 (p == q up to rounding): sample from p, as the reference does
      const RaceBest& win = (resid_row[b] && tot.r_any) ? tot.r : tot.p;
      out[b * K1 + stop[b]] = win.idx >= 0 ? win.idx : 0;
    }
  });
  return {out_ids, num_acc};
}

std::tuple<at::Tensor, at::Tensor> verify_meta(const at::Tensor& target_logits, const at::Tensor&,
                                               const c10::optional<at::Tensor>&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&) {
  const auto B = target_logits.sym_size(0), K1 = target_logits.sym_size(1);
  return {at::empty_symint({B, K1}, target_logits.options().dtype(at::kLong)),
          at::empty_symint({B}, target_logits.options().dtype(at::kInt))};
}

// Test hook: Philox words for explicit counters/keys (known-answer vectors). counter [N, 4] and
// key [N, 2] int64 holding uint32 values. vectorized=False: the four output words [N, 4];
// True: the AVX2 path's first word for counter indices c0 .. c0+7, [N, 8].
at::Tensor philox_test(const at::Tensor& counter_in, const at::Tensor& key_in, bool vectorized) {
  const at::Tensor counter = counter_in.to(at::kLong).contiguous(), key = key_in.to(at::kLong).contiguous();
  TORCH_CHECK(counter.dim() == 2 && counter.size(1) == 4 && key.dim() == 2 && key.size(1) == 2 &&
                  key.size(0) == counter.size(0), "_philox: counter [N, 4], key [N, 2]");
  const int64_t N = counter.size(0);
  auto out = at::empty({N, vectorized ? 8 : 4}, counter.options());
  const int64_t *c = counter.data_ptr<int64_t>(), *k = key.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) {
    const uint32_t c0 = uint32_t(c[4 * i]), c1 = uint32_t(c[4 * i + 1]), c2 = uint32_t(c[4 * i + 2]),
                   c3 = uint32_t(c[4 * i + 3]), k0 = uint32_t(k[2 * i]), k1 = uint32_t(k[2 * i + 1]);
    if (!vectorized) {
      const PhiloxOut w = philox4x32_10(c0, c1, c2, c3, k0, k1);
      for (int j = 0; j < 4; ++j) o[4 * i + j] = w.w[j];
    } else {
      PhiloxKey pk(0, 0, 0, 0);
      pk.k0 = k0, pk.k1 = k1, pk.c1 = c1, pk.c2 = c2, pk.c3 = c3;
      alignas(32) uint32_t lanes[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), philox8_first_word(pk, c0));
      for (int j = 0; j < 8; ++j) o[8 * i + j] = lanes[j];
    }
  }
  return out;
}

}  // namespace
}  // namespace specdec

TORCH_LIBRARY_FRAGMENT(specdec_cpp, m) {
  m.def("verify(Tensor target_logits, Tensor draft_token_ids, Tensor? draft_probs, Tensor temperature, "
        "Tensor top_k, Tensor top_p, Tensor seed, Tensor offset) -> (Tensor, Tensor)");
  m.def("_philox(Tensor counter, Tensor key, bool vectorized) -> Tensor", &specdec::philox_test);
}

TORCH_LIBRARY_IMPL(specdec_cpp, CPU, m) { m.impl("verify", &specdec::verify_cpu); }
TORCH_LIBRARY_IMPL(specdec_cpp, Meta, m) { m.impl("verify", &specdec::verify_meta); }
