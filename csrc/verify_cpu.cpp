// specdec_cpp::verify on CPU: fused chain verification (reference.verify is the specification).
//
// Per row the work is a chain: position i only matters if drafts 0..i-1 were accepted. So each
// row walks its positions in order:
//  1. statistics of (row, pos): max / argmax / softmax denominator in one streaming pass over
//     vocabulary chunks, kept per 256-id block too (rows with top-k/top-p also get their kept
//     threshold from a scratch copy);
//  2. the acceptance test: a few scalars (the draft's logit, its draft probability, one Philox
//     uniform). A rejection or the bonus position stops the row: later positions are not read;
//  3. at the stop position, the two-level exponential race (sampling_common.h) for the residual
//     (after a rejection) or for p (bonus token; also the rare residual without mass): its block
//     sums come from step 1's per-block statistics, except after rejecting a draft that has
//     draft_probs (residual max(0, p - q): one more pass, reading q) and for top-k/top-p rows;
//     then the race over blocks and the race inside the winning block.
// Without draft_probs a sampled row is "sample and compare" (reference.verify): at each position
// the race over p (the sample op's streams) is the target's own token, the draft is accepted iff
// it equals it, and the first mismatch (or the bonus position) emits it. With draft_probs the
// bonus token is that own sample too; a rejection's token comes from the resample streams.
// Random numbers of position j use the counter offset offset + j (Philox position word 0).
// Rows are the parallel unit when there are enough of them (one parallel region per call, rows
// handed out dynamically since their chains differ in length); otherwise vocabulary chunks are.
// Nothing of size [B, K+1, V] is allocated; logits are read as they are (fp32/fp16/bf16), through
// the position's token bitmask when one is given (Logits in sampling_common.h: banned ids read as
// -inf in the loads themselves, so every step below sees the target restricted to the allowed ids).
#include <torch/library.h>

#include "sampling_common.h"

namespace specdec {
namespace {

struct RowInfo : RowSampling {
  int64_t n_drafts;  // drafts before the first -1
};

// return_logprobs: also (processed, raw) logprobs [B, K+1] float32 of the emitted tokens, from the
// statistics of the positions walked (the raw denominator summed in the same sweep); else [B, 0].
// token_bitmask: [B, K+1, W] int32 or undefined (check_bitmask).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> verify_cpu(
    const at::Tensor& target_logits_in, const at::Tensor& draft_token_ids,
    const c10::optional<at::Tensor>& draft_probs_opt, const at::Tensor& temperature, const at::Tensor& top_k,
    const at::Tensor& top_p, const at::Tensor& seed, const at::Tensor& offset, bool return_logprobs,
    const c10::optional<at::Tensor>& token_bitmask_opt) {
  TORCH_CHECK(target_logits_in.dim() == 3, "verify: target_logits must be [B, K+1, V]");
  const at::Tensor logits = target_logits_in.contiguous();  // no copy when already contiguous
  const int64_t B = logits.size(0), K1 = logits.size(1), Vt = logits.size(2), K = K1 - 1;
  TORCH_CHECK(K1 >= 1 && Vt >= 1, "verify: target_logits needs K+1 >= 1 positions and V >= 1");
  TORCH_CHECK(draft_token_ids.dim() == 2 && draft_token_ids.size(0) == B && draft_token_ids.size(1) == K,
              "verify: draft_token_ids must be [B, K]");
  // Per-row parameters are tiny; normalising them costs nothing.
  const at::Tensor drafts = draft_token_ids.to(at::kLong).contiguous();
  const RowParams rp(temperature, top_k, top_p, seed, offset, B, "verify");
  at::Tensor q_all;
  int64_t Vd = Vt;
  if (draft_probs_opt.has_value() && draft_probs_opt->defined()) {
    q_all = draft_probs_opt->contiguous();
    TORCH_CHECK(q_all.dim() == 3 && q_all.size(0) == B && q_all.size(1) == K && q_all.size(2) <= Vt,
                "verify: draft_probs must be [B, K, Vd] with Vd <= V");
    Vd = q_all.size(2);
  }
  const bool has_q = q_all.defined();
  const at::Tensor mask = check_bitmask(token_bitmask_opt, {B, K1}, "verify");
  const int32_t* M = mask.defined() ? mask.data_ptr<int32_t>() : nullptr;
  const int64_t W = mask.defined() ? mask.size(2) : 0;

  auto out_ids = at::full({B, K1}, -1, logits.options().dtype(at::kLong));
  auto num_acc = at::zeros({B}, logits.options().dtype(at::kInt));
  auto lp_processed = at::full({B, return_logprobs ? K1 : 0}, kNegInf, logits.options().dtype(at::kFloat));
  auto lp_raw = at::full({B, return_logprobs ? K1 : 0}, kNegInf, logits.options().dtype(at::kFloat));
  if (B == 0) return {out_ids, num_acc, lp_processed, lp_raw};

  const int64_t* dr = drafts.data_ptr<int64_t>();

  std::vector<RowInfo> rows(B);
  for (int64_t b = 0; b < B; ++b) {
    RowInfo& r = rows[b];
    r.n_drafts = K;
    for (int64_t i = 0; i < K; ++i)
      if (dr[b * K + i] == -1) { r.n_drafts = i; break; }
    r.set(rp, b, Vt);
  }

  const int64_t nchunk = (Vt + kChunk - 1) / kChunk;
  std::vector<PosStats> stats(B * K1);
  std::vector<ChunkStats> parts(B * nchunk);
  const int64_t nblock = (Vt + kRaceBlock - 1) / kRaceBlock;
  std::vector<double> block_sums(B * nblock);  // per row: the race's block sums (residual's or p's)
  std::vector<float> bmax(B * nblock);          // per row, latest position: each block's max logit
  std::vector<double> bsum(B * nblock);         // ... and its sum of exp((x - block max) / t)
  const int64_t grain_chunks = std::max<int64_t>(1, 32768 / std::min(Vt, kChunk));  // tiny inputs: one thread
  int64_t* out = out_ids.data_ptr<int64_t>();
  int32_t* na = num_acc.data_ptr<int32_t>();

  // q's dtype only matters to the race; T and Q are both compile-time in the row loop below.
  dispatch_float(logits.scalar_type(), "verify: target_logits", [&](auto tag) {
    dispatch_float(has_q ? q_all.scalar_type() : at::kFloat, "verify: draft_probs", [&](auto qtag) {
      using T = decltype(tag);
      using Q = decltype(qtag);
      const T* L = logits.data_ptr<T>();
      const Q* Qp = has_q ? q_all.data_ptr<Q>() : nullptr;
      // position (b, pos)'s logits through its mask
      auto row_at = [&](int64_t b, int64_t pos) {
        const int64_t i = b * K1 + pos;
        return Logits<T>{L + i * Vt, M ? M + i * W : nullptr, W, 0};
      };

      // the counter offset of row b's position j: offset + j, wrapping like int64 in the reference
      auto at = [&](int64_t b, int64_t j) { return int64_t(uint64_t(rp.offset[b]) + uint64_t(j)); };

      // The sample op's draw from p at (b, pos), whose statistics `st` are the latest computed for
      // the row (bmax / bsum hold that position's blocks): sample and compare's own token.
      auto own_sample = [&](int64_t b, int64_t pos, const PosStats& st, auto&& exec) -> int64_t {
        const RowInfo& r = rows[b];
        return race_p(row_at(b, pos), Vt, st, r.inv_t, r.inv_t_f, r.filtered, &bmax[b * nblock],
                      &bsum[b * nblock], &block_sums[b * nblock], exec,
                      PhiloxKey(rp.seed[b], at(b, pos), kStreamSampleBlock, 0),
                      PhiloxKey(rp.seed[b], at(b, pos), kStreamSample, 0));
      };

      // One row, start to finish. `exec(n, f)` runs f(0..n-1): inline when rows are the parallel
      // unit, through at::parallel_for over vocabulary chunks when there are too few rows.
      auto run_row = [&](int64_t b, auto&& exec) {
        const RowInfo& r = rows[b];
        ChunkStats* cs = &parts[b * nchunk];
        int64_t s = -1;
        bool resid = false;
        int64_t own = -1;  // sample and compare: the target's own token at the stop position
        // Walk the positions: statistics of (b, pos), then the acceptance test. The first
        // rejection, or the bonus position, stops the row; later positions are never read.
        for (int64_t pos = 0; pos <= r.n_drafts; ++pos) {
          const Logits<T> x = row_at(b, pos);
          // sampled rows: the softmax denominator (to test a draft) and the block sums that the
          // race needs if this position turns out to be the stop (filtered rows: filter_stats);
          // masked greedy rows with logprobs: the masked denominator at T = 1 (token_logprobs)
          const bool want_sum = (!r.greedy && !r.filtered) || (r.greedy && M && return_logprobs);
          PosStats& st = stats[b * K1 + pos];
          st = position_stats(x, Vt, r, rp.top_k[b], double(rp.top_p[b]), want_sum, return_logprobs,
                              &bmax[b * nblock], &bsum[b * nblock], cs, exec);
          if (!st.finite()) return;  // a live position without a finite logit: the row emits nothing
          if (!Qp && !r.greedy) {  // sample and compare
            own = own_sample(b, pos, st, exec);
            if (pos == r.n_drafts || dr[b * K + pos] != own) {
              s = pos;
              break;
            }
            continue;
          }
          if (pos == r.n_drafts) {  // every draft accepted: the bonus token comes from here
            s = pos;
            break;
          }
          const int64_t d = dr[b * K + pos];
          bool accept = false;  // out-of-range ids are rejected without being read
          if (d >= 0 && d < Vd) {
            if (r.greedy) {
              accept = d == st.argmax;
            } else {
              // p(d) in double from the draft's own logit (reference: softmax in float64)
              const float xd = clean1(static_cast<float>(x[d]));
              double p = 0.0;
              if (xd > kNegInf && xd >= st.thr) p = std::exp((double(xd) - double(st.max)) * r.inv_t) / st.z;
              // deterministic drafter: q is one-hot at the draft
              const double qd = Qp ? draft_q1(static_cast<float>(Qp[(b * K + pos) * Vd + d])) : 1.0;
              const double u = uniform_open_closed(PhiloxKey(rp.seed[b], at(b, pos), kStreamAccept, 0).bits(0));
              accept = p > 0.0 && u * qd <= p;  // q(d) = 0 < p(d): accepted; p(d) = 0: rejected
            }
          }
          if (!accept) {
            s = pos;
            resid = d >= 0 && d < Vd;  // residual after rejecting an in-range draft, else p
            break;
          }
        }
        // Positions after the stop are never looked at: one without a finite logit there (a
        // grammar mask past a rejection) does not void the row.
        for (int64_t i = 0; i < s; ++i) out[b * K1 + i] = dr[b * K + i];
        na[b] = int32_t(s);
        const PosStats& st = stats[b * K1 + s];
        if (r.greedy || !Qp) {
          out[b * K1 + s] = r.greedy ? st.argmax : own;
          return;
        }
        // The two-level race at the stop position: block sums of the residual (after a
        // rejection) or of p, then the block race and the race inside the winning block (a few
        // hundred draws, serial). Unfiltered rows have p's block sums from the statistics pass;
        // only a residual against draft_probs (or a top-k/top-p row) needs a sweep over the row.
        const Logits<T> x = row_at(b, s);
        const Q* q = (resid && Qp) ? Qp + (b * K + s) * Vd : nullptr;
        const int64_t d = resid ? dr[b * K + s] : -1;
        const Weights w(st, r.inv_t_f);
        double* sums = &block_sums[b * nblock];
        auto sweep = [&](bool of_resid) {  // block sums of the residual or of p, chunks in parallel
          exec(nchunk, [&](int64_t c) {
            const int64_t j0 = c * kChunk, j1 = std::min(Vt, j0 + kChunk);
            race_block_sums<Q>(x, j0, j1, w, of_resid, q, Vd, d, nullptr, sums);
          });
        };
        auto block_of_d = [&](bool of_resid) {  // one block: d's, as the residual or as p
          const int64_t j0 = d / kRaceBlock * kRaceBlock;
          race_block_sums<Q>(x, j0, std::min(Vt, j0 + kRaceBlock), w, of_resid, q, Vd, d, nullptr, sums);
        };
        const bool reuse = !r.filtered && q == nullptr;
        if (reuse) {
          p_block_sums(&bmax[b * nblock], &bsum[b * nblock], nblock, st, r.inv_t, sums);
          if (resid) block_of_d(true);  // one-hot q: the residual is p without d
        } else {
          sweep(resid);
        }
        // residual mass 0 (p == q up to rounding): sample from p, as the reference does (rare)
        const bool use_r = resid && std::any_of(sums, sums + nblock, [](double v) { return v > 0.0; });
        if (resid && !use_r) reuse ? block_of_d(false) : sweep(false);
        // a rejection draws from the resample streams; the bonus is the target's own sample
        const bool bonus = s == r.n_drafts;
        const int64_t k = race_blocks(sums, nblock, PhiloxKey(rp.seed[b], at(b, s),
                                                              bonus ? kStreamSampleBlock : kStreamResampleBlock, 0));
        const int64_t tok = k < 0 ? -1 : race_in_block<Q>(x, Vt, k, w, use_r, q, Vd, d,
                                                             PhiloxKey(rp.seed[b], at(b, s),
                                                                       bonus ? kStreamSample : kStreamResample, 0));
        out[b * K1 + s] = tok >= 0 ? tok : st.argmax;  // tok < 0 only if rounding zeroed every weight
      };
      for_rows(B, Vt, grain_chunks, run_row);
      // logprobs of the emitted tokens: every position 0..s was walked, its statistics are kept
      if (return_logprobs) {
        float* lpp = lp_processed.data_ptr<float>();
        float* lpr = lp_raw.data_ptr<float>();
        for (int64_t b = 0; b < B; ++b)
          for (int64_t i = 0; i <= na[b] && out[b * K1 + i] >= 0; ++i)
            token_logprobs(row_at(b, i), out[b * K1 + i], stats[b * K1 + i], rows[b].inv_t, rows[b].greedy,
                           &lpp[b * K1 + i], &lpr[b * K1 + i]);
      }
    });
  });
  return {out_ids, num_acc, lp_processed, lp_raw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> verify_meta(
    const at::Tensor& target_logits, const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool return_logprobs,
    const c10::optional<at::Tensor>&) {
  const auto B = target_logits.sym_size(0), K1 = target_logits.sym_size(1);
  const c10::SymInt W = return_logprobs ? K1 : c10::SymInt(0);
  return {at::empty_symint({B, K1}, target_logits.options().dtype(at::kLong)),
          at::empty_symint({B}, target_logits.options().dtype(at::kInt)),
          at::empty_symint({B, W}, target_logits.options().dtype(at::kFloat)),
          at::empty_symint({B, W}, target_logits.options().dtype(at::kFloat))};
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
        "Tensor top_k, Tensor top_p, Tensor seed, Tensor offset, bool return_logprobs=False, "
        "Tensor? token_bitmask=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("_philox(Tensor counter, Tensor key, bool vectorized) -> Tensor", &specdec::philox_test);
}

TORCH_LIBRARY_IMPL(specdec_cpp, CPU, m) { m.impl("verify", &specdec::verify_cpu); }
TORCH_LIBRARY_IMPL(specdec_cpp, Meta, m) { m.impl("verify", &specdec::verify_meta); }
