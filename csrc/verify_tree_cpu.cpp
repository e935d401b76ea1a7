// specdec_cpp::verify_tree on CPU: exact tree verification (reference.verify_tree is the
// specification; reference.tree_structure says which nodes take part).
//
// Per row, a walk from the root down the accepted path; only the nodes on it are read:
//  1. statistics of the current node v (max / argmax / softmax denominator, per 256-id race block
//     too; top-k/top-p rows also get their kept threshold), as verify_cpu.cpp does per position;
//  2. v's valid children, in index order:
//     - greedy rows: the first child equal to the argmax;
//     - no draft_probs, sampled rows (sample and compare): the target's own sample at v (the sample
//       op's race, counter offset + depth), then the first child equal to it;
//     - with draft_probs (recursive rejection sampling): child r is tested against the current
//       target p_cur with the Philox uniform at index r of the accept stream. The first test reads
//       p_v(x) from x's logit alone; the first rejection materialises the residual
//       max(0, p_v - q_c) in a row buffer (one pass over v's logits and q_c, chunks in parallel),
//       later ones update it from the buffer (max(0, p_cur - q_c), double-buffered so that a
//       residual without mass keeps p_cur), together with its per-race-block sums;
//  3. an accepted child becomes the current node. Otherwise the emitted token is the two-level race
//     (sampling_common.h) over p_cur (resample streams; its block sums are the residual pass's, or
//     p's from step 1) or, for a node without children, the bonus: the target's own sample.
// Nodes off the walked path are never read, nor is anything of an invalid node (bad parent, -1
// token, too deep). Rows are the parallel unit when there are enough of them; otherwise vocabulary
// chunks are. Nothing of size [B, N+1, V] is allocated. A token bitmask ([B, N+1, W]) is read in
// the loads (Logits, sampling_common.h): every node's target is restricted to its allowed ids.
#include <torch/library.h>

#include "sampling_common.h"

namespace specdec {
namespace {

// Residual pass over the race blocks of ids [j0, j1) (j0 a multiple of kRaceBlock):
// dst[j] = max(0, p_cur(j) - q(j)), where p_cur(j) = w.p(x, j) (p_v, normalised) when src is null,
// else src[j] * scale; q(j) = 0 for j >= vq. sums[k] = the sum over block k of dst, summed as
// race_block_sums does (float lanes within a block, then double), so that the first residual's
// race is verify_cpu.cpp's to the bit.
template <typename Q, typename P>
inline void residual_blocks(P x, const Weights& w, const float* src, float scale, const Q* q,
                            int64_t vq, int64_t j0, int64_t j1, float* dst, double* sums) {
  alignas(32) float lanes[8];
  const __m256 sc = _mm256_set1_ps(scale);
  for (int64_t b0 = j0; b0 < j1; b0 += kRaceBlock) {
    const int64_t b1 = std::min(j1, b0 + kRaceBlock);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = b0; j < b1; j += 8) {
      const __m256 p = src ? _mm256_mul_ps(load_any(src + j, b1 - j, 0.0f), sc) : w.p(x, j, b1 - j);
      const __m256 r = Weights::residual(p, q, vq, -1, j);
      store_row(dst, j, b1 - j, r);
      acc = _mm256_add_ps(acc, r);
    }
    _mm256_store_ps(lanes, acc);
    double sum = 0.0;
    for (int l = 0; l < 8; ++l) sum += double(lanes[l]);
    sums[b0 / kRaceBlock] = sum;
  }
}

// Level 2 of the race over explicit weights buf[0, V): argmax_j buf[j] / e_j inside block k.
inline int64_t race_in_buffer(const float* buf, int64_t V, int64_t k, const PhiloxKey& key) {
  const int64_t j0 = k * kRaceBlock, j1 = std::min(V, j0 + kRaceBlock);
  float best = 0.0f;
  int64_t idx = -1;
  alignas(32) float sc[8];
  for (int64_t j = j0; j < j1; j += 8) {
    const __m256 wt = load_any(buf + j, j1 - j, 0.0f);
    _mm256_store_ps(sc, _mm256_div_ps(wt, exponential8(philox8_first_word(key, uint32_t(j)))));
    for (int64_t l = 0; l < 8 && j + l < j1; ++l)
      if (sc[l] > best) best = sc[l], idx = j + l;
  }
  return idx;
}

// return_logprobs: also (processed, raw) logprobs [B, D+1] float32 of the emitted tokens, from the
// statistics of the nodes walked (the raw denominator summed in the same sweep); else [B, 0].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> verify_tree_cpu(
    const at::Tensor& target_logits_in, const at::Tensor& tree_token_ids, const at::Tensor& tree_parents,
    const c10::optional<at::Tensor>& draft_probs_opt, const at::Tensor& temperature, const at::Tensor& top_k,
    const at::Tensor& top_p, const at::Tensor& seed, const at::Tensor& offset, int64_t max_depth,
    bool return_logprobs, const c10::optional<at::Tensor>& token_bitmask_opt) {
  TORCH_CHECK(target_logits_in.dim() == 3, "verify_tree: target_logits must be [B, N+1, V]");
  const at::Tensor logits = target_logits_in.contiguous();
  const int64_t B = logits.size(0), N1 = logits.size(1), Vt = logits.size(2), N = N1 - 1;
  TORCH_CHECK(N1 >= 1 && Vt >= 1, "verify_tree: target_logits needs N+1 >= 1 nodes and V >= 1");
  TORCH_CHECK(tree_token_ids.dim() == 2 && tree_token_ids.size(0) == B && tree_token_ids.size(1) == N,
              "verify_tree: tree_token_ids must be [B, N]");
  TORCH_CHECK(tree_parents.dim() == 2 && tree_parents.size(0) == B && tree_parents.size(1) == N,
              "verify_tree: tree_parents must be [B, N]");
  TORCH_CHECK(max_depth >= 0, "verify_tree: max_depth must be >= 0");
  const int64_t D = max_depth;
  const at::Tensor toks_t = tree_token_ids.to(at::kLong).contiguous();
  const at::Tensor pars_t = tree_parents.to(at::kLong).contiguous();
  const RowParams rp(temperature, top_k, top_p, seed, offset, B, "verify_tree");
  at::Tensor q_all;
  int64_t Vd = Vt;
  if (draft_probs_opt.has_value() && draft_probs_opt->defined()) {
    q_all = draft_probs_opt->contiguous();
    TORCH_CHECK(q_all.dim() == 3 && q_all.size(0) == B && q_all.size(1) == N && q_all.size(2) >= 1 &&
                    q_all.size(2) <= Vt,
                "verify_tree: draft_probs must be [B, N, Vd] with 1 <= Vd <= V");
    Vd = q_all.size(2);
  }
  const bool has_q = q_all.defined();
  const at::Tensor mask = check_bitmask(token_bitmask_opt, {B, N1}, "verify_tree");
  const int32_t* M = mask.defined() ? mask.data_ptr<int32_t>() : nullptr;
  const int64_t W = mask.defined() ? mask.size(2) : 0;

  auto out_ids = at::full({B, D + 1}, -1, logits.options().dtype(at::kLong));
  auto num_acc = at::zeros({B}, logits.options().dtype(at::kInt));
  auto acc_nodes = at::full({B, D}, -1, logits.options().dtype(at::kLong));
  auto lp_processed = at::full({B, return_logprobs ? D + 1 : 0}, kNegInf, logits.options().dtype(at::kFloat));
  auto lp_raw = at::full({B, return_logprobs ? D + 1 : 0}, kNegInf, logits.options().dtype(at::kFloat));
  if (B == 0) return {out_ids, num_acc, acc_nodes, lp_processed, lp_raw};

  const int64_t* tok = toks_t.data_ptr<int64_t>();
  const int64_t* par = pars_t.data_ptr<int64_t>();

  std::vector<RowSampling> rows(B);
  for (int64_t b = 0; b < B; ++b) rows[b].set(rp, b, Vt);

  const int64_t nchunk = (Vt + kChunk - 1) / kChunk;
  const int64_t nblock = (Vt + kRaceBlock - 1) / kRaceBlock;
  std::vector<ChunkStats> parts(B * nchunk);
  std::vector<double> block_sums(B * nblock);  // per row: the race's block sums of p
  std::vector<float> bmax(B * nblock);          // per row, current node: each block's max logit
  std::vector<double> bsum(B * nblock);         // ... and its sum of exp((x - block max) / t)
  const int64_t grain_chunks = std::max<int64_t>(1, 32768 / std::min(Vt, kChunk));
  int64_t* out = out_ids.data_ptr<int64_t>();
  int32_t* na = num_acc.data_ptr<int32_t>();
  int64_t* an = acc_nodes.data_ptr<int64_t>();
  std::vector<PosStats> step_stats(return_logprobs ? B * (D + 1) : 0);  // logprobs: the walked nodes' statistics

  dispatch_float(logits.scalar_type(), "verify_tree: target_logits", [&](auto tag) {
    dispatch_float(has_q ? q_all.scalar_type() : at::kFloat, "verify_tree: draft_probs", [&](auto qtag) {
      using T = decltype(tag);
      using Q = decltype(qtag);
      const T* L = logits.data_ptr<T>();
      const Q* Qp = has_q ? q_all.data_ptr<Q>() : nullptr;
      // node `node` (index into target_logits) of row b: its logits through its mask
      auto row_at = [&](int64_t b, int64_t node) {
        const int64_t i = b * N1 + node;
        return Logits<T>{L + i * Vt, M ? M + i * W : nullptr, W, 0};
      };

      auto at = [&](int64_t b, int64_t j) { return int64_t(uint64_t(rp.offset[b]) + uint64_t(j)); };

      // The race over p at node `node` (index into target_logits) whose statistics `st` are the
      // row's latest (bmax / bsum hold its blocks): on the sample streams, the target's own
      // sample; on the resample streams, the token after rejections that left p as it was.
      auto race_at = [&](int64_t b, int64_t node, int64_t j, const PosStats& st, auto&& exec,
                         int block_stream, int stream) -> int64_t {
        const RowSampling& r = rows[b];
        return race_p(row_at(b, node), Vt, st, r.inv_t, r.inv_t_f, r.filtered, &bmax[b * nblock],
                      &bsum[b * nblock], &block_sums[b * nblock], exec,
                      PhiloxKey(rp.seed[b], at(b, j), block_stream, 0), PhiloxKey(rp.seed[b], at(b, j), stream, 0));
      };

      auto run_row = [&](int64_t b, auto&& exec) {
        const RowSampling& r = rows[b];
        const int64_t* tk = tok + b * N;
        const int64_t* pr = par + b * N;
        // tree structure (reference.tree_structure): valid nodes and their depths
        std::vector<int64_t> depth(N, 0);  // 0 = invalid
        for (int64_t i = 0; i < N; ++i) {
          const int64_t p = pr[i];
          int64_t d = 0;
          if (p == -1) d = 1;
          else if (p >= 0 && p < i && depth[p] > 0) d = depth[p] + 1;
          depth[i] = (tk[i] != -1 && d > 0 && d <= D) ? d : 0;
        }
        ChunkStats* cs = &parts[b * nchunk];
        std::vector<int64_t> path;
        int64_t cur = -1, token = -1;
        std::vector<float> buf[2];        // residual buffers (allocated at the first rejection)
        std::vector<double> rsums[2];     // and their race-block sums
        for (int64_t j = 0; j <= D; ++j) {
          const int64_t node = cur + 1;
          const Logits<T> x = row_at(b, node);
          // masked greedy rows with logprobs: the masked denominator at T = 1 (token_logprobs)
          const bool want_sum = (!r.greedy && !r.filtered) || (r.greedy && M && return_logprobs);
          const PosStats st = position_stats(x, Vt, r, rp.top_k[b], double(rp.top_p[b]), want_sum, return_logprobs,
                                             &bmax[b * nblock], &bsum[b * nblock], cs, exec);
          if (!st.finite()) return;  // the emitted token would be drawn here: the row emits nothing
          if (return_logprobs) step_stats[b * (D + 1) + j] = st;
          bool has_child = false;
          int64_t accepted = -1;
          if (r.greedy || !Qp) {
            const int64_t target = r.greedy ? st.argmax
                                            : race_at(b, node, j, st, exec, kStreamSampleBlock, kStreamSample);
            for (int64_t i = cur + 1; i < N; ++i) {
              if (depth[i] == 0 || pr[i] != cur) continue;
              has_child = true;
              if (tk[i] >= 0 && tk[i] < Vd && tk[i] == target) {
                accepted = i;
                break;
              }
            }
            token = target;
          } else {
            // recursive rejection sampling over the children
            const Weights w(st, r.inv_t_f);
            const PhiloxKey accept_key(rp.seed[b], at(b, j), kStreamAccept, 0);
            int which = -1;       // buffer holding p_cur (unnormalised), -1: p_cur = p_v
            double scale = 1.0;   // p_cur = buf * scale
            uint32_t rank = 0;
            for (int64_t i = cur + 1; i < N; ++i) {
              if (depth[i] == 0 || pr[i] != cur) continue;
              has_child = true;
              const int64_t d = tk[i];
              const Q* q = Qp + (b * N + i) * Vd;
              const bool in_range = d >= 0 && d < Vd;
              bool accept = false;
              if (in_range) {
                double p = 0.0;
                if (which < 0) {  // p_v(d) in double from the token's own logit
                  const float xd = clean1(static_cast<float>(x[d]));
                  if (xd > kNegInf && xd >= st.thr) p = std::exp((double(xd) - double(st.max)) * r.inv_t) / st.z;
                } else {
                  p = double(buf[which][d]) * scale;
                }
                const double qd = draft_q1(static_cast<float>(q[d]));
                const double u = uniform_open_closed(accept_key.bits(rank));
                accept = p > 0.0 && u * qd <= p;
              }
              ++rank;
              if (accept) {
                accepted = i;
                break;
              }
              if (!in_range) continue;  // p_cur stays
              // p_cur <- max(0, p_cur - q_c) into the other buffer, kept only if it has mass
              const int dst = which < 0 ? 0 : 1 - which;
              if (buf[dst].empty()) buf[dst].resize(Vt), rsums[dst].resize(nblock);
              const float* src = which < 0 ? nullptr : buf[which].data();
              const float sc = float(scale);
              exec(nchunk, [&](int64_t c) {
                const int64_t j0 = c * kChunk, j1 = std::min(Vt, j0 + kChunk);
                residual_blocks<Q>(x, w, src, sc, q, Vd, j0, j1, buf[dst].data(), rsums[dst].data());
              });
              double mass = 0.0;
              for (int64_t k = 0; k < nblock; ++k) mass += rsums[dst][k];
              if (mass > 0.0) which = dst, scale = 1.0 / mass;
            }
            if (accepted < 0) {
              if (!has_child) {  // the bonus: the target's own sample
                token = race_at(b, node, j, st, exec, kStreamSampleBlock, kStreamSample);
              } else if (which < 0) {  // every rejection left p_cur = p_v
                token = race_at(b, node, j, st, exec, kStreamResampleBlock, kStreamResample);
              } else {
                const int64_t k = race_blocks(rsums[which].data(), nblock,
                                              PhiloxKey(rp.seed[b], at(b, j), kStreamResampleBlock, 0));
                const int64_t t = k < 0 ? -1 : race_in_buffer(buf[which].data(), Vt, k,
                                                              PhiloxKey(rp.seed[b], at(b, j), kStreamResample, 0));
                token = t >= 0 ? t : st.argmax;
              }
            }
          }
          if (accepted < 0) break;
          path.push_back(accepted);
          cur = accepted;
        }
        const int64_t n = int64_t(path.size());
        for (int64_t i = 0; i < n; ++i) {
          out[b * (D + 1) + i] = tk[path[i]];
          an[b * D + i] = path[i];
        }
        out[b * (D + 1) + n] = token;
        na[b] = int32_t(n);
      };
      for_rows(B, Vt, grain_chunks, run_row);
      // logprobs of the emitted tokens: slot j was drawn at the root (j = 0) or at the (j-1)-th
      // accepted node, whose statistics the walk kept
      if (return_logprobs) {
        float* lpp = lp_processed.data_ptr<float>();
        float* lpr = lp_raw.data_ptr<float>();
        for (int64_t b = 0; b < B; ++b)
          for (int64_t j = 0; j <= na[b] && out[b * (D + 1) + j] >= 0; ++j) {
            const int64_t node = j == 0 ? 0 : an[b * D + j - 1] + 1;
            token_logprobs(row_at(b, node), out[b * (D + 1) + j], step_stats[b * (D + 1) + j],
                           rows[b].inv_t, rows[b].greedy, &lpp[b * (D + 1) + j], &lpr[b * (D + 1) + j]);
          }
      }
    });
  });
  return {out_ids, num_acc, acc_nodes, lp_processed, lp_raw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> verify_tree_meta(
    const at::Tensor& target_logits, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    int64_t max_depth, bool return_logprobs, const c10::optional<at::Tensor>&) {
  const auto B = target_logits.sym_size(0);
  const c10::SymInt W(return_logprobs ? max_depth + 1 : 0);
  return {at::empty_symint({B, c10::SymInt(max_depth + 1)}, target_logits.options().dtype(at::kLong)),
          at::empty_symint({B}, target_logits.options().dtype(at::kInt)),
          at::empty_symint({B, c10::SymInt(max_depth)}, target_logits.options().dtype(at::kLong)),
          at::empty_symint({B, W}, target_logits.options().dtype(at::kFloat)),
          at::empty_symint({B, W}, target_logits.options().dtype(at::kFloat))};
}

}  // namespace
}  // namespace specdec

TORCH_LIBRARY_FRAGMENT(specdec_cpp, m) {
  m.def("verify_tree(Tensor target_logits, Tensor tree_token_ids, Tensor tree_parents, Tensor? draft_probs, "
        "Tensor temperature, Tensor top_k, Tensor top_p, Tensor seed, Tensor offset, int max_depth, "
        "bool return_logprobs=False, Tensor? token_bitmask=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(specdec_cpp, CPU, m) { m.impl("verify_tree", &specdec::verify_tree_cpu); }
TORCH_LIBRARY_IMPL(specdec_cpp, Meta, m) { m.impl("verify_tree", &specdec::verify_tree_meta); }
