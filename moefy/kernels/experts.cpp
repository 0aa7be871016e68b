// moefy CPU kernels: run only the selected experts of an MoEFFN, reading only their bytes.
//
// Compiled on first use by moefy/kernels/__init__.py (g++ -O3 -march=native -fopenmp) and
// called through ctypes with raw pointers of contiguous fp32 tensors; torch stays the owner of
// all memory. Shapes (as in moe_layer.py): T tokens, D hidden, E experts of n neurons,
// S shared neurons, K experts per token, H router hidden width.
//
// Routed experts are given per token in CSR form: token t uses experts[off[t] .. off[t+1]).
// The work is expert-major, so each selected expert's rows are read once per call however many
// tokens chose it: phase 1 computes the hidden activations of every (token, expert) pair, phase
// 2 accumulates the down projection token by token.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

enum Act { SILU = 0, RELU = 1, GELU = 2, GELU_TANH = 3 };

inline float activate(float v, int act) {
  switch (act) {
    case SILU: return v / (1.0f + std::exp(-v));
    case RELU: return v > 0.0f ? v : 0.0f;
    case GELU: return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f));
    default: {
      const float c = 0.7978845608028654f;  // sqrt(2 / pi)
      return 0.5f * v * (1.0f + std::tanh(c * (v + 0.044715f * v * v * v)));
    }
  }
}

#if defined(__AVX2__) && defined(__FMA__)
inline float hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
#endif

// out[j] = <x, w[j]> for j < R: one pass over x feeds R independent accumulators, so the loop
// runs at load throughput instead of waiting on one FMA chain.
template <int R>
inline void dots(const float* __restrict x, const float* const* w, int64_t D, float* out) {
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc[R];
  for (int j = 0; j < R; ++j) acc[j] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= D; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    for (int j = 0; j < R; ++j) acc[j] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w[j] + i), acc[j]);
  }
  for (int j = 0; j < R; ++j) {
    float v = hsum(acc[j]);
    for (int64_t k = i; k < D; ++k) v += x[k] * w[j][k];
    out[j] = v;
  }
#else
  for (int j = 0; j < R; ++j) {
    float v = 0.0f;
    for (int64_t k = 0; k < D; ++k) v += x[k] * w[j][k];
    out[j] = v;
  }
#endif
}

// Two tokens against the same R rows: each row chunk loaded once feeds both tokens.
template <int R>
inline void dots2(const float* __restrict x0, const float* __restrict x1, const float* const* w, int64_t D,
                  float* out0, float* out1) {
#if defined(__AVX2__) && defined(__FMA__)
  __m256 a0[R], a1[R];
  for (int j = 0; j < R; ++j) a0[j] = a1[j] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= D; i += 8) {
    const __m256 u = _mm256_loadu_ps(x0 + i), v = _mm256_loadu_ps(x1 + i);
    for (int j = 0; j < R; ++j) {
      const __m256 wv = _mm256_loadu_ps(w[j] + i);
      a0[j] = _mm256_fmadd_ps(u, wv, a0[j]);
      a1[j] = _mm256_fmadd_ps(v, wv, a1[j]);
    }
  }
  for (int j = 0; j < R; ++j) {
    out0[j] = hsum(a0[j]);
    out1[j] = hsum(a1[j]);
    for (int64_t k = i; k < D; ++k) {
      out0[j] += x0[k] * w[j][k];
      out1[j] += x1[k] * w[j][k];
    }
  }
#else
  dots<R>(x0, w, D, out0);
  dots<R>(x1, w, D, out1);
#endif
}

// out[j] = <x, w + j*D> for `rows` consecutive rows, eight at a time.
inline void dot_rows(const float* x, const float* w, int64_t rows, int64_t D, float* out) {
  const float* p[8];
  int64_t r = 0;
  for (; r + 8 <= rows; r += 8) {
    for (int j = 0; j < 8; ++j) p[j] = w + (r + j) * D;
    dots<8>(x, p, D, out + r);
  }
  for (; r < rows; ++r) {
    p[0] = w + r * D;
    dots<1>(x, p, D, out + r);
  }
}

// Hidden activations of `rows` consecutive neurons for one token: h[r] = act(w_in[r].x + b[r]) * (w_up[r].x).
// Gate and up rows are read in the same pass (4 + 4 rows per sweep of x).
inline void hidden_rows(const float* x, const float* w_in, const float* w_up, const float* b_in,
                        int64_t rows, int64_t D, int act, float* h) {
  float g[8];
  const float* p[8];
  for (int64_t r0 = 0; r0 < rows; r0 += w_up ? 4 : 8) {
    const int64_t m = std::min<int64_t>(w_up ? 4 : 8, rows - r0);
    if (w_up && m == 4) {
      for (int j = 0; j < 4; ++j) {
        p[j] = w_in + (r0 + j) * D;
        p[4 + j] = w_up + (r0 + j) * D;
      }
      dots<8>(x, p, D, g);
    } else if (!w_up && m == 8) {
      for (int j = 0; j < 8; ++j) p[j] = w_in + (r0 + j) * D;
      dots<8>(x, p, D, g);
    } else {
      dot_rows(x, w_in + r0 * D, m, D, g);
      if (w_up) dot_rows(x, w_up + r0 * D, m, D, g + 4);
    }
    for (int64_t j = 0; j < m; ++j) {
      float v = g[j] + (b_in ? b_in[r0 + j] : 0.0f);
      h[r0 + j] = activate(v, act) * (w_up ? g[4 + j] : 1.0f);
    }
  }
}

// hidden_rows for two tokens at once (rows a multiple of 4): gate then up, 2 tokens x 4 rows.
inline void hidden_rows2(const float* x0, const float* x1, const float* w_in, const float* w_up,
                         const float* b_in, int64_t rows, int64_t D, int act, float* h0, float* h1) {
  float g0[4], g1[4], u0[4] = {1, 1, 1, 1}, u1[4] = {1, 1, 1, 1};
  const float* p[4];
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {
    for (int j = 0; j < 4; ++j) p[j] = w_in + (r0 + j) * D;
    dots2<4>(x0, x1, p, D, g0, g1);
    if (w_up) {
      for (int j = 0; j < 4; ++j) p[j] = w_up + (r0 + j) * D;
      dots2<4>(x0, x1, p, D, u0, u1);
    }
    for (int j = 0; j < 4; ++j) {
      const float b = b_in ? b_in[r0 + j] : 0.0f;
      h0[r0 + j] = activate(g0[j] + b, act) * u0[j];
      h1[r0 + j] = activate(g1[j] + b, act) * u1[j];
    }
  }
}

// y[lo:hi] += sum_r h[r] * w[r, lo:hi] for `rows` consecutive rows, four at a time.
inline void axpy_rows(const float* h, const float* w, int64_t rows, int64_t D, int64_t lo, int64_t hi,
                      float* __restrict y) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    const float *a = w + r * D, *b = a + D, *c = b + D, *d = c + D;
    const float ha = h[r], hb = h[r + 1], hc = h[r + 2], hd = h[r + 3];
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) y[i] += ha * a[i] + hb * b[i] + hc * c[i] + hd * d[i];
  }
  for (; r < rows; ++r) {
    const float* a = w + r * D;
    const float ha = h[r];
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) y[i] += ha * a[i];
  }
}

// y[lo:hi] = sum_j h[j] * rows[j][lo:hi], 64 columns at a time held in registers.
inline void down_rows(const float* h, const float* const* rows, int64_t count, int64_t lo, int64_t hi,
                      float* __restrict y) {
  int64_t c = lo;
#if defined(__AVX2__) && defined(__FMA__)
  for (; c + 64 <= hi; c += 64) {
    __m256 acc[8];
    for (int q = 0; q < 8; ++q) acc[q] = _mm256_setzero_ps();
    for (int64_t j = 0; j < count; ++j) {
      const __m256 hv = _mm256_set1_ps(h[j]);
      const float* r = rows[j] + c;
      for (int q = 0; q < 8; ++q) acc[q] = _mm256_fmadd_ps(hv, _mm256_loadu_ps(r + 8 * q), acc[q]);
    }
    for (int q = 0; q < 8; ++q) _mm256_storeu_ps(y + c + 8 * q, acc[q]);
  }
#endif
  for (; c < hi; ++c) {
    float v = 0.0f;
    for (int64_t j = 0; j < count; ++j) v += h[j] * rows[j][c];
    y[c] = v;
  }
}


// y[lo:hi] += sum_j v[j] * rows[j][lo:hi] for gathered rows, four at a time: each row read front
// to back (a stream the hardware prefetcher follows) into a y that stays in L1.
inline void axpy_gathered(const float* v, const float* const* rows, int64_t count, int64_t lo, int64_t hi,
                          float* __restrict y) {
  int64_t j = 0;
  for (; j + 4 <= count; j += 4) {
    const float *a = rows[j], *b = rows[j + 1], *c = rows[j + 2], *d = rows[j + 3];
    const float va = v[j], vb = v[j + 1], vc = v[j + 2], vd = v[j + 3];
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) y[i] += va * a[i] + vb * b[i] + vc * c[i] + vd * d[i];
  }
  for (; j < count; ++j) {
    const float* a = rows[j];
    const float va = v[j];
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) y[i] += va * a[i];
  }
}

// <q4 rows, int8 x> for a neuron's gate and up rows at once (up may be null): G groups of 32, see
// moefy_q4_hidden. The codes stay unsigned (q + 8): sum_k (q_k + 8) x_k - 8 sum_k x_k per group, the
// second term exact in integers, spread over the group's 8 int32 lanes as xneg[j] = -sum_k x_k each,
// so a group is one maddubs (AVX2) or half a dpbusd (AVX512-VNNI) and one scaled FMA.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
inline __m512 q4_pair(const uint8_t* q, const float* s, __m512i xv, __m512i init, __m512 sxv, __m512i lanes,
                      __m512 acc) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  const __m256i lo = _mm256_and_si256(b, low), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
  __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);  // lo_j lo_j+1 hi_j hi_j+1
  w = _mm512_shuffle_i64x2(w, w, _MM_SHUFFLE(3, 1, 2, 0));           // lo_j hi_j lo_j+1 hi_j+1
  const __m512i dp = _mm512_dpbusd_epi32(init, w, xv);
  const __m128 s2 = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(s)));
  const __m512 scale = _mm512_mul_ps(_mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(s2)), sxv);
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), scale, acc);
}
#endif

inline void q4_dot2(const uint8_t* qa, const float* sa, const uint8_t* qb, const float* sb, const int8_t* x,
                    const float* sx, const int32_t* xneg, int64_t G, float* out) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
  if ((G & 1) == 0) {
    const __m512i lanes = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
    for (int64_t j = 0; j < G; j += 2) {
      const __m512i xv = _mm512_loadu_si512(x + 32 * j);
      const __m128 sx2 = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(sx + j)));
      const __m512 sxv = _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(sx2));
      const __m512i init = _mm512_permutexvar_epi32(
          lanes, _mm512_castsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(xneg + j))));
      a = q4_pair(qa + 16 * j, sa + j, xv, init, sxv, lanes, a);
      if (qb) b = q4_pair(qb + 16 * j, sb + j, xv, init, sxv, lanes, b);
    }
    out[0] = _mm512_reduce_add_ps(a);
    out[1] = qb ? _mm512_reduce_add_ps(b) : 0.0f;
    return;
  }
#endif
#if defined(__AVX2__) && defined(__FMA__)
  const __m128i low = _mm_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
  for (int64_t j = 0; j < G; ++j) {
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32 * j));
    const __m256i off = _mm256_set1_epi32(xneg[j]);
    const __m128i ba = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qa + 16 * j));
    const __m256i wa = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(ba, 4), low), _mm_and_si128(ba, low));
    const __m256 pa = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(wa, xv), ones), off));
    if (j & 1) a1 = _mm256_fmadd_ps(pa, _mm256_set1_ps(sa[j] * sx[j]), a1);
    else a0 = _mm256_fmadd_ps(pa, _mm256_set1_ps(sa[j] * sx[j]), a0);
    if (qb) {
      const __m128i bb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + 16 * j));
      const __m256i wb = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bb, 4), low), _mm_and_si128(bb, low));
      const __m256 pb = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(wb, xv), ones), off));
      if (j & 1) b1 = _mm256_fmadd_ps(pb, _mm256_set1_ps(sb[j] * sx[j]), b1);
      else b0 = _mm256_fmadd_ps(pb, _mm256_set1_ps(sb[j] * sx[j]), b0);
    }
  }
  out[0] = hsum(_mm256_add_ps(a0, a1));
  out[1] = qb ? hsum(_mm256_add_ps(b0, b1)) : 0.0f;
#else
  for (int r = 0; r < 2; ++r) {
    const uint8_t* q = r ? qb : qa;
    const float* s = r ? sb : sa;
    float acc = 0.0f;
    if (q) {
      for (int64_t j = 0; j < G; ++j) {
        int32_t sum = 8 * xneg[j];
        for (int k = 0; k < 16; ++k) {
          const uint8_t b = q[16 * j + k];
          sum += (int32_t)(b & 0x0F) * x[32 * j + k] + (int32_t)(b >> 4) * x[32 * j + 16 + k];
        }
        acc += (float)sum * s[j] * sx[j];
      }
    }
    out[r] = acc;
  }
#endif
}

}  // namespace

extern "C" {

// y[T, D] = routed experts + shared neurons (S may be 0); y is overwritten. Token t uses
// experts[off[t] .. off[t+1]), or with off null the fixed K experts experts[t*K .. (t+1)*K).
// w_up / b_in / s_up / s_b may be null. threads: how many OpenMP threads to use.
void moefy_experts(int64_t T, int64_t D, int64_t n, const float* x, const int64_t* off_in, int64_t K,
                   const int64_t* experts, const float* w_in, const float* w_up, const float* b_in,
                   const float* w_out, int64_t S, const float* s_in, const float* s_up, const float* s_b,
                   const float* s_out, int act, float* y, int threads) {
  std::vector<int64_t> fixed;
  if (!off_in) {
    fixed.resize(T + 1);
    for (int64_t t = 0; t <= T; ++t) fixed[t] = t * K;
  }
  const int64_t* off = off_in ? off_in : fixed.data();
  const int64_t pairs = off[T];
  const int64_t E_row = n * D;
  // Counting sort of (token, expert) pairs by expert: which pairs each used expert serves.
  int64_t E = 0;
  for (int64_t p = 0; p < pairs; ++p) E = std::max(E, experts[p] + 1);
  std::vector<int64_t> start(E + 1, 0), by_expert(pairs), pair_token(pairs);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t p = off[t]; p < off[t + 1]; ++p) pair_token[p] = t;
  for (int64_t p = 0; p < pairs; ++p) ++start[experts[p] + 1];
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t p = 0; p < pairs; ++p) by_expert[fill[experts[p]]++] = p;
  }
  std::vector<int64_t> used;
  for (int64_t e = 0; e < E; ++e)
    if (start[e + 1] > start[e]) used.push_back(e);
  const int64_t U = (int64_t)used.size();

  std::vector<float> h((size_t)pairs * n), hs((size_t)T * S);
  // Phase 1: hidden activations, expert-major (each expert's rows read once), shared rows last.
  const int64_t shared_chunks = S ? (S + 15) / 16 : 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t j = 0; j < U + shared_chunks; ++j) {
    if (j < U) {
      const int64_t e = used[j];
      const float *wi = w_in + e * E_row, *wu = w_up ? w_up + e * E_row : nullptr, *b = b_in ? b_in + e * n : nullptr;
      int64_t q = start[e];
      if (n % 4 == 0)
        for (; q + 2 <= start[e + 1]; q += 2) {
          const int64_t p0 = by_expert[q], p1 = by_expert[q + 1];
          hidden_rows2(x + pair_token[p0] * D, x + pair_token[p1] * D, wi, wu, b, n, D, act, h.data() + p0 * n,
                       h.data() + p1 * n);
        }
      for (; q < start[e + 1]; ++q) {
        const int64_t p = by_expert[q];
        hidden_rows(x + pair_token[p] * D, wi, wu, b, n, D, act, h.data() + p * n);
      }
    } else {
      const int64_t r0 = (j - U) * 16, rows = std::min<int64_t>(16, S - r0);
      std::vector<float> tmp(rows);
      for (int64_t t = 0; t < T; ++t) {
        hidden_rows(x + t * D, s_in + r0 * D, s_up ? s_up + r0 * D : nullptr, s_b ? s_b + r0 : nullptr,
                    rows, D, act, tmp.data());
        std::memcpy(hs.data() + t * S + r0, tmp.data(), rows * sizeof(float));
      }
    }
  }
  if (T == 1) {
    // Phase 2, one token: every selected row's contribution summed in registers, 64 columns at a
    // time (the hidden dimension split across threads).
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, D / 64));
    const int64_t width = ((D + parts - 1) / parts + 63) / 64 * 64;
    std::vector<const float*> rows;
    std::vector<float> hv;
    for (int64_t r = 0; r < S; ++r) {
      rows.push_back(s_out + r * D);
      hv.push_back(hs[r]);
    }
    for (int64_t p = 0; p < pairs; ++p)
      for (int64_t r = 0; r < n; ++r) {
        rows.push_back(w_out + experts[p] * E_row + r * D);
        hv.push_back(h[p * n + r]);
      }
#pragma omp parallel for schedule(static) num_threads(threads) if (parts > 1)
    for (int64_t s = 0; s < parts; ++s) {
      const int64_t lo = std::min(D, s * width), hi = std::min(D, lo + width);
      if (lo < hi) down_rows(hv.data(), rows.data(), (int64_t)rows.size(), lo, hi, y);
    }
    return;
  }
  // Phase 2, many tokens: expert-major like phase 1, so each expert's rows are read once and
  // reused for all its tokens; each thread owns a range of the hidden dimension.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, D / 64));
  const int64_t width = ((D + parts - 1) / parts + 7) / 8 * 8;
#pragma omp parallel for schedule(static) num_threads(threads) if (parts > 1)
  for (int64_t s = 0; s < parts; ++s) {
    const int64_t lo = std::min(D, s * width), hi = std::min(D, lo + width);
    if (lo >= hi) continue;
    std::vector<const float*> rows(S);
    for (int64_t r = 0; r < S; ++r) rows[r] = s_out + r * D;
    for (int64_t t = 0; t < T; ++t) {
      if (S) down_rows(hs.data() + t * S, rows.data(), S, lo, hi, y + t * D);
      else std::fill(y + t * D + lo, y + t * D + hi, 0.0f);
    }
    for (int64_t e : used)
      for (int64_t q = start[e]; q < start[e + 1]; ++q) {
        const int64_t p = by_expert[q];
        axpy_rows(h.data() + p * n, w_out + e * E_row, n, D, lo, hi, y + pair_token[p] * D);
      }
  }
}

// MLP router (fc2(gelu(fc1(x)))) and top-k per token: idx[T, K] gets each token's K experts with
// the largest logits (unordered). The output transforms of MLPRouter are monotone, so top-k of the
// logits is top-k of the scores.
void moefy_mlp_topk(int64_t T, int64_t D, int64_t H, int64_t E, int64_t K, const float* x, const float* w1,
                    const float* b1, const float* w2, const float* b2, int64_t* idx, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (T > 1)
  for (int64_t t = 0; t < T; ++t) {
    std::vector<float> z(H), logit(E);
    const float* xt = x + t * D;
    dot_rows(xt, w1, H, D, z.data());
    for (int64_t j = 0; j < H; ++j) z[j] = activate(z[j] + b1[j], GELU);
    dot_rows(z.data(), w2, E, H, logit.data());
    for (int64_t e = 0; e < E; ++e) logit[e] += b2[e];
    std::vector<int64_t> order(E);
    for (int64_t e = 0; e < E; ++e) order[e] = e;
    std::nth_element(order.begin(), order.begin() + (K - 1), order.end(),
                     [&](int64_t a, int64_t b) { return logit[a] > logit[b] || (logit[a] == logit[b] && a < b); });
    std::copy(order.begin(), order.begin() + K, idx + t * K);
  }
}

// Top-k per row of scores [T, E] into idx [T, K] (unordered).
void moefy_topk(int64_t T, int64_t E, int64_t K, const float* scores, int64_t* idx, int threads) {
#pragma omp parallel num_threads(threads) if (T > 16)
  {
    std::vector<int64_t> order(E);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      const float* s = scores + t * E;
      for (int64_t e = 0; e < E; ++e) order[e] = e;
      std::nth_element(order.begin(), order.begin() + (K - 1), order.end(),
                       [&](int64_t a, int64_t b) { return s[a] > s[b] || (s[a] == s[b] && a < b); });
      std::copy(order.begin(), order.begin() + K, idx + t * K);
    }
  }
}

// The whole layer for an MLP router with fixed top-k: route, then the selected experts.
void moefy_mlp_moe(int64_t T, int64_t D, int64_t H, int64_t E, int64_t K, const float* x, const float* w1,
                   const float* b1, const float* w2, const float* b2, int64_t n, const float* w_in,
                   const float* w_up, const float* b_in, const float* w_out, int64_t S, const float* s_in,
                   const float* s_up, const float* s_b, const float* s_out, int act, float* y, int threads) {
  std::vector<int64_t> idx(T * K);
  moefy_mlp_topk(T, D, H, E, K, x, w1, b1, w2, b2, idx.data(), threads);
  moefy_experts(T, D, n, x, nullptr, K, idx.data(), w_in, w_up, b_in, w_out, S, s_in, s_up, s_b, s_out, act, y,
                threads);
}

// The sketch router's activations from each token's kept input channels only:
// h[t, i] = act(b_in[i] + sum_j x[t, k_j] wt_in[k_j, i]) * sum_j x[t, k_j] wt_up[k_j, i], k_j = idx[t, j],
// j < c. wt_in / wt_up [D, I] are the routed neurons' weights transposed, so a kept channel is one
// contiguous row; wt_up and b_in may be null. gp / upp, when not null, receive the two sums before
// the bias and activation (for moefy_sketch_experts). Few tokens: the neurons are split across threads.
void moefy_sketch(int64_t T, int64_t D, int64_t I, int64_t c, const float* x, const int64_t* idx,
                  const float* wt_in, const float* wt_up, const float* b_in, int act, float* h, float* gp,
                  float* upp, int threads) {
  const int64_t parts = T >= threads ? 1 : threads;
#pragma omp parallel num_threads(threads) if (T * parts > 1)
  {
    std::vector<float> u(wt_up ? I : 0), v(c);
    std::vector<const float*> rows_in(c), rows_up(c);
#pragma omp for collapse(2) schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t p = 0; p < parts; ++p) {
        const int64_t lo = I * p / parts, hi = I * (p + 1) / parts;
        const int64_t* k = idx + t * c;
        for (int64_t j = 0; j < c; ++j) {
          v[j] = x[t * D + k[j]];
          rows_in[j] = wt_in + k[j] * I;
          if (wt_up) rows_up[j] = wt_up + k[j] * I;
        }
        float* g = h + t * I;
        std::fill(g + lo, g + hi, 0.0f);
        axpy_gathered(v.data(), rows_in.data(), c, lo, hi, g);
        if (gp) std::copy(g + lo, g + hi, gp + t * I + lo);
        if (wt_up) {
          std::fill(u.begin() + lo, u.begin() + hi, 0.0f);
          axpy_gathered(v.data(), rows_up.data(), c, lo, hi, u.data());
          if (upp) std::copy(u.begin() + lo, u.begin() + hi, upp + t * I + lo);
        }
        for (int64_t i = lo; i < hi; ++i)
          g[i] = activate(g[i] + (b_in ? b_in[i] : 0.0f), act) * (wt_up ? u[i] : 1.0f);
      }
    }
  }
}

// Routed experts that complete the sketch router's partial sums. The sketch summed each token's c
// kept channels (kept[t, :c]) for every routed neuron: gp, upp [T, I] hold those pre-activation
// sums (no bias). A selected neuron i adds the D - c channels left,
// g = gp[t, i] + sum_{d not kept} x[t, d] w_in[i, d] (likewise up). The channels left are summed
// as a dense dot with the kept ones zeroed: measured faster here than gathering them (AVX2
// gathers ran 1.5x slower than the full dot), so the FLOPs saved are counted, not the time.
// Pairs as in moefy_experts; no shared neurons; y[T, D] is overwritten. upp / w_up / b_in may be null.
// Sketched experts (KB > 0): token t also adds the experts extra[t, :KB] with their sketched
// activations hx[t, e * n + r] ([T, I], from moefy_sketch) through their down rows alone; with
// off_x [T + 1] (not null) a variable number, extra[off_x[t] : off_x[t + 1]] (KB is then a flag).
void moefy_sketch_experts(int64_t T, int64_t D, int64_t n, int64_t c, const float* x, const int64_t* kept,
                          const float* gp, const float* upp, int64_t I, const int64_t* off_in, int64_t K,
                          const int64_t* experts, const float* w_in, const float* w_up, const float* b_in,
                          const float* w_out, int act, float* y, int threads, int64_t KB,
                          const int64_t* extra, const float* hx, const int64_t* off_x) {
  std::vector<int64_t> fixed;
  if (!off_in) {
    fixed.resize(T + 1);
    for (int64_t t = 0; t <= T; ++t) fixed[t] = t * K;
  }
  const int64_t* off = off_in ? off_in : fixed.data();
  // Each token's input with the sketch's channels zeroed.
  std::vector<float> rest(x, x + T * D);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < c; ++j) rest[t * D + kept[t * c + j]] = 0.0f;
  // Hidden activations of every selected neuron, four neurons (gate and up rows) per sweep.
  const int64_t rows = off[T] * n;  // selected neurons over all tokens, pair-major
  std::vector<float> h(rows);
  const int64_t groups = (rows + 3) / 4;
#pragma omp parallel for schedule(static) num_threads(threads) if (groups > 16)
  for (int64_t q = 0; q < groups; ++q) {
    const float* p[8];
    float g[8];
    const int64_t r0 = q * 4, m = std::min<int64_t>(4, rows - r0);
    int64_t tok[4], neuron[4];
    for (int64_t j = 0; j < 4; ++j) {
      const int64_t r = r0 + std::min<int64_t>(j, m - 1), pair = r / n;
      tok[j] = std::upper_bound(off, off + T + 1, pair) - off - 1;
      neuron[j] = experts[pair] * n + r % n;
    }
    // Rows of different tokens read different inputs: one dots call per token present.
    for (int64_t j = 0; j < m; ++j) {
      bool done = false;
      for (int64_t k = 0; k < j; ++k) done |= tok[k] == tok[j];
      if (done) continue;
      const float* xt = rest.data() + tok[j] * D;
      for (int64_t k = 0; k < 4; ++k) {
        p[k] = w_in + neuron[k] * D;
        p[4 + k] = w_up ? w_up + neuron[k] * D : w_in + neuron[k] * D;
      }
      dots<8>(xt, p, D, g);
      for (int64_t k = 0; k < m; ++k) {
        if (tok[k] != tok[j]) continue;
        const int64_t t = tok[k], i = neuron[k];
        const float gate = g[k] + gp[t * I + i] + (b_in ? b_in[i] : 0.0f);
        h[r0 + k] = activate(gate, act) * (w_up ? g[4 + k] + upp[t * I + i] : 1.0f);
      }
    }
  }
  // Down projection, token by token (the hidden dimension split across threads for one token).
  const int64_t parts = T == 1 ? std::max<int64_t>(1, std::min<int64_t>(threads, D / 64)) : 1;
  const int64_t width = ((D + parts - 1) / parts + 63) / 64 * 64;
#pragma omp parallel num_threads(threads) if (T > 1 || parts > 1)
  {
    std::vector<const float*> down;
    std::vector<float> hv;
#pragma omp for collapse(2) schedule(static)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t s = 0; s < parts; ++s) {
        const int64_t lo = std::min(D, s * width), hi = std::min(D, lo + width);
        if (lo >= hi) continue;
        down.clear();
        for (int64_t p = off[t]; p < off[t + 1]; ++p)
          for (int64_t r = 0; r < n; ++r) down.push_back(w_out + (experts[p] * n + r) * D);
        const float* ht = h.data() + off[t] * n;
        if (KB) {  // the sketched experts' rows join the same accumulation
          hv.assign(ht, ht + down.size());
          const int64_t x0 = off_x ? off_x[t] : t * KB, x1 = off_x ? off_x[t + 1] : (t + 1) * KB;
          for (int64_t j = x0; j < x1; ++j)
            for (int64_t r = 0; r < n; ++r) {
              const int64_t i = extra[j] * n + r;
              down.push_back(w_out + i * D);
              hv.push_back(hx[t * I + i]);
            }
          ht = hv.data();
        }
        down_rows(ht, down.data(), (int64_t)down.size(), lo, hi, y + t * D);
      }
  }
}

}  // extern "C"

extern "C" {

// The whole layer for a sketch router with reuse, one-neuron experts and a fixed top-k, in one
// call (few tokens): each token's c channels of largest |x|, the sketch over every routed neuron
// (wt_in / wt_up [D, I] transposed), scores |h| x ||w_out row|| (out_norms [I]), its K best
// neurons, their completion over the channels left (moefy_sketch_experts), plus the S shared
// neurons. With KB > 0 the KB neurons ranked next add their sketched activations through their
// down rows (sketched experts). With thr (not null) the selection is by thresholds instead: a
// neuron is exact iff its score >= thr[0], sketched iff thr[1] <= score < thr[0] (K and KB are
// ignored); counts (not null) receives the exact and sketched neurons summed over the tokens.
// y[T, D] is overwritten; b_out is not added. wt_up / w_up / b_in / s_* may be null.
void moefy_sketch_moe(int64_t T, int64_t D, int64_t I, int64_t c, int64_t K, int64_t KB, const float* x,
                      const float* wt_in, const float* wt_up, const float* b_in, const float* out_norms,
                      const float* w_in, const float* w_up, const float* w_out, int64_t S, const float* s_in,
                      const float* s_up, const float* s_b, const float* s_out, int act, float* y, int threads,
                      const float* thr, int64_t* counts, int reuse) {
  if (thr) K = KB = 0;
  std::vector<int64_t> kept((size_t)T * c), chosen((size_t)T * (K + KB)), exact((size_t)T * K), extra((size_t)T * KB);
  std::vector<int64_t> off, off_x;
  std::vector<float> h((size_t)T * I), gp((size_t)T * I), upp(wt_up ? (size_t)T * I : 0), sc((size_t)T * I);
  {
    std::vector<int64_t> order(D);
    for (int64_t t = 0; t < T; ++t) {
      const float* xt = x + t * D;
      for (int64_t d = 0; d < D; ++d) order[d] = d;
      std::nth_element(order.begin(), order.begin() + (c - 1), order.end(), [&](int64_t a, int64_t b) {
        const float u = std::fabs(xt[a]), v = std::fabs(xt[b]);
        return u > v || (u == v && a < b);
      });
      std::copy(order.begin(), order.begin() + c, kept.begin() + t * c);
    }
  }
  moefy_sketch(T, D, I, c, x, kept.data(), wt_in, wt_up, b_in, act, h.data(), gp.data(),
               wt_up ? upp.data() : nullptr, threads);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < I; ++i) sc[t * I + i] = std::fabs(h[t * I + i]) * out_norms[i];
  if (thr) {  // thresholds: a variable number of exact and sketched neurons per token
    off.assign(T + 1, 0);
    off_x.assign(T + 1, 0);
    for (int64_t t = 0; t < T; ++t) {
      const float* s = sc.data() + t * I;
      for (int64_t i = 0; i < I; ++i) {
        if (s[i] >= thr[0])
          exact.push_back(i);
        else if (s[i] >= thr[1])
          extra.push_back(i);
      }
      off[t + 1] = (int64_t)exact.size();
      off_x[t + 1] = (int64_t)extra.size();
    }
    KB = extra.empty() ? 0 : 1;
  } else
    moefy_topk(T, I, K + KB, sc.data(), chosen.data(), threads);
  if (counts) {
    counts[0] = thr ? off[T] : T * K;
    counts[1] = thr ? off_x[T] : T * KB;
  }
  // The K best of each token's K + KB are computed exactly; the KB after them are sketched.
  for (int64_t t = 0; t < T && !thr; ++t) {
    int64_t* ct = chosen.data() + t * (K + KB);
    const float* s = sc.data() + t * I;
    if (KB && K > 0)
      std::nth_element(ct, ct + (K - 1), ct + K + KB,
                       [&](int64_t a, int64_t b) { return s[a] > s[b] || (s[a] == s[b] && a < b); });
    std::copy(ct, ct + K, exact.begin() + t * K);
    std::copy(ct + K, ct + K + KB, extra.begin() + t * KB);
  }
  if (!reuse) {  // the sketch read other weights (a pruned copy): the exact neurons start from 0, all channels
    std::fill(gp.begin(), gp.end(), 0.0f);
    std::fill(upp.begin(), upp.end(), 0.0f);
  }
  moefy_sketch_experts(T, D, 1, reuse ? c : 0, x, kept.data(), gp.data(), wt_up ? upp.data() : nullptr, I,
                       thr ? off.data() : nullptr, K, exact.data(), w_in, w_up, b_in, w_out, act, y, threads, KB,
                       extra.data(), h.data(), thr ? off_x.data() : nullptr);
  if (!S) return;
  // Shared neurons: activations in chunks of 16 rows across threads, then y += hs . s_out.
  std::vector<float> hs((size_t)T * S);
  const int64_t chunks = (S + 15) / 16;
#pragma omp parallel for schedule(static) num_threads(threads) if (chunks > 1)
  for (int64_t j = 0; j < chunks; ++j) {
    const int64_t r0 = j * 16, rows = std::min<int64_t>(16, S - r0);
    float tmp[16];
    for (int64_t t = 0; t < T; ++t) {
      hidden_rows(x + t * D, s_in + r0 * D, s_up ? s_up + r0 * D : nullptr, s_b ? s_b + r0 : nullptr, rows, D, act,
                  tmp);
      std::memcpy(hs.data() + t * S + r0, tmp, rows * sizeof(float));
    }
  }
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, D / 64));
  const int64_t width = ((D + parts - 1) / parts + 7) / 8 * 8;
#pragma omp parallel for schedule(static) num_threads(threads) if (parts > 1)
  for (int64_t s = 0; s < parts; ++s) {
    const int64_t lo = std::min(D, s * width), hi = std::min(D, lo + width);
    if (lo < hi)
      for (int64_t t = 0; t < T; ++t) axpy_rows(hs.data() + t * S, s_out, S, D, lo, hi, y + t * D);
  }
}

// ---------------------------------------------------------------------------------------------
// The quantised router's estimate (router_quant.py): every routed neuron's activation from a
// 4-bit copy of the gate and up rows, h[t, i] = act(b_in[i] + <x_t, g_i>) * <x_t, u_i>, where a
// row holds D / 32 groups of 16 bytes, byte k of group j = (q[32 j + k] + 8) | (q[32 j + 16 + k] + 8) << 4
// with q in [-8, 7] and the group's scale s[i, j]: w = q * s. x is quantised to int8 per group
// of 32 (scale amax / 127) once per token, so each group is one int8 dot product (AVX2 maddubs, as
// llama.cpp's Q4_0 x Q8_0); the result is an estimate used for ranking and sketched experts only.
void moefy_q4_hidden(int64_t T, int64_t D, int64_t I, const float* x, const uint8_t* q_in, const float* s_in,
                     const uint8_t* q_up, const float* s_up, const float* b_in, int act, float* h, int threads) {
  const int64_t G = D / 32;
  std::vector<int8_t> xq(T * D);
  std::vector<float> sx(T * G);
  std::vector<int32_t> xneg(T * G);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < G; ++j) {
      const float* v = x + t * D + j * 32;
      float amax = 0.0f;
      for (int k = 0; k < 32; ++k) amax = std::max(amax, std::fabs(v[k]));
      const float scale = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      sx[t * G + j] = scale;
      int32_t sum = 0;
      for (int k = 0; k < 32; ++k) {
        xq[t * D + j * 32 + k] = (int8_t)std::lrintf(v[k] * inv);
        sum += xq[t * D + j * 32 + k];
      }
      xneg[t * G + j] = -sum;  // the codes' offset of 8, spread over the group's 8 lanes
    }
  }
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2) if (T * I > 4096)
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < I; ++i) {
      float gu[2];
      q4_dot2(q_in + i * (D / 2), s_in + i * G, q_up ? q_up + i * (D / 2) : nullptr, s_up ? s_up + i * G : nullptr,
              xq.data() + t * D, sx.data() + t * G, xneg.data() + t * G, G, gu);
      const float g = activate(gu[0] + (b_in ? b_in[i] : 0.0f), act);
      h[t * I + i] = q_up ? g * gu[1] : g;
    }
  }
}

// The whole layer for the quantised router over one-neuron experts, for few tokens, in one call:
// the estimate h (moefy_q4_hidden), the scores |h_i| * norms[i], the selection (with thr =
// (t_exact, t_sketched): neurons scoring >= t_exact exactly, those in [t_sketched, t_exact)
// sketched; without: the K best exactly, the next KB sketched), the exact neurons from their fp32
// gate, up and down rows, the sketched ones as h_i times their down row. No shared neurons, no
// b_out; y [T, D] is overwritten; counts[0] / [1] receive the exact / sketched neurons summed.
void moefy_q4_moe(int64_t T, int64_t D, int64_t I, int64_t K, int64_t KB, const float* x, const uint8_t* q_in,
                  const float* s_in, const uint8_t* q_up, const float* s_up, const float* norms, const float* thr,
                  const float* w_in, const float* w_up, const float* b_in, const float* w_out, int act, float* y,
                  int64_t* counts, int threads) {
  std::vector<float> h(T * I), score(I), hv;
  std::vector<int64_t> order(I), exact, sketched;
  std::vector<const float*> down;
  moefy_q4_hidden(T, D, I, x, q_in, s_in, q_up, s_up, b_in, act, h.data(), threads);
  for (int64_t t = 0; t < T; ++t) {
    const float* ht = h.data() + t * I;
    const float* xt = x + t * D;
    for (int64_t i = 0; i < I; ++i) score[i] = std::fabs(ht[i]) * norms[i];
    exact.clear();
    sketched.clear();
    if (thr) {
      for (int64_t i = 0; i < I; ++i) {
        if (score[i] >= thr[0]) exact.push_back(i);
        else if (score[i] >= thr[1]) sketched.push_back(i);
      }
    } else {
      const int64_t k = std::min(K, I), kb = std::min(KB, I - k);
      for (int64_t i = 0; i < I; ++i) order[i] = i;
      auto better = [&](int64_t a, int64_t b) { return score[a] > score[b]; };
      std::nth_element(order.begin(), order.begin() + k, order.end(), better);
      if (kb) std::nth_element(order.begin() + k, order.begin() + k + kb, order.end(), better);
      exact.assign(order.begin(), order.begin() + k);
      sketched.assign(order.begin() + k, order.begin() + k + kb);
    }
    counts[0] += (int64_t)exact.size();
    counts[1] += (int64_t)sketched.size();
    hv.clear();
    down.clear();
    for (size_t j = 0; j < exact.size(); j += 4) {  // four neurons' gate and up rows per pass over x
      const float* p[8];
      float g[8];
      const size_t m = std::min<size_t>(4, exact.size() - j);
      for (size_t k = 0; k < 4; ++k) {
        const int64_t i = exact[j + std::min(k, m - 1)];
        p[k] = w_in + i * D;
        p[4 + k] = w_up ? w_up + i * D : w_in + i * D;
      }
      dots<8>(xt, p, D, g);
      for (size_t k = 0; k < m; ++k) {
        const int64_t i = exact[j + k];
        hv.push_back(activate(g[k] + (b_in ? b_in[i] : 0.0f), act) * (w_up ? g[4 + k] : 1.0f));
        down.push_back(w_out + i * D);
      }
    }
    for (int64_t i : sketched) {
      hv.push_back(ht[i]);
      down.push_back(w_out + i * D);
    }
    std::fill(y + t * D, y + (t + 1) * D, 0.0f);
    axpy_gathered(hv.data(), down.data(), (int64_t)down.size(), 0, D, y + t * D);
  }
}

}  // extern "C"
