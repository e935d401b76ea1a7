// specdec_cpp::sample on CPU: fused temperature / top-k / top-p sampling that also returns the
// distribution it sampled from (reference.sample is the specification). Two passes per row:
//  1. max / argmax / softmax denominator (plus the top-k/top-p threshold when the row asks);
//  2. write probs and run the exponential race in the same sweep.
// Both passes are split into vocabulary chunks for at::parallel_for, so B = 1 uses every core.
#include <torch/library.h>

#include "sampling_common.h"

namespace specdec {
namespace {

std::tuple<at::Tensor, at::Tensor> sample_cpu(const at::Tensor& logits_in, const at::Tensor& temperature,
                                              const at::Tensor& top_k, const at::Tensor& top_p,
                                              const at::Tensor& seed, const at::Tensor& offset) {
  TORCH_CHECK(logits_in.dim() == 2, "sample: logits must be [B, V]");
  const at::Tensor logits = logits_in.contiguous();
  const int64_t B = logits.size(0), V = logits.size(1);
  const at::Tensor temp = temperature.to(at::kFloat).contiguous();
  const at::Tensor tk = top_k.to(at::kLong).contiguous();
  const at::Tensor tp = top_p.to(at::kFloat).contiguous();
  const at::Tensor sd = seed.to(at::kLong).contiguous();
  const at::Tensor of = offset.to(at::kLong).contiguous();
  for (const auto* t : {&temp, &tk, &tp, &sd, &of})
    TORCH_CHECK(t->numel() == B, "sample: temperature/top_k/top_p/seed/offset must have B entries");

  auto tokens = at::full({B}, -1, logits.options().dtype(at::kLong));
  auto probs = at::empty({B, V}, logits.options().dtype(at::kFloat));
  if (B == 0 || V == 0) {
    probs.zero_();
    return {tokens, probs};
  }
  const float* tmp = temp.data_ptr<float>();
  const int64_t* tkp = tk.data_ptr<int64_t>();
  const float* tpp = tp.data_ptr<float>();
  const int64_t* sdp = sd.data_ptr<int64_t>();
  const int64_t* ofp = of.data_ptr<int64_t>();

  std::vector<char> greedy(B), filtered(B);
  std::vector<double> inv_t(B);
  std::vector<float> inv_t_f(B);
  for (int64_t b = 0; b < B; ++b) {
    greedy[b] = !(double(tmp[b]) > 0.0);
    inv_t[b] = greedy[b] ? 1.0 : 1.0 / double(tmp[b]);
    inv_t_f[b] = float(std::min(inv_t[b], double(FLT_MAX)));
    filtered[b] = !greedy[b] && ((tkp[b] > 0 && tkp[b] < V) || double(tpp[b]) < 1.0);
  }
  const int64_t nchunk = (V + kChunk - 1) / kChunk;
  const int64_t grain_chunks = std::max<int64_t>(1, 32768 / std::min(V, kChunk));
  std::vector<ChunkStats> parts(B * nchunk);
  std::vector<PosStats> stats(B);
  std::vector<RaceOut> races(B * nchunk);
  float* P = probs.data_ptr<float>();

  dispatch_float(logits.scalar_type(), "sample: logits", [&](auto tag) {
    using T = decltype(tag);
    const T* L = logits.data_ptr<T>();
    at::parallel_for(0, B * nchunk, grain_chunks, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / nchunk, j0 = (t % nchunk) * kChunk;
        parts[t] = chunk_stats(L + b * V + j0, std::min(kChunk, V - j0), j0, inv_t_f[b],
                               !greedy[b] && !filtered[b]);
      }
    });
    std::vector<int64_t> filt;
    for (int64_t b = 0; b < B; ++b) {
      stats[b] = merge_chunks(&parts[b * nchunk], nchunk, inv_t[b]);
      if (filtered[b]) filt.push_back(b);
    }
    if (!filt.empty()) {
      at::parallel_for(0, int64_t(filt.size()), 1, [&](int64_t begin, int64_t end) {
        std::vector<float> buf;
        for (int64_t i = begin; i < end; ++i) {
          const int64_t b = filt[i];
          filter_stats(L + b * V, V, inv_t[b], tkp[b], double(tpp[b]), stats[b], buf);
        }
      });
    }
    at::parallel_for(0, B * nchunk, grain_chunks, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / nchunk, c = t % nchunk;
        const int64_t j0 = c * kChunk, j1 = std::min(V, j0 + kChunk);
        const PosStats& s = stats[b];
        if (!s.finite() || greedy[b]) {
          // no finite logit: zero probs; greedy: one-hot at the argmax (the distribution sampled)
          std::fill(P + b * V + j0, P + b * V + j1, 0.0f);
          if (s.finite() && s.argmax >= j0 && s.argmax < j1) P[b * V + s.argmax] = 1.0f;
          continue;
        }
        RaceOut ro;
        race_chunk<T, float>(L + b * V, j0, j1, s, inv_t_f[b], PhiloxKey(sdp[b], ofp[b], kStreamSample, 0),
                             false, nullptr, 0, -1, P + b * V, ro);
        races[t] = ro;
      }
    });
  });

  int64_t* tok = tokens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const PosStats& s = stats[b];
    if (!s.finite()) continue;  // token -1
    if (greedy[b]) {
      tok[b] = s.argmax;
      continue;
    }
    RaceBest best;
    for (int64_t c = 0; c < nchunk; ++c) best.merge(races[b * nchunk + c].p);
    tok[b] = best.idx >= 0 ? best.idx : s.argmax;
  }
  return {tokens, probs};
}

std::tuple<at::Tensor, at::Tensor> sample_meta(const at::Tensor& logits, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  const auto B = logits.sym_size(0), V = logits.sym_size(1);
  return {at::empty_symint({B}, logits.options().dtype(at::kLong)),
          at::empty_symint({B, V}, logits.options().dtype(at::kFloat))};
}

}  // namespace
}  // namespace specdec

TORCH_LIBRARY_FRAGMENT(specdec_cpp, m) {
  m.def("sample(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor seed, "
        "Tensor offset) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(specdec_cpp, CPU, m) { m.impl("sample", &specdec::sample_cpu); }
TORCH_LIBRARY_IMPL(specdec_cpp, Meta, m) { m.impl("sample", &specdec::sample_meta); }
