// ATS's selection as native operations:
//   ats_vit::inverse_transform(scores, k): inverse transform sampling of the scores;
//   ats_vit::cls_value_scores(q, k, v, valid, scale, num_prefix): the ATS score (the class token's
//     attention summed over heads times the value norm);
//   ats_vit::ats_select(q, k, v, valid, scale, num_prefix, budget, layout_index, positions, packed):
//     one ATS block's whole selection in one call: score, sample, and the kept rows and layout.
//
// They give the same results, bit for bit, as their pure-PyTorch twins,
// ats_vit.core.scoring.class_attention_value_norm_reference and ats_vit.core.sampling.inverse_transform_reference.
// The sampling:
// float64 throughout, the same operation order (built with -ffp-contract=off so no multiply-add is
// fused), a stable ascending sort, a sequential cumulative sum (as torch's CPU cumsum), and the
// nearest-CDF choice with ties to the left. Where the reference runs ~30 tensor operations with
// their dispatch cost, this runs one loop per image: sort, cumulative sum, a two-pointer walk over
// the K grid points (the grid ascends, so the search pointer only moves forward), then compaction.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kTile = 16;  // keys whose dot products with the class query run side by side

// Kept indices of one row into keep[0..n): the reference's rule, see the Python docstring.
void select_row(const double* scores, int64_t n, int64_t k, std::vector<uint8_t>& keep,
                std::vector<std::pair<double, int64_t>>& pairs, std::vector<int64_t>& order,
                std::vector<double>& sorted, std::vector<double>& cdf) {
  std::fill(keep.begin(), keep.end(), 0);
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double s = scores[i];
    const bool eligible = s > 0 && std::isfinite(s);
    sorted[i] = eligible ? s : 0.0;
    m += eligible;
  }
  if (m == 0) return;
  if (m == 1) {  // the single eligible token is kept
    for (int64_t i = 0; i < n; ++i) keep[i] = sorted[i] > 0;
    return;
  }
  // (score, index) pairs in lexicographic order: a stable ascending sort by score.
  for (int64_t i = 0; i < n; ++i) pairs[i] = {sorted[i], i};
  std::sort(pairs.begin(), pairs.end());
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    order[i] = pairs[i].second;
    total += pairs[i].first;
    cdf[i] = total;
  }
  const int64_t first = n - m;  // the first eligible position in sorted order
  const double low = cdf[first];
  const double span = std::max(cdf[n - 1] - low, std::numeric_limits<double>::min());
  double y0 = std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    cdf[i] = i >= first ? (cdf[i] - low) / span : -std::numeric_limits<double>::infinity();
    if (cdf[i] > 0 && cdf[i] < y0) y0 = cdf[i];
  }
  int64_t right = 0;  // lower bound of the current grid point in cdf
  for (int64_t j = 0; j < k; ++j) {
    const double grid = k > 1 ? y0 + (1 - y0) * (static_cast<double>(j) / static_cast<double>(k - 1)) : 1.0;
    while (right < n && cdf[right] < grid) ++right;
    const int64_t r = std::min(right, n - 1);
    const int64_t l = std::max(r - 1, int64_t{0});
    const double to_left = grid - cdf[l];
    const double to_right = cdf[r] - grid;
    keep[order[to_left <= to_right ? l : r]] = 1;
  }
}

at::Tensor inverse_transform(const at::Tensor& scores, const at::Tensor& k) {
  TORCH_CHECK(scores.dim() == 2, "scores must be 2-D (B, n)");
  TORCH_CHECK(k.dim() == 1 && k.size(0) == scores.size(0), "k must be (B,)");
  const auto s = scores.to(at::kDouble).contiguous();
  const auto kk = k.to(at::kLong).contiguous();
  const int64_t B = s.size(0), n = s.size(1);
  auto keep = at::zeros({B, n}, scores.options().dtype(at::kBool));
  std::vector<int64_t> counts(B, 0);
  if (B > 0 && n > 0) {
    const double* sp = s.data_ptr<double>();
    const int64_t* kp = kk.data_ptr<int64_t>();
    bool* keep_p = keep.data_ptr<bool>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<uint8_t> row(n);
      std::vector<std::pair<double, int64_t>> pairs(n);
      std::vector<int64_t> order(n);
      std::vector<double> sorted(n), cdf(n);
      for (int64_t b = begin; b < end; ++b) {
        select_row(sp + b * n, n, kp[b], row, pairs, order, sorted, cdf);
        int64_t c = 0;
        for (int64_t i = 0; i < n; ++i) {
          keep_p[b * n + i] = row[i];
          c += row[i];
        }
        counts[b] = c;
      }
    });
  }
  const int64_t kmax = B > 0 ? *std::max_element(counts.begin(), counts.end()) : 0;
  auto index = at::full({B, kmax}, -1, scores.options().dtype(at::kLong));
  const bool* keep_p = keep.data_ptr<bool>();
  int64_t* out = index.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    int64_t c = 0;
    for (int64_t i = 0; i < n; ++i)
      if (keep_p[b * n + i]) out[b * kmax + c++] = i;
  }
  return index;
}

// The ATS score of ats_vit.core.scoring.class_attention_value_norm_reference, bit for bit: float64, every
// sum sequential in index order (as torch's CPU cumsum, which the twin uses), exp and sqrt through
// ATen's own kernels on contiguous tensors of the same shapes as the twin's.
template <typename T>
at::Tensor cls_value_scores_typed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const std::optional<at::Tensor>& valid, double scale, int64_t P) {
  const int64_t B = k.size(0), H = k.size(1), N = k.size(2), D = k.size(3), n = N - P;
  const auto opts = q.options().dtype(at::kDouble);
  auto shifted = at::empty({B, H, N}, opts);  // logits minus their row maximum
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  const auto qs = q.strides(), ks = k.strides(), vs = v.strides();
  const bool* valid_p = nullptr;
  at::Tensor valid_c;
  if (valid) {
    valid_c = valid->contiguous();
    valid_p = valid_c.data_ptr<bool>();
  }
  double* sh = shifted.data_ptr<double>();
  // Loops run over tokens innermost: each token's sum still adds in index order, and the
  // tokens' independent sums overlap instead of waiting on one another's additions.
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> q0(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      double* row = sh + bh * N;
      const T* kh = kp + b * ks[0] + h * ks[1];
      for (int64_t d = 0; d < D; ++d) q0[d] = static_cast<double>(qp[b * qs[0] + h * qs[1] + d * qs[3]]) * scale;
      for (int64_t j0 = 0; j0 < N; j0 += kTile) {  // a tile of keys: their rows stay in cache
        const int64_t j1 = std::min(j0 + kTile, N);
        double acc[kTile] = {};
        for (int64_t d = 0; d < D; ++d)
          for (int64_t j = j0; j < j1; ++j) acc[j - j0] += q0[d] * static_cast<double>(kh[j * ks[2] + d * ks[3]]);
        std::copy(acc, acc + (j1 - j0), row + j0);
      }
      if (valid_p)
        for (int64_t j = 0; j < N; ++j)
          if (!valid_p[b * N + j]) row[j] = -INFINITY;
      double top = -INFINITY;
      for (int64_t j = 0; j < N; ++j) top = std::max(top, row[j]);
      for (int64_t j = 0; j < N; ++j) row[j] = row[j] - top;
    }
  });
  const auto e = at::exp(shifted);
  const double* ep = e.data_ptr<double>();
  auto cls = at::empty({B, n}, opts), squares = at::empty({B, n}, opts);
  double *cp = cls.data_ptr<double>(), *sp = squares.data_ptr<double>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      double* c = cp + b * n;
      double* sq = sp + b * n;
      std::fill(c, c + n, 0.0);
      std::fill(sq, sq + n, 0.0);
      for (int64_t h = 0; h < H; ++h) {
        const double* eh = ep + (b * H + h) * N;
        double total = 0.0;
        for (int64_t j = 0; j < N; ++j) total += eh[j];
        for (int64_t j = 0; j < n; ++j) c[j] += eh[P + j] / total;
        const T* vh = vp + b * vs[0] + h * vs[1] + P * vs[2];
        for (int64_t d = 0; d < D; ++d)
          for (int64_t j = 0; j < n; ++j) {
            const double x = static_cast<double>(vh[j * vs[2] + d * vs[3]]);
            sq[j] += x * x;
          }
      }
    }
  });
  const auto norms = at::sqrt(squares);  // ATen's kernel, as the twin: its rounding is not std::sqrt's
  const double* np = norms.data_ptr<double>();
  auto scores = at::empty({B, n}, opts);
  double* out = scores.data_ptr<double>();
  for (int64_t b = 0; b < B; ++b) {
    double sum = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      const bool real = !valid_p || valid_p[b * N + P + j];
      cp[b * n + j] = real ? cp[b * n + j] * np[b * n + j] : 0.0;
      sum += cp[b * n + j];
    }
    sum = std::max(sum, std::numeric_limits<double>::min());
    for (int64_t j = 0; j < n; ++j) out[b * n + j] = cp[b * n + j] / sum;
  }
  return scores;
}

at::Tensor cls_value_scores(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& valid, double scale, int64_t num_prefix) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(1) == k.size(1)
              && q.size(3) == k.size(3), "q, k, v must be (B, H, N, d)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(), "q, k, v: one dtype");
  TORCH_CHECK(!valid || (valid->scalar_type() == at::kBool && valid->sizes() == at::IntArrayRef{k.size(0), k.size(2)}),
              "valid must be a (B, N) bool mask");
  at::Tensor result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "cls_value_scores", [&] {
    result = cls_value_scores_typed<scalar_t>(q, k, v, valid, scale, num_prefix);
  });
  return result;
}

// One ATS block's whole selection, as ats_vit.core.block.select's twin computes it: the score,
// the sampling, then ats_vit.core.tokens.select_rows (the kept columns, their rows in the flat
// tokens, their original positions, the new layout) and the kept rows of the queries.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ats_select(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& valid,
    double scale, int64_t num_prefix, const at::Tensor& budget, const at::Tensor& layout_index,
    const at::Tensor& positions, bool packed) {
  const int64_t P = num_prefix;
  const auto index = inverse_transform(cls_value_scores(q, k, v, valid, scale, P), budget);
  const int64_t B = index.size(0), K = index.size(1), W = P + K;
  const auto lopts = index.options();
  const int64_t* ip = index.data_ptr<int64_t>();
  bool any_padding = false;
  for (int64_t i = 0; i < B * K; ++i) any_padding |= ip[i] < 0;

  // The kept columns (prefix first), and the new layout: dense, or with a validity mask and,
  // when packed, each real token's row in the new packed tensor.
  auto kept_t = at::empty({B, W}, lopts);
  int64_t* kept = kept_t.data_ptr<int64_t>();
  auto new_valid = any_padding ? at::empty({B, W}, lopts.dtype(at::kBool)) : at::empty({0}, lopts.dtype(at::kBool));
  auto new_index = at::empty({B, W}, lopts);
  int64_t* ni = new_index.data_ptr<int64_t>();
  bool* nv = any_padding ? new_valid.data_ptr<bool>() : nullptr;
  int64_t real = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < W; ++j) {
      const int64_t i = j < P ? -2 : ip[b * K + j - P];  // -2: a prefix token, always real
      const bool is_real = i != -1;
      kept[b * W + j] = j < P ? j : std::max(i, int64_t{0}) + P;
      if (nv) nv[b * W + j] = is_real;
      ni[b * W + j] = !(packed && any_padding) ? b * W + j : (is_real ? real : 0);
      real += is_real;
    }
  }

  // Rows in the flat tokens (the real ones only, when packed with padding) and positions.
  const auto lidx = layout_index.contiguous();
  const auto pos = positions.contiguous();
  const int64_t N = lidx.size(1), n = pos.size(1);
  const int64_t* lp = lidx.data_ptr<int64_t>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  const bool real_only = packed && any_padding;
  auto flat_rows = at::empty({real_only ? real : B * W}, lopts);
  auto new_positions = at::empty({B, K}, lopts);
  int64_t* fr = flat_rows.data_ptr<int64_t>();
  int64_t* np = new_positions.data_ptr<int64_t>();
  int64_t r = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < W; ++j) {
      const bool is_real = j < P || ip[b * K + j - P] >= 0;
      if (!real_only || is_real) fr[r++] = lp[b * N + kept[b * W + j]];
    }
    for (int64_t j = 0; j < K; ++j) {
      const int64_t i = ip[b * K + j];
      np[b * K + j] = i < 0 ? -1 : pp[b * n + i];
    }
  }

  // The kept query rows (B, H, W, d), padding rows copying the first patch token's.
  const int64_t H = q.size(1), D = q.size(3);
  auto q_kept = at::empty({B, H, W, D}, q.options());
  const auto qs = q.strides();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "ats_select_rows", [&] {
    const scalar_t* src = q.data_ptr<scalar_t>();
    scalar_t* dst = q_kept.data_ptr<scalar_t>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        for (int64_t j = 0; j < W; ++j) {
          const scalar_t* from = src + b * qs[0] + h * qs[1] + kept[b * W + j] * qs[2];
          scalar_t* to = dst + (bh * W + j) * D;
          if (qs[3] == 1) {
            std::copy(from, from + D, to);
          } else {
            for (int64_t d = 0; d < D; ++d) to[d] = from[d * qs[3]];
          }
        }
      }
    });
  });
  return {q_kept, kept_t, flat_rows, new_positions, new_valid, new_index};
}

}  // namespace

TORCH_LIBRARY(ats_vit, m) {
  m.def("inverse_transform(Tensor scores, Tensor k) -> Tensor");
  m.def("cls_value_scores(Tensor q, Tensor k, Tensor v, Tensor? valid, float scale, int num_prefix) -> Tensor");
  m.def("ats_select(Tensor q, Tensor k, Tensor v, Tensor? valid, float scale, int num_prefix, Tensor budget, "
        "Tensor layout_index, Tensor positions, bool packed) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ats_vit, CPU, m) {
  m.impl("inverse_transform", &inverse_transform);
  m.impl("cls_value_scores", &cls_value_scores);
  m.impl("ats_select", &ats_select);
}
