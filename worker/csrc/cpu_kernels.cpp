// Native CPU kernels of the engine (AVX2 + FMA + F16C), loaded by worker/cpu_kernels.py:
// - linear: y = x W^T, fp32 accumulation, weights in fp32, bf16 or fp16;
// - wkv_step: one token of the WKV recurrence for B sessions, fused;
// - block: one whole block of the model over T tokens of B sessions (decode steps and prefill chunks).
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
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cmath>
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

// y (M, O) = x (M, K) W^T for a packed W of any supported dtype.
void matmul(const at::Tensor& packed, const float* x, float* y, int64_t M, int64_t K, int64_t O) {
  switch (packed.scalar_type()) {
    case at::kFloat: run<F32>(packed.const_data_ptr<float>(), x, y, M, K, O); break;
    case at::kBFloat16:
      run<BF16>(reinterpret_cast<const uint16_t*>(packed.const_data_ptr<at::BFloat16>()), x, y, M, K, O);
      break;
    case at::kHalf: run<F16>(reinterpret_cast<const uint16_t*>(packed.const_data_ptr<at::Half>()), x, y, M, K, O); break;
    default: TORCH_CHECK(false, "unsupported weight dtype ", packed.scalar_type());
  }
}

// x (..., K) fp32 -> y (..., O) fp32. Reshaping happens here, not in Python: a decode step makes ~100 of these
// calls, and each Python-side view/contiguous/float costs microseconds that add up to ~10% of a bf16 step.
at::Tensor linear(const at::Tensor& x_in, const at::Tensor& packed, int64_t out_features) {
  TORCH_CHECK(x_in.dim() >= 1 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "x must be an fp32 (..., K) CPU tensor");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == NR && packed.is_contiguous(), "packed must be (P, K, 16)");
  const int64_t K = x_in.size(-1), O = out_features;
  TORCH_CHECK(packed.size(1) == K, "x has ", K, " features, the weight ", packed.size(1));
  TORCH_CHECK(packed.size(0) == (O + NR - 1) / NR, "packed has ", packed.size(0), " panels, not enough for ", O);
  const at::Tensor x = x_in.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0);
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  shape.back() = O;
  at::Tensor y = at::empty(shape, x.options());
  if (M == 0 || O == 0) return y;
  matmul(packed, x.const_data_ptr<float>(), y.mutable_data_ptr<float>(), M, K, O);
  return y;
}

// y = (x - mean) / sqrt(var + eps) * w + b over n values (LayerNorm of a row, GroupNorm of a head), times `gate`
// when given. Mean and variance accumulate in double.
inline void normalize(const float* x, float* y, int64_t n, const float* w, const float* b, double eps,
                      const float* gate = nullptr) {
  double mean = 0.0, var = 0.0;
  for (int64_t j = 0; j < n; ++j) mean += x[j];
  mean /= n;
  for (int64_t j = 0; j < n; ++j) var += (x[j] - mean) * (x[j] - mean);
  const float inv = static_cast<float>(1.0 / std::sqrt(var / n + eps)), m = static_cast<float>(mean);
  for (int64_t j = 0; j < n; ++j) y[j] = ((x[j] - m) * inv * w[j] + b[j]) * (gate ? gate[j] : 1.0f);
}

// The WKV recurrence over raw pointers, T tokens per session: r, k, v, y (B, T, H, N), a row of H*N per token;
// w, u (H, N); s, out (B, H, N, N). Each (session, head) runs its tokens in order; from the second token on the
// state lives in `out`, updated in place (`out` may be `s` itself: each element is read before it is written).
// With `ln_w` given, each token's y is GroupNorm'ed per head (ln_x: weight/bias per channel, eps) and multiplied by
// `gate` (the layout of y).
void wkv_core(const float* rp, const float* kp, const float* vp, const float* wp, const float* up, const float* sp,
              float* op, float* yp, int64_t B, int64_t T, int64_t H, int64_t N, const float* ln_w = nullptr,
              const float* ln_b = nullptr, double eps = 0.0, const float* gate = nullptr) {
  const int64_t D = H * N;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    float acc[256];
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const float *ww = wp + h * N, *uu = up + h * N;
      float* O = op + bh * N * N;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t at = (b * T + t) * D + h * N;
        const float *rr = rp + at, *kk = kp + at, *vv = vp + at;
        const float* S = t == 0 ? sp + bh * N * N : O;
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
        if (ln_w == nullptr) {
          std::copy(acc, acc + N, yp + at);
        } else {
          normalize(acc, yp + at, N, ln_w + h * N, ln_b + h * N, eps, gate + at);
        }
      }
    }
  });
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
  wkv_core(r.const_data_ptr<float>(), k.const_data_ptr<float>(), v.const_data_ptr<float>(), w.const_data_ptr<float>(),
           u.const_data_ptr<float>(), s.const_data_ptr<float>(), out.mutable_data_ptr<float>(),
           y.mutable_data_ptr<float>(), B, 1, H, N);
  return y;
}

// e^x for 8 floats: 2^n p(r) with n = round(x / ln 2), r = x - n ln 2 (ln 2 in two parts), p Cephes' degree-6
// polynomial for expf (about 1 ulp on [-ln 2 / 2, ln 2 / 2]); x clamped to where 2^n is a normal float, so e^x
// saturates at ~1e-38 and ~2e38 instead of reaching 0 and inf (1 / (1 + e^-x) is then exact to fp32 anyway).
// GCC does not vectorize std::exp without -ffast-math: the scalar call was ~3% of a prefill forward.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 q = _mm256_set1_ps(1.9875691500e-4f);
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.3981999507e-3f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(8.3334519073e-3f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(4.1665795894e-2f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.6666665459e-1f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(5.0000001201e-1f));
  q = _mm256_fmadd_ps(q, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(q, _mm256_castsi256_ps(e));
}

// 1 + e^-x for 8 floats: x / that is silu(x), y / that is y sigmoid(x) (the scalar code's order of operations).
inline __m256 one_plus_exp_neg8(__m256 x) {
  return _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), x)));
}

// out[i] = f(a[i], b[i], c[i]) over n floats, 8 at a time through f (b, c may be null: zeros), split across threads
// only where n is large (prefill): a decode step's vectors are too small to pay for the hand-off. The last n % 8 go through f on a zero-padded copy, so every element gets the same arithmetic whatever the
// thread split. Written with intrinsics: with `#pragma omp simd` alone GCC kept relu^2 scalar and branchy (a
// compare and a jump per element, ~8% of a 32 x 19 prefill forward at D=384) and std::exp scalar.
template <typename F>
void map8(int64_t n, float* out, const float* a, const float* b, const float* c, const F& f) {
  auto load = [](const float* p, int64_t i) { return p ? _mm256_loadu_ps(p + i) : _mm256_setzero_ps(); };
  const int64_t full = n / 8;
  at::parallel_for(0, full, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t i = k * 8;
      _mm256_storeu_ps(out + i, f(_mm256_loadu_ps(a + i), load(b, i), load(c, i)));
    }
  });
  const int64_t i = full * 8, rest = n - i;
  if (rest > 0) {
    float pa[8] = {}, pb[8] = {}, pc[8] = {}, po[8];
    std::copy(a + i, a + n, pa);
    if (b) std::copy(b + i, b + n, pb);
    if (c) std::copy(c + i, c + n, pc);
    _mm256_storeu_ps(po, f(_mm256_loadu_ps(pa), _mm256_loadu_ps(pb), _mm256_loadu_ps(pc)));
    std::copy(po, po + rest, out + i);
  }
}

void layer_norm_rows(const float* x, float* y, int64_t M, int64_t D, const float* w, const float* b) {
  at::parallel_for(0, M, std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) normalize(x + i * D, y + i * D, D, w, b, 1e-5);
  });
}

// xx's rows shifted by one token within each session, the carried `shift` (B, D) first: the token-shift input.
// Writes mix_c * (xx - prev) + prev for each of the C mix vectors (D each) into out (C, B*T, D).
template <int C>
void token_shift_mix(const float* xx, const float* shift, const std::array<const float*, C>& mix, int64_t B,
                     int64_t T, int64_t D, float* out) {
  const int64_t M = B * T, MD = M * D;
  at::parallel_for(0, M, std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {  // row by row, so that the loop over d vectorizes
      const float* cur = xx + row * D;
      const float* prev = row % T == 0 ? shift + (row / T) * D : cur - D;
      for (int c = 0; c < C; ++c) {
        const float* m = mix[c];
        float* o = out + c * MD + row * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] = prev[d] + m[d] * (cur[d] - prev[d]);
      }
    }
  });
}

// The last token's row of each session: the shift carried to the next call.
void last_rows(const float* xx, float* shift, int64_t B, int64_t T, int64_t D) {
  for (int64_t b = 0; b < B; ++b) std::copy(xx + (b * T + T - 1) * D, xx + (b * T + T) * D, shift + b * D);
}

// x (M, K) fp32 W^T through oneDNN's prepacked linear (`weight` from torch.ops.mkldnn._reorder_linear_weight; x
// is cast to its dtype first): (M, O) fp32, the op worker/linear.py calls for "dual" and "onednn" Linears. Looked
// up once through the dispatcher: it is part of libtorch, not of this library. The block reads its result where it
// lies (a copy into a buffer of the block's own cost ~3% of a prefill forward).
at::Tensor onednn_linear(const at::Tensor& weight, const float* x, int64_t M, int64_t K) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  at::Tensor xt = at::from_blob(const_cast<float*>(x), {M, K}, at::TensorOptions().dtype(at::kFloat));
  if (weight.scalar_type() != at::kFloat) xt = xt.to(weight.scalar_type());
  torch::jit::Stack stack{xt, weight, c10::IValue(), std::string("none"), c10::List<std::optional<at::Scalar>>(),
                          std::string("")};
  op.callBoxed(&stack);
  at::Tensor y = stack[0].toTensor();
  if (y.scalar_type() != at::kFloat) y = y.to(at::kFloat);
  return y.contiguous();
}

// Indices into block's parameter list (built by worker/model.py, RWKV5._native_block_params).
enum BlockParam {
  LN1_W, LN1_B, ATT_MIX, ATT_R, ATT_K, ATT_V, ATT_G, ATT_W, ATT_U, LN_X_W, LN_X_B, ATT_OUT,
  LN2_W, LN2_B, FFN_MIX_K, FFN_MIX_R, FFN_KEY, FFN_VALUE, FFN_R, N_BLOCK_PARAMS
};
// The block's matrices, in the order of its oneDNN weight list (RWKV5._native_block_onednn).
constexpr std::array<int, 8> BLOCK_LINEARS = {ATT_R, ATT_K, ATT_V, ATT_G, ATT_OUT, FFN_KEY, FFN_VALUE, FFN_R};

// One block of the model over T tokens of B sessions: the same arithmetic as RWKV5._block (worker/model.py), the
// readable definition, in one call instead of ~35 torch ops per block. For decode (T = 1) that dispatch cost ~4 ms
// of a 17 ms bf16 step at D=768; for prefill the torch path's allocations, copies and its chunked WKV (batched
// matmuls over small tiles) cost as much as its matmuls at D=384, where this runs the recurrence token by token
// with each head's state in L1. x (B, T, D) -> x after the block; the new shifts and WKV state are written to the
// new_* tensors (B rows each). With `onednn` given (a "dual" model: its 8 matrices as oneDNN weights, in
// BLOCK_LINEARS order), calls of `onednn_from_rows` rows or more multiply through oneDNN, whose GEMMs are faster
// there on CPUs with AVX-512 (fp32) or AVX512_BF16 (bf16), and keep the fused elementwise work.
at::Tensor block(const at::Tensor& x_in, at::TensorList p, at::TensorList onednn, int64_t onednn_from_rows,
                 const at::Tensor& att_shift, const at::Tensor& wkv, const at::Tensor& ffn_shift,
                 const at::Tensor& new_att_shift, const at::Tensor& new_wkv, const at::Tensor& new_ffn_shift,
                 double scale) {
  TORCH_CHECK(static_cast<int64_t>(p.size()) == N_BLOCK_PARAMS, "block takes ", N_BLOCK_PARAMS, " parameters");
  TORCH_CHECK(onednn.empty() || onednn.size() == BLOCK_LINEARS.size(), "block takes 0 or ", BLOCK_LINEARS.size(),
              " oneDNN weights");
  const int64_t D = p[ATT_OUT].size(1), H = p[ATT_W].size(0), N = p[ATT_W].size(1), F = p[FFN_VALUE].size(1);
  const at::Tensor x = x_in.reshape({-1, D}).contiguous();
  const int64_t M = x.size(0), B = att_shift.size(0);
  TORCH_CHECK(x.scalar_type() == at::kFloat && H * N == D && N <= 256, "block: bad shapes");
  TORCH_CHECK(B > 0 && M % B == 0 && M > 0, "block: x has ", M, " rows, not T rows for each of ", B, " sessions");
  const int64_t T = M / B;
  for (const at::Tensor* t : {&att_shift, &wkv, &ffn_shift, &new_att_shift, &new_wkv, &new_ffn_shift}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->size(0) == B, "block: bad state");
  }
  auto f = [&](int i) { return p[i].const_data_ptr<float>(); };
  const auto opt = x.options();
  const bool use_onednn = !onednn.empty() && M >= onednn_from_rows;
  at::Tensor out = at::empty({M, D}, opt), xx = at::empty({M, D}, opt), mixed = at::empty({4, M, D}, opt);
  at::Tensor y = at::empty({M, D}, opt);
  // The native kernels write into these; oneDNN's results are read where they lie (`results`).
  at::Tensor rkvg, o, hidden, rf;
  if (!use_onednn) {
    rkvg = at::empty({4, M, D}, opt), o = at::empty({M, D}, opt), hidden = at::empty({M, F}, opt);
    rf = at::empty({M, D}, opt);
  }
  auto buffer = [](at::Tensor& t, int64_t offset = 0) {
    return t.defined() ? t.mutable_data_ptr<float>() + offset : nullptr;
  };
  std::vector<at::Tensor> results;
  results.reserve(BLOCK_LINEARS.size());
  float *xo = out.mutable_data_ptr<float>(), *xxp = xx.mutable_data_ptr<float>(), *mp = mixed.mutable_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  const float* xp = x.const_data_ptr<float>();
  const int64_t MD = M * D;
  const float sc = static_cast<float>(scale);
  const __m256 scv = _mm256_set1_ps(sc);
  // in (M, K) times matrix `param`: into `into` (native) or oneDNN's own result; returns where the product lies.
  auto mm = [&](int param, const float* in, float* into, int64_t K, int64_t O) -> float* {
    if (use_onednn) {
      const auto index = std::find(BLOCK_LINEARS.begin(), BLOCK_LINEARS.end(), param) - BLOCK_LINEARS.begin();
      results.push_back(onednn_linear(onednn[index], in, M, K));
      return results.back().mutable_data_ptr<float>();
    }
    matmul(p[param], in, into, M, K, O);
    return into;
  };

  // Time mixing: token shift lerps, r/k/v/g, WKV + GroupNorm + gate, output projection.
  layer_norm_rows(xp, xxp, M, D, f(LN1_W), f(LN1_B));
  const float* att_mix = f(ATT_MIX);  // (4, D): r, k, v, g
  token_shift_mix<4>(xxp, att_shift.const_data_ptr<float>(), {att_mix, att_mix + D, att_mix + 2 * D, att_mix + 3 * D},
                     B, T, D, mp);
  float* rkvg_at[4];
  for (int c = 0; c < 4; ++c) rkvg_at[c] = mm(ATT_R + c, mp + c * MD, buffer(rkvg, c * MD), D, D);
  float* g = rkvg_at[3];
  map8(MD, g, g, nullptr, nullptr, [](__m256 a, __m256, __m256) { return _mm256_div_ps(a, one_plus_exp_neg8(a)); });
  wkv_core(rkvg_at[0], rkvg_at[1], rkvg_at[2], f(ATT_W), f(ATT_U), wkv.const_data_ptr<float>(),
           new_wkv.mutable_data_ptr<float>(), yp, B, T, H, N, f(LN_X_W), f(LN_X_B), 1e-5 * 64, g);
  const float* op = mm(ATT_OUT, yp, buffer(o), D, D);
  map8(MD, xo, xp, op, nullptr, [&](__m256 x0, __m256 o, __m256) { return _mm256_fmadd_ps(o, scv, x0); });
  last_rows(xxp, new_att_shift.mutable_data_ptr<float>(), B, T, D);

  // Channel mixing: token shift lerps, relu(key)^2 -> value, gated by sigmoid(receptance).
  layer_norm_rows(xo, xxp, M, D, f(LN2_W), f(LN2_B));
  token_shift_mix<2>(xxp, ffn_shift.const_data_ptr<float>(), {f(FFN_MIX_K), f(FFN_MIX_R)}, B, T, D, mp);
  float* hp = mm(FFN_KEY, mp, buffer(hidden), D, F);
  map8(M * F, hp, hp, nullptr, nullptr, [](__m256 a, __m256, __m256) {  // relu^2
    const __m256 h = _mm256_max_ps(a, _mm256_setzero_ps());
    return _mm256_mul_ps(h, h);
  });
  const float* vp = mm(FFN_VALUE, hp, buffer(o), F, D);
  const float* rp = mm(FFN_R, mp + MD, buffer(rf), D, D);
  map8(MD, xo, xo, vp, rp, [&](__m256 x0, __m256 v, __m256 r) {  // x += value * scale * sigmoid(receptance)
    return _mm256_add_ps(x0, _mm256_div_ps(_mm256_mul_ps(v, scv), one_plus_exp_neg8(r)));
  });
  last_rows(xxp, new_ffn_shift.mutable_data_ptr<float>(), B, T, D);
  return out.view(x_in.sizes());
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
  m.def("block(Tensor x, Tensor[] p, Tensor[] onednn, int onednn_from_rows, Tensor att_shift, Tensor wkv, Tensor ffn_shift, Tensor(a!) new_att_shift, "
        "Tensor(b!) new_wkv, Tensor(c!) new_ffn_shift, float scale) -> Tensor", &block);
  m.def("peak_gflops(int iterations) -> float", &peak_gflops);
}
