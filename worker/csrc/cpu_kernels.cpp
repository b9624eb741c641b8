// Native CPU kernels of the engine (AVX2 + FMA + F16C), loaded by worker/cpu_kernels.py:
// - linear: y = x W^T, fp32 accumulation, weights in fp32, bf16 or fp16;
// - wkv_step: one token of the WKV recurrence for B sessions, fused.
//
// Why this exists: on AVX2-only CPUs (no AVX512_BF16) oneDNN has no bf16 kernels and torch's bf16 matmul runs at
// ~17 GFLOP/s, and for one token the fp32 GEMV of oneDNN reads weights at ~60% of the memory bandwidth. Decoding
// one token is a pure weight stream; a batch of 32 is GEMM compute. One packed layout serves both.
//
// Packed layout: the weight (O, K) is cut into panels of 16 output rows; panel p holds, for k = 0..K-1, the 16
// values W[16p .. 16p+15, k] side by side: (P, K, 16). A step of the microkernel loads the 16 weights of one k
// (one 64-byte line in fp32) and multiplies them into MR rows of x at once: MR x 2 accumulators of 8 floats.
// bf16 panels store each group of 16 in the order 0-3, 8-11, 4-7, 12-15, so that interleaving with zeros
// (unpacklo/unpackhi) yields outputs 0-7 and 8-15 as fp32 in one instruction each.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t NR = 16;  // output features per panel
constexpr int MR = 6;       // rows of x per microkernel call: 12 accumulators + 2 weights + 1 broadcast <= 16 ymm

struct F32 {
  using T = float;
  static inline void load(const T* p, __m256& lo, __m256& hi) {
    lo = _mm256_loadu_ps(p);
    hi = _mm256_loadu_ps(p + 8);
  }
};

struct BF16 {
  using T = uint16_t;
  static inline void load(const T* p, __m256& lo, __m256& hi) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i z = _mm256_setzero_si256();
    lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, v));  // bf16 << 16 is the fp32 with the same value
    hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, v));
  }
};

struct F16 {
  using T = uint16_t;
  static inline void load(const T* p, __m256& lo, __m256& hi) {
    lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  }
};

inline void store_row(float* y, __m256 lo, __m256 hi, int64_t ncols) {
  if (ncols == NR) {
    _mm256_storeu_ps(y, lo);
    _mm256_storeu_ps(y + 8, hi);
  } else {  // the last panel of a matrix whose O is not a multiple of 16 (zero-padded in the pack)
    alignas(32) float tmp[NR];
    _mm256_store_ps(tmp, lo);
    _mm256_store_ps(tmp + 8, hi);
    std::memcpy(y, tmp, ncols * sizeof(float));
  }
}

// y[r, 0:ncols] = sum_k x[r, k] * panel[k, :] for r < ROWS. The accumulators are named variables, not an array:
// GCC kept an array of them on the stack, storing all 12 every iteration (half the speed).
#define RWKV_ROW(r)                                                      \
  if constexpr (ROWS > r) {                                              \
    const __m256 xr = _mm256_broadcast_ss(x + r * ldx + k);              \
    c##r##0 = _mm256_fmadd_ps(xr, w0, c##r##0);                          \
    c##r##1 = _mm256_fmadd_ps(xr, w1, c##r##1);                          \
  }
#define RWKV_STORE(r) \
  if constexpr (ROWS > r) store_row(y + r * ldy, c##r##0, c##r##1, ncols);

template <int ROWS, typename W>
inline void microkernel(const typename W::T* panel, const float* x, int64_t ldx, int64_t K, float* y, int64_t ldy,
                        int64_t ncols) {
  const __m256 z = _mm256_setzero_ps();
  __m256 c00 = z, c01 = z, c10 = z, c11 = z, c20 = z, c21 = z, c30 = z, c31 = z, c40 = z, c41 = z, c50 = z, c51 = z;
  int64_t k = 0;
  if constexpr (ROWS == 1) {
    // One row: two FMA chains alone would wait on FMA latency, so odd k accumulate into the spare registers.
    for (; k + 1 < K; k += 2) {
      __m256 w0, w1, v0, v1;
      W::load(panel + k * NR, w0, w1);
      W::load(panel + (k + 1) * NR, v0, v1);
      const __m256 xa = _mm256_broadcast_ss(x + k), xb = _mm256_broadcast_ss(x + k + 1);
      c00 = _mm256_fmadd_ps(xa, w0, c00);
      c01 = _mm256_fmadd_ps(xa, w1, c01);
      c10 = _mm256_fmadd_ps(xb, v0, c10);
      c11 = _mm256_fmadd_ps(xb, v1, c11);
    }
    c00 = _mm256_add_ps(c00, c10);
    c01 = _mm256_add_ps(c01, c11);
  }
  for (; k < K; ++k) {
    __m256 w0, w1;
    W::load(panel + k * NR, w0, w1);
    RWKV_ROW(0) RWKV_ROW(1) RWKV_ROW(2) RWKV_ROW(3) RWKV_ROW(4) RWKV_ROW(5)
  }
  RWKV_STORE(0) RWKV_STORE(1) RWKV_STORE(2) RWKV_STORE(3) RWKV_STORE(4) RWKV_STORE(5)
}
#undef RWKV_ROW
#undef RWKV_STORE

template <typename W>
void rows_of_panel(const typename W::T* panel, const float* x, int64_t M, int64_t K, float* y, int64_t O,
                   int64_t ncols) {
  int64_t r = 0;
  for (; r + MR <= M; r += MR) {
    microkernel<MR, W>(panel, x + r * K, K, K, y + r * O, O, ncols);
  }
  const float* xr = x + r * K;
  float* yr = y + r * O;
  switch (M - r) {
    case 5: microkernel<5, W>(panel, xr, K, K, yr, O, ncols); break;
    case 4: microkernel<4, W>(panel, xr, K, K, yr, O, ncols); break;
    case 3: microkernel<3, W>(panel, xr, K, K, yr, O, ncols); break;
    case 2: microkernel<2, W>(panel, xr, K, K, yr, O, ncols); break;
    case 1: microkernel<1, W>(panel, xr, K, K, yr, O, ncols); break;
    default: break;
  }
}

template <typename W>
void run(const typename W::T* packed, const float* x, float* y, int64_t M, int64_t K, int64_t O) {
  const int64_t panels = (O + NR - 1) / NR;
  // Each thread takes a contiguous run of panels, i.e. a contiguous stretch of the weight stream.
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1));
  at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
    // Half-precision panels read by several row tiles are widened to fp32 once, into a buffer that stays in L2:
    // widening is 2 shuffles per 16 weights, which the FMA pipes otherwise pay again for every 6 rows.
    std::vector<float> wide(std::is_same_v<W, F32> || M <= MR ? 0 : K * NR);
    for (int64_t p = begin; p < end; ++p) {
      const typename W::T* panel = packed + p * K * NR;
      const int64_t ncols = std::min(NR, O - p * NR);
      if (wide.empty()) {
        rows_of_panel<W>(panel, x, M, K, y + p * NR, O, ncols);
      } else {
        for (int64_t k = 0; k < K; ++k) {
          __m256 lo, hi;
          W::load(panel + k * NR, lo, hi);
          _mm256_storeu_ps(wide.data() + k * NR, lo);
          _mm256_storeu_ps(wide.data() + k * NR + 8, hi);
        }
        rows_of_panel<F32>(wide.data(), x, M, K, y + p * NR, O, ncols);
      }
    }
  });
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "x must be a contiguous fp32 (M, K) CPU tensor");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == NR && packed.is_contiguous(), "packed must be (P, K, 16)");
  const int64_t M = x.size(0), K = x.size(1), O = out_features;
  TORCH_CHECK(packed.size(1) == K, "x has ", K, " features, the weight ", packed.size(1));
  TORCH_CHECK(packed.size(0) == (O + NR - 1) / NR, "packed has ", packed.size(0), " panels, not enough for ", O);
  at::Tensor y = at::empty({M, O}, x.options());
  if (M == 0 || O == 0) return y;
  const float* xp = x.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  switch (packed.scalar_type()) {
    case at::kFloat: run<F32>(packed.const_data_ptr<float>(), xp, yp, M, K, O); break;
    case at::kBFloat16:
      run<BF16>(reinterpret_cast<const uint16_t*>(packed.const_data_ptr<at::BFloat16>()), xp, yp, M, K, O);
      break;
    case at::kHalf: run<F16>(reinterpret_cast<const uint16_t*>(packed.const_data_ptr<at::Half>()), xp, yp, M, K, O); break;
    default: TORCH_CHECK(false, "unsupported weight dtype ", packed.scalar_type());
  }
  return y;
}

// One token of the WKV recurrence, fused: y_j = sum_i r_i (S_ij + u_i k_i v_j) and S'_ij = w_i S_ij + k_i v_j.
// Each (session, head) state matrix is read once and its successor written once, where torch needs three passes
// over it (r @ S, w * S, + k v^T): at 32 sessions of a 768-wide model that is 78 MB of state per layer and step.
// `out` may be `s` itself (each element is read before it is written).
at::Tensor wkv_step(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
                    const at::Tensor& u, const at::Tensor& s, const at::Tensor& out) {
  TORCH_CHECK(r.dim() == 3 && s.dim() == 4, "r must be (B, H, N) and s (B, H, N, N)");
  const int64_t B = r.size(0), H = r.size(1), N = r.size(2);
  TORCH_CHECK(N <= 256, "head size ", N, " > 256");
  for (const at::Tensor* t : {&r, &k, &v, &w, &u, &s, &out}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(),
                "wkv_step takes contiguous fp32 CPU tensors");
  }
  TORCH_CHECK(k.sizes() == r.sizes() && v.sizes() == r.sizes(), "r, k, v must have the same shape");
  TORCH_CHECK(w.numel() == H * N && u.numel() == H * N, "w and u must be (H, N)");
  TORCH_CHECK(s.sizes() == at::IntArrayRef({B, H, N, N}) && out.sizes() == s.sizes(), "s and out must be (B, H, N, N)");
  at::Tensor y = at::empty({B, H, N}, r.options());
  const float *rp = r.const_data_ptr<float>(), *kp = k.const_data_ptr<float>(), *vp = v.const_data_ptr<float>();
  const float *wp = w.const_data_ptr<float>(), *up = u.const_data_ptr<float>(), *sp = s.const_data_ptr<float>();
  float *op = out.mutable_data_ptr<float>(), *yp = y.mutable_data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    float acc[256];
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t h = bh % H;
      const float *rr = rp + bh * N, *kk = kp + bh * N, *vv = vp + bh * N, *ww = wp + h * N, *uu = up + h * N;
      const float* S = sp + bh * N * N;
      float* O = op + bh * N * N;
      std::fill(acc, acc + N, 0.0f);
      for (int64_t i = 0; i < N; ++i) {
        const float ri = rr[i], ki = kk[i], wi = ww[i], bonus = ri * uu[i] * ki;
        const float* Si = S + i * N;
        float* Oi = O + i * N;
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) {
          const float sij = Si[j], vj = vv[j];
          acc[j] += ri * sij + bonus * vj;
          Oi[j] = wi * sij + ki * vj;
        }
      }
      std::copy(acc, acc + N, yp + bh * N);
    }
  });
  return y;
}

// The FMA throughput of this machine: every thread runs independent register-only FMA chains (no memory traffic).
// A roofline for the benchmarks: no fp32 kernel can beat it. Returns GFLOP/s.
double peak_gflops(int64_t iterations) {
  std::atomic<double> total{0.0};
  const int threads = at::get_num_threads();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      __m256 a[12];
      const __m256 m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
      for (int i = 0; i < 12; ++i) a[i] = _mm256_set1_ps(1.0f + i);
      const auto start = std::chrono::steady_clock::now();
      for (int64_t it = 0; it < iterations; ++it) {
        for (int i = 0; i < 12; ++i) a[i] = _mm256_fmadd_ps(a[i], m, c);
      }
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      float sink[8];
      __m256 s = a[0];
      for (int i = 1; i < 12; ++i) s = _mm256_add_ps(s, a[i]);
      _mm256_storeu_ps(sink, s);
      volatile float keep = sink[0];
      (void)keep;
      double cur = total.load();
      while (!total.compare_exchange_weak(cur, cur + 12.0 * 8 * 2 * iterations / secs / 1e9)) {
      }
    }
  });
  return total.load();
}

}  // namespace

#ifndef RWKV_CPU_LIBRARY
#define RWKV_CPU_LIBRARY rwkv_cpu  // another name only to load a variant beside it (benchmarks)
#endif

TORCH_LIBRARY(RWKV_CPU_LIBRARY, m) {
  m.def("linear(Tensor x, Tensor packed, int out_features) -> Tensor", &linear);
  m.def("wkv_step(Tensor r, Tensor k, Tensor v, Tensor w, Tensor u, Tensor s, Tensor(a!) out) -> Tensor", &wkv_step);
  m.def("peak_gflops(int iterations) -> float", &peak_gflops);
}
