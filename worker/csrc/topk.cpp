// Top-k per row for the sampler (worker/sampler.py), loaded with cpu_kernels.cpp into the same library.
//
// Order: value descending, NaN above everything (as torch.topk), and among equal values the lower index first:
// one defined order, so a seeded draw over a head with ties picks the same token on every run and batch.
//
// Why this exists: torch.topk on CPU partial-sorts a copy of every row (~1.8 ms for 32 x 65,536 floats at k = 64
// on two cores, half of a batch's sampling). Here each row is one pass against the k-th best value so far: 32 floats
// per step, and a block is looked at element by element only when one of its values beats it.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <vector>

namespace {

// A rank key: the float's bits mapped to an unsigned order (negatives inverted, positives above them, -0 as +0,
// every NaN above +inf) in the high half, the inverted index in the low half; a larger key ranks first. Integer compares keep
// nth_element and sort free of the float and NaN branches (3x faster than comparing (value, index) pairs).
inline uint64_t rank_key(float v, int64_t index) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  if (v == 0.0f) bits = 0;  // -0 ranks as +0: equal values, index order
  const uint32_t order = std::isnan(v) ? 0xFFFFFFFFu : (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
  return (static_cast<uint64_t>(order) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(index));
}

inline int64_t key_index(uint64_t key) { return 0xFFFFFFFFu - static_cast<uint32_t>(key); }

// The first `capacity` values fill a buffer, nth_element keeps the best k and the k-th best becomes the threshold;
// then only values above it are appended, and a full buffer is cut back to k the same way. The scan compares 32
// floats per step (four AVX2 compares) and appends the flagged lanes of a step that holds candidates.
void row_topk(const float* x, int64_t n, int64_t k, float* out_values, int64_t* out_indices,
              std::vector<uint64_t>& buf) {
  constexpr int64_t W = 32;
  const int64_t capacity = std::max<int64_t>(2 * k, k + 256);
  buf.clear();
  buf.reserve(capacity + W);
  int64_t j = std::min(n, capacity);
  for (int64_t t = 0; t < j; ++t) buf.push_back(rank_key(x[t], t));
  auto compact = [&]() {
    std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end(), std::greater<uint64_t>());
    buf.resize(k);
    return x[key_index(buf[k - 1])];  // the k-th ranked; every entry before it ranks before it
  };
  float worst = j < n ? compact() : 0.0f;
  // Indices only grow, so a later value equal to the worst ranks after it, and nothing beats a NaN worst.
  if (std::isnan(worst)) j = n;
  __m256 thr = _mm256_set1_ps(worst);
  auto take = [&](int64_t base, __m256 hit) {  // append the flagged lanes of x[base .. base + 7]
    for (unsigned m = _mm256_movemask_ps(hit); m != 0; m &= m - 1) {
      const int64_t t = base + __builtin_ctz(m);
      buf.push_back(rank_key(x[t], t));
    }
  };
  for (; j + W <= n; j += W) {
    // not (v <= worst), unordered true: every value above the worst, and NaN, flags its lane
    const __m256 a = _mm256_cmp_ps(_mm256_loadu_ps(x + j), thr, _CMP_NLE_UQ);
    const __m256 b = _mm256_cmp_ps(_mm256_loadu_ps(x + j + 8), thr, _CMP_NLE_UQ);
    const __m256 c = _mm256_cmp_ps(_mm256_loadu_ps(x + j + 16), thr, _CMP_NLE_UQ);
    const __m256 d = _mm256_cmp_ps(_mm256_loadu_ps(x + j + 24), thr, _CMP_NLE_UQ);
    if (_mm256_movemask_ps(_mm256_or_ps(_mm256_or_ps(a, b), _mm256_or_ps(c, d))) == 0) continue;
    take(j, a);
    take(j + 8, b);
    take(j + 16, c);
    take(j + 24, d);
    if (static_cast<int64_t>(buf.size()) >= capacity) {
      worst = compact();
      if (std::isnan(worst)) j = n;
      thr = _mm256_set1_ps(worst);
    }
  }
  for (; j < n; ++j) {
    if (std::isnan(x[j]) ? !std::isnan(worst) : x[j] > worst) buf.push_back(rank_key(x[j], j));
  }
  if (static_cast<int64_t>(buf.size()) > k) compact();
  std::sort(buf.begin(), buf.end(), std::greater<uint64_t>());
  for (int64_t i = 0; i < k; ++i) {
    out_indices[i] = key_index(buf[i]);
    out_values[i] = x[out_indices[i]];
  }
}

// x: (R, n) fp32 -> (values (R, k), indices (R, k) int64), each row in the order above. 0 <= k <= n.
std::tuple<at::Tensor, at::Tensor> topk(const at::Tensor& x_in, int64_t k) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "topk: x must be a 2-D float32 CPU tensor");
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(k >= 0 && k <= n, "topk: k must be in [0, ", n, "], got ", k);
  TORCH_CHECK(n < (int64_t{1} << 32), "topk: rows of 2^32 values or more are not supported");
  at::Tensor values = at::empty({rows, k}, x.options());
  at::Tensor indices = at::empty({rows, k}, x.options().dtype(at::kLong));
  const float* xp = x.const_data_ptr<float>();
  float* vp = values.mutable_data_ptr<float>();
  int64_t* ip = indices.mutable_data_ptr<int64_t>();
  if (k == 0 || rows == 0) return {values, indices};
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> buf;
    for (int64_t r = begin; r < end; ++r) row_topk(xp + r * n, n, k, vp + r * k, ip + r * k, buf);
  });
  return {values, indices};
}

}  // namespace

#ifndef RWKV_CPU_LIBRARY
#define RWKV_CPU_LIBRARY rwkv_cpu
#endif

TORCH_LIBRARY_FRAGMENT(RWKV_CPU_LIBRARY, m) {
  m.def("topk(Tensor x, int k) -> (Tensor, Tensor)", &topk);
}
