// specdec_cpp::sample on CPU: fused temperature / top-k / top-p sampling that also returns the
// distribution it sampled from (reference.sample is the specification). Two passes per row:
//  1. max / argmax / softmax denominator (plus the top-k/top-p threshold when the row asks);
//  2. write probs and sum them per race block in the same sweep; then the two-level exponential
//     race (sampling_common.h): one race over the blocks, one inside the winning block.
// Rows run in parallel when there are enough, else each row's vocabulary chunks do (for_rows).
// A token bitmask ([B, W]) is read in the loads (Logits, sampling_common.h).
#include <torch/library.h>

#include "sampling_common.h"

namespace specdec {
namespace {

// return_logprobs: also (processed, raw) logprobs [B] float32 of the tokens (the raw denominator
// summed in the statistics sweep); else [0] each.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_cpu(
    const at::Tensor& logits_in, const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
    const at::Tensor& seed, const at::Tensor& offset, bool return_logprobs,
    const c10::optional<at::Tensor>& token_bitmask_opt) {
  TORCH_CHECK(logits_in.dim() == 2, "sample: logits must be [B, V]");
  const at::Tensor logits = logits_in.contiguous();
  const int64_t B = logits.size(0), V = logits.size(1);
  const at::Tensor mask = check_bitmask(token_bitmask_opt, {B}, "sample");
  const int32_t* M = mask.defined() ? mask.data_ptr<int32_t>() : nullptr;
  const int64_t W = mask.defined() ? mask.size(1) : 0;
  const RowParams rp(temperature, top_k, top_p, seed, offset, B, "sample");

  auto tokens = at::full({B}, -1, logits.options().dtype(at::kLong));
  auto probs = at::empty({B, V}, logits.options().dtype(at::kFloat));
  auto lp_processed = at::full({return_logprobs ? B : 0}, kNegInf, logits.options().dtype(at::kFloat));
  auto lp_raw = at::full({return_logprobs ? B : 0}, kNegInf, logits.options().dtype(at::kFloat));
  if (B == 0 || V == 0) {
    probs.zero_();
    return {tokens, probs, lp_processed, lp_raw};
  }

  std::vector<RowSampling> rows(B);
  for (int64_t b = 0; b < B; ++b) rows[b].set(rp, b, V);
  const int64_t nchunk = (V + kChunk - 1) / kChunk;
  const int64_t grain_chunks = std::max<int64_t>(1, 32768 / std::min(V, kChunk));
  std::vector<ChunkStats> parts(B * nchunk);
  std::vector<PosStats> stats(B);
  const int64_t nblock = (V + kRaceBlock - 1) / kRaceBlock;
  std::vector<double> block_sums(B * nblock);
  float* P = probs.data_ptr<float>();

  int64_t* tok = tokens.data_ptr<int64_t>();

  dispatch_float(logits.scalar_type(), "sample: logits", [&](auto tag) {
    using T = decltype(tag);
    const T* L = logits.data_ptr<T>();
    auto row_at = [&](int64_t b) { return Logits<T>{L + b * V, M ? M + b * W : nullptr, W, 0}; };
    // One row, start to finish; exec(n, f) runs f over the vocabulary chunks (see for_rows).
    auto run_row = [&](int64_t b, auto&& exec) {
      const Logits<T> x = row_at(b);
      const RowSampling& r = rows[b];
      float* pr = P + b * V;
      // sampled rows: the softmax denominator (filtered rows: from filter_stats); masked greedy
      // rows with logprobs: the masked denominator at T = 1 (token_logprobs)
      const bool want_sum = (!r.greedy && !r.filtered) || (r.greedy && M && return_logprobs);
      PosStats& s = stats[b];
      s = position_stats(x, V, r, rp.top_k[b], double(rp.top_p[b]), want_sum, return_logprobs, nullptr, nullptr,
                         &parts[b * nchunk], exec);
      if (!s.finite() || r.greedy) {
        // no finite logit: token -1, zero probs; greedy: the argmax, probs one-hot there (the
        // distribution it was drawn from)
        std::fill(pr, pr + V, 0.0f);
        if (s.finite()) pr[s.argmax] = 1.0f, tok[b] = s.argmax;
        return;
      }
      // probs and the race's block sums in one sweep, then the two-level race
      const Weights w(s, r.inv_t_f);
      double* p_sum = &block_sums[b * nblock];
      exec(nchunk, [&](int64_t c) {
        const int64_t j0 = c * kChunk, j1 = std::min(V, j0 + kChunk);
        race_block_sums<float>(x, j0, j1, w, false, nullptr, 0, -1, pr, p_sum);
      });
      const int64_t k = race_blocks(p_sum, nblock, PhiloxKey(rp.seed[b], rp.offset[b], kStreamSampleBlock, 0));
      const int64_t t = k < 0 ? -1 : race_in_block<float>(x, V, k, w, false, nullptr, 0, -1,
                                                             PhiloxKey(rp.seed[b], rp.offset[b], kStreamSample, 0));
      tok[b] = t >= 0 ? t : s.argmax;
    };
    for_rows(B, V, grain_chunks, run_row);
    if (return_logprobs) {  // from each row's statistics: one logit read per row
      float* lpp = lp_processed.data_ptr<float>();
      float* lpr = lp_raw.data_ptr<float>();
      for (int64_t b = 0; b < B; ++b)
        if (tok[b] >= 0) token_logprobs(row_at(b), tok[b], stats[b], rows[b].inv_t, rows[b].greedy, &lpp[b], &lpr[b]);
    }
  });
  return {tokens, probs, lp_processed, lp_raw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_meta(
    const at::Tensor& logits, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, bool return_logprobs, const c10::optional<at::Tensor>&) {
  const auto B = logits.sym_size(0), V = logits.sym_size(1);
  const c10::SymInt W = return_logprobs ? B : c10::SymInt(0);
  return {at::empty_symint({B}, logits.options().dtype(at::kLong)),
          at::empty_symint({B, V}, logits.options().dtype(at::kFloat)),
          at::empty_symint({W}, logits.options().dtype(at::kFloat)),
          at::empty_symint({W}, logits.options().dtype(at::kFloat))};
}

}  // namespace
}  // namespace specdec

TORCH_LIBRARY_FRAGMENT(specdec_cpp, m) {
  m.def("sample(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor seed, "
        "Tensor offset, bool return_logprobs=False, Tensor? token_bitmask=None) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(specdec_cpp, CPU, m) { m.impl("sample", &specdec::sample_cpu); }
TORCH_LIBRARY_IMPL(specdec_cpp, Meta, m) { m.impl("sample", &specdec::sample_meta); }
