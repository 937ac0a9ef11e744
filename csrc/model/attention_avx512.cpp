// Attention hot loops with AVX-512 F/BW/VL (compiled with those flags only).
// Jobs of 5+ rows (8-32 queries) run the rows-in-lanes path (seg_lanes_*,
// to_lanes / from_lanes / merge_lanes; docs/architecture.md "Attention"):
// Q transposed once per unit, K / V elements broadcast against 16-row
// vectors. Decoding (R <= 4) keeps the row-major softmax_tile and pv here, 16
// lanes wide with masked tails, and AVX2's qk_direct: attention.cpp fills
// every entry this table leaves null from kAttnAvx2.
// GCC 12 warns "__Y is used uninitialized" inside its own AVX-512 intrinsics
// (GCC bug 105593); nothing of ours is uninitialized.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "kernels/simd512.h"  // intrinsics, or SIMDe in tests/simde/attention_harness.cpp

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "model/attention.h"
#include "model/row_blocks.h"

namespace bitdlm {
namespace avx512 {

static inline int round8(int n) { return (n + 7) & ~7; }
static inline __mmask16 tail_mask(int n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

static inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
static inline __m512 load16(const uint16_t* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

// exp for x <= 0: the same range reduction and polynomial as avx2::exp_neg
// (simd_avx2.h), bit for bit: lanes below -60 are 0 (so AVX2's clamp at -88
// is not needed: -inf's NaN is masked too), and 2^n (n >= -87 elsewhere) is
// applied by vscalefps, exact as AVX2's multiply by the exponent bits.
static inline __m512 exp_neg(__m512 x) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-60.0f), _CMP_LT_OQ);
  const __m512 fx = _mm512_floor_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)));
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_scalef_ps((__mmask16)~tiny, y, fx);
}

// Decoding (R <= 4 rows): the online softmax and values row-major, 16 lanes wide.
static void softmax_tile(float* S, int64_t lds, int R, int n, float* m, float* l, float* O, int d) {
  for (int r = 0; r < R; ++r) {
    float* s = S + r * lds;
    __m512 vm = _mm512_set1_ps(m[r]);
    for (int j = 0; j < n; j += 16) {
      const __mmask16 k = tail_mask(n - j);
      vm = _mm512_mask_max_ps(vm, k, vm, _mm512_maskz_loadu_ps(k, s + j));
    }
    const float mx = _mm512_reduce_max_ps(vm);
    const float alpha = m[r] == -INFINITY ? 0.f : std::exp(m[r] - mx);
    const __m512 vmx = _mm512_set1_ps(mx);
    __m512 vs = _mm512_setzero_ps();
    for (int j = 0; j < n; j += 16) {
      const __mmask16 k = tail_mask(n - j);
      const __m512 e = exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), vmx));
      _mm512_mask_storeu_ps(s + j, k, e);
      vs = _mm512_mask_add_ps(vs, k, vs, e);
    }
    l[r] = l[r] * alpha + _mm512_reduce_add_ps(vs);
    m[r] = mx;
    if (alpha != 1.f) {
      float* o = O + (int64_t)r * d;
      const __m512 va = _mm512_set1_ps(alpha);
      for (int i = 0; i < d; i += 16) {
        const __mmask16 k = tail_mask(d - i);
        _mm512_mask_storeu_ps(o + i, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, o + i), va));
      }
    }
  }
}

// O[r][0..16*NV) += sum_j P[r][j] V[j][..] for RT rows; the last vector masked by `last`.
template <int RT, int NV, class T>
static inline void pv_tile(const float* P, int64_t ldp, const T* V, int64_t ldv, int nk, int d, float* O,
                           __mmask16 last) {
  __m512 acc[RT][NV];
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_maskz_loadu_ps(c == NV - 1 ? last : 0xFFFF, O + (int64_t)r * d + 16 * c);
  for (int j = 0; j < nk; ++j) {
    __m512 vv[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) vv[c] = load16(V + j * ldv + 16 * c, c == NV - 1 ? last : 0xFFFF);
#pragma GCC unroll 4
    for (int r = 0; r < RT; ++r) {
      const __m512 pb = _mm512_set1_ps(P[r * ldp + j]);
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_fmadd_ps(pb, vv[c], acc[r][c]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c)
      _mm512_mask_storeu_ps(O + (int64_t)r * d + 16 * c, c == NV - 1 ? last : 0xFFFF, acc[r][c]);
}

template <int RT, class T>
static inline void pv_rows(const float* P, int64_t ldp, const T* V, int64_t ldv, int nk, int d, float* O) {
  int i = 0;
  for (; i + 64 <= d; i += 64) pv_tile<RT, 4, T>(P, ldp, V + i, ldv, nk, d, O + i, 0xFFFF);
  for (; i < d; i += 16) pv_tile<RT, 1, T>(P, ldp, V + i, ldv, nk, d, O + i, tail_mask(d - i));
}

template <class T>
static void pv(const float* P, int64_t ldp, int R, const T* V, int64_t ldv, int nk, int d, float* O) {
  for_row_blocks4(R, [&](auto rt, int r) {
    pv_rows<decltype(rt)::value, T>(P + r * ldp, ldp, V, ldv, nk, d, O + (int64_t)r * d);
  });
}

// ---- Rows in lanes (seg_lanes_*): the tiled path of 5+ rows ----
// Rows (query x head) sit in the lanes of NV vectors, keys and dims in
// broadcasts from fp32 rows, so neither K nor Q is transposed per tile (Q once
// per unit, in attention.cpp), each K/V row is read once per 16*NV rows, and
// the softmax of a key tile runs across rows with no horizontal reductions.
// Register tiles of 16 accumulators: per step NV row-vector loads and 16/NV
// broadcasts (fused into the FMAs) for 16 FMAs.

// ST[j * Rp + 16 c] = scale * sum_i K[j][i] QT[i * Rp + 16 c], keys j < J, vectors c < NV;
// mx[c] = max(mx[c], those scores)
template <int NV, int J>
static inline void qk_lanes_blk(const float* QT, int Rp, const float* K, int64_t ldk, int d, float scale, float* ST,
                                __m512 (&mx)[NV]) {
  __m512 acc[J][NV];
#pragma GCC unroll 16
  for (int j = 0; j < J; ++j)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[j][c] = _mm512_setzero_ps();
  for (int i = 0; i < d; ++i) {
    __m512 qv[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) qv[c] = _mm512_loadu_ps(QT + (int64_t)i * Rp + 16 * c);
#pragma GCC unroll 16
    for (int j = 0; j < J; ++j) {
      const __m512 kb = _mm512_set1_ps(K[j * ldk + i]);
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[j][c] = _mm512_fmadd_ps(kb, qv[c], acc[j][c]);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
#pragma GCC unroll 16
  for (int j = 0; j < J; ++j)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) {
      const __m512 x = _mm512_mul_ps(acc[j][c], sc);
      _mm512_storeu_ps(ST + (int64_t)j * Rp + 16 * c, x);
      mx[c] = _mm512_max_ps(mx[c], x);
    }
}

// OT[i * Rp + 16 c] += sum_j V[j][i] PT[j * Rp + 16 c], dims i < I, vectors c < NV; OT
// read only in the `live` lanes (0 elsewhere: rows that start here)
template <int NV, int I>
static inline void pv_lanes_blk(const float* PT, int Rp, const float* V, int64_t ldv, int nk, float* OT,
                                const __mmask16 (&live)[NV]) {
  __m512 acc[I][NV];
#pragma GCC unroll 16
  for (int i = 0; i < I; ++i)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[i][c] = _mm512_maskz_loadu_ps(live[c], OT + (int64_t)i * Rp + 16 * c);
  for (int j = 0; j < nk; ++j) {
    __m512 pv[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) pv[c] = _mm512_loadu_ps(PT + (int64_t)j * Rp + 16 * c);
#pragma GCC unroll 16
    for (int i = 0; i < I; ++i) {
      const __m512 vb = _mm512_set1_ps(V[j * ldv + i]);
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[i][c] = _mm512_fmadd_ps(vb, pv[c], acc[i][c]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < I; ++i)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(OT + (int64_t)i * Rp + 16 * c, acc[i][c]);
}

// X[j][i0, i0 + w) as fp32 -> Xf[j * w ..] (w <= d - i0), j < nk; fp16 rows at stride ld
static inline void cols_f32(const uint16_t* X, int64_t ld, int nk, int i0, int w, float* Xf) {
  const int w16 = w & ~15;
  for (int j = 0; j < nk; ++j) {
    const uint16_t* x = X + j * ld + i0;
    float* y = Xf + (int64_t)j * w;
    for (int i = 0; i < w16; i += 16)
      _mm512_storeu_ps(y + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i))));
    if (w16 < w) {
      const __mmask16 k = tail_mask(w - w16);
      _mm512_mask_storeu_ps(y + w16, k, load16(x + w16, k));
    }
  }
}

// Key rows of a tile as the kernels read them: fp32 in place, or fp16
// converted block by block into `buf` just before use (a few KB that stay in
// L1; converting a whole tile first spilled QT / OT out of L1).
template <class T>
static inline const float* key_rows(const T* K, int64_t ld, int j, int n, int d, float* buf, int64_t& ldk) {
  if constexpr (sizeof(T) == 2) {
    cols_f32(K + j * ld, ld, n, 0, d, buf);
    ldk = d;
    return buf;
  } else {
    ldk = ld;
    return K + j * ld;
  }
}

// Scores and online softmax of one key tile (nk <= kAttnTile keys at stride ld)
// for the NV row vectors at QT / m / l / OT / ST (lane offset applied by the
// caller); ST is left holding P = exp(S - m').
// Prefetch of n rows (row bytes rb) at stride ld elements: locality 3 = L1, 2 = L2.
template <int Loc, class T>
static inline void prefetch_rows(const T* X, int64_t ld, int n, int rb) {
  for (int j = 0; j < n; ++j)
    for (int b = 0; b < rb; b += 64) __builtin_prefetch(reinterpret_cast<const char*>(X + j * ld) + b, 0, Loc);
}

// fp16 K: while a block of B keys is multiplied, the next block's K rows are
// fetched into L1 and this block's V rows into L2 (for pv_lanes after it): the
// ~1000 cycles of FMAs per block hide the L2 / DRAM latency that the block by
// block conversion would otherwise wait on.
template <int NV, class T>
static void qk_softmax_lanes(const float* QT, int Rp, const T* K, const T* V, int64_t ld, int nk, int d, float scale,
                             float* m, float* l, float* OT, float* ST, float* buf, __mmask16 (&live)[NV]) {
  constexpr int B = 16 / NV;  // keys per register tile
  __m512 mx[NV];
#pragma GCC unroll 4
  for (int c = 0; c < NV; ++c) mx[c] = _mm512_loadu_ps(m + 16 * c);
  int j = 0;
  int64_t ldk = 0;
  for (; j + B <= nk; j += B) {
    const float* kr = key_rows(K, ld, j, B, d, buf, ldk);
    if constexpr (sizeof(T) == 2) {
      prefetch_rows<3>(K + (j + B) * ld, ld, B, d * 2);  // past nk: the next tile's (harmless at the segment's end)
      prefetch_rows<2>(V + j * ld, ld, B, d * 2);
    }
    qk_lanes_blk<NV, B>(QT, Rp, kr, ldk, d, scale, ST + (int64_t)j * Rp, mx);
  }
  for (; j < nk; ++j) {
    const float* kr = key_rows(K, ld, j, 1, d, buf, ldk);
    qk_lanes_blk<NV, 1>(QT, Rp, kr, ldk, d, scale, ST + (int64_t)j * Rp, mx);
  }
  for (int c = 0; c < NV; ++c) {
    // e^(m - m'): 0 where m = -inf (exp_neg is 0 below -60)
    const __m512 m0 = _mm512_loadu_ps(m + 16 * c);
    live[c] = _mm512_cmp_ps_mask(m0, _mm512_set1_ps(-INFINITY), _CMP_NEQ_UQ);  // rows with an output so far
    const __m512 alpha = exp_neg(_mm512_sub_ps(m0, mx[c]));
    __m512 sum = _mm512_setzero_ps();
    for (int jj = 0; jj < nk; ++jj) {
      float* s = ST + (int64_t)jj * Rp + 16 * c;
      const __m512 e = exp_neg(_mm512_sub_ps(_mm512_loadu_ps(s), mx[c]));
      _mm512_storeu_ps(s, e);
      sum = _mm512_add_ps(sum, e);
    }
    _mm512_storeu_ps(l + 16 * c, _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(l + 16 * c), alpha), sum));
    _mm512_storeu_ps(m + 16 * c, mx[c]);
    // the max of a row with an output so far moved (rows starting here: OT unread)
    if (_mm512_cmp_ps_mask(alpha, _mm512_set1_ps(1.f), _CMP_NEQ_UQ) & live[c])
      for (int i = 0; i < d; ++i) {
        float* o = OT + (int64_t)i * Rp + 16 * c;
        _mm512_storeu_ps(o, _mm512_mul_ps(_mm512_loadu_ps(o), alpha));
      }
  }
}

// Values of one key tile: OT += V^T P for the NV row vectors; fp16 V in strips
// of kStrip dims x nk keys converted into `buf` before use.
constexpr int kStrip = 32;
template <int NV, class T>
static void pv_lanes(const float* PT, int Rp, const T* V, int64_t ld, int nk, int d, float* OT, float* buf,
                     const __mmask16 (&live)[NV]) {
  constexpr int B = 16 / NV;  // dims per register tile
  for (int i0 = 0; i0 < d; i0 += kStrip) {
    const int w = std::min(kStrip, d - i0);
    const float* Vf;
    int64_t ldv;
    if constexpr (sizeof(T) == 2) {
      cols_f32(V, ld, nk, i0, w, buf);
      Vf = buf, ldv = w;
    } else {
      Vf = V + i0, ldv = ld;
    }
    float* o = OT + (int64_t)i0 * Rp;
    int i = 0;
    for (; i + B <= w; i += B) pv_lanes_blk<NV, B>(PT, Rp, Vf + i, ldv, nk, o + (int64_t)i * Rp, live);
    for (; i < w; ++i) pv_lanes_blk<NV, 1>(PT, Rp, Vf + i, ldv, nk, o + (int64_t)i * Rp, live);
  }
}

// f(nv_constant, c0) for the row vectors in chunks of up to 4 (64 rows)
template <class F>
static inline void for_lane_chunks(int Rp, F&& f) {
  for (int c0 = 0; c0 < Rp; c0 += 64) switch (std::min(Rp - c0, 64) / 16) {
      case 4: f(std::integral_constant<int, 4>{}, c0); break;
      case 3: f(std::integral_constant<int, 3>{}, c0); break;
      case 2: f(std::integral_constant<int, 2>{}, c0); break;
      default: f(std::integral_constant<int, 1>{}, c0); break;
    }
}

// Key tile by key tile, row chunk by row chunk: scores + softmax, then values.
// `tile` holds the converted fp16 blocks (at most kAttnTile * min(d, kStrip)
// or 16 * d floats).
template <class T>
static void seg_lanes(const float* QT, int Rp, const T* K, const T* V, int64_t ld, int nk, int d, float scale,
                      float* m, float* l, float* OT, float* ST, float* tile) {
  for (int j0 = 0; j0 < nk; j0 += kAttnTile) {
    const int jt = std::min(kAttnTile, nk - j0);
    for_lane_chunks(Rp, [&](auto nv, int c0) {
      constexpr int NV = decltype(nv)::value;
      __mmask16 live[NV];
      qk_softmax_lanes<NV, T>(QT + c0, Rp, K + j0 * ld, V + j0 * ld, ld, jt, d, scale, m + c0, l + c0, OT + c0, ST + c0,
                              tile, live);
      pv_lanes<NV, T>(ST + c0, Rp, V + j0 * ld, ld, jt, d, OT + c0, tile, live);
    });
  }
}

// 16 x 16 transpose in registers: v[t] lane u becomes v[u] lane t.
static inline void transpose16(__m512 (&v)[16]) {
  __m512 t[16];
#pragma GCC unroll 8
  for (int k = 0; k < 8; ++k)
    t[2 * k] = _mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), t[2 * k + 1] = _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]);
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {  // v[4k + c], 128-bit lane L: rows 4k..4k+3 of column 4L + c
    v[4 * k] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], 0x44);
    v[4 * k + 1] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], 0xEE);
    v[4 * k + 2] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0x44);
    v[4 * k + 3] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0xEE);
  }
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm512_shuffle_f32x4(v[c], v[4 + c], 0x88), t[4 + c] = _mm512_shuffle_f32x4(v[c], v[4 + c], 0xDD);
    t[8 + c] = _mm512_shuffle_f32x4(v[8 + c], v[12 + c], 0x88), t[12 + c] = _mm512_shuffle_f32x4(v[8 + c], v[12 + c], 0xDD);
  }
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    v[c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0x88), v[8 + c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0xDD);
    v[4 + c] = _mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0x88), v[12 + c] = _mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0xDD);
  }
}

static inline const float* row_of(const float* X, int64_t ldx, int group, int d, int r) {
  return X + (int64_t)(r / group) * ldx + (int64_t)(r % group) * d;
}

static void to_lanes(const float* X, int64_t ldx, int group, int R, int d, float* XT, int Rp) {
  for (int r0 = 0; r0 < Rp; r0 += 16)
    for (int i0 = 0; i0 < d; i0 += 16) {
      const __mmask16 mk = tail_mask(d - i0);
      __m512 v[16];
#pragma GCC unroll 16
      for (int t = 0; t < 16; ++t)
        v[t] = r0 + t < R ? _mm512_maskz_loadu_ps(mk, row_of(X, ldx, group, d, r0 + t) + i0) : _mm512_setzero_ps();
      transpose16(v);
      for (int t = 0; t < 16 && i0 + t < d; ++t) _mm512_storeu_ps(XT + (int64_t)(i0 + t) * Rp + r0, v[t]);
    }
}

static void from_lanes(const float* XT, int Rp, int R, int d, const float* sc, float* X, int64_t ldx, int group) {
  for (int r0 = 0; r0 < R; r0 += 16)
    for (int i0 = 0; i0 < d; i0 += 16) {
      const __mmask16 mk = tail_mask(d - i0);
      __m512 v[16];
#pragma GCC unroll 16
      for (int t = 0; t < 16; ++t)
        v[t] = i0 + t < d ? _mm512_loadu_ps(XT + (int64_t)(i0 + t) * Rp + r0) : _mm512_setzero_ps();
      transpose16(v);
      for (int t = 0; t < 16 && r0 + t < R; ++t) {
        const __m512 x = sc ? _mm512_mul_ps(v[t], _mm512_set1_ps(sc[r0 + t])) : v[t];
        _mm512_mask_storeu_ps(const_cast<float*>(row_of(X, ldx, group, d, r0 + t)) + i0, mk, x);
      }
    }
}

static void merge_lanes(const float* parts, int64_t slot_size, int n, int Rp, int d, float* OT, float* inv_l) {
  for (int c = 0; c < Rp; c += 16) {
    const float* mp = parts + (int64_t)Rp * d + c;  // m of slot s at mp + s * slot_size, l at + Rp
    __m512 M = _mm512_set1_ps(-INFINITY);
    for (int s = 0; s < n; ++s) M = _mm512_max_ps(M, _mm512_loadu_ps(mp + s * slot_size));
    __m512 L = _mm512_setzero_ps();
    for (int s = 0; s < n; ++s) {
      const __m512 ms = _mm512_loadu_ps(mp + s * slot_size);
      const __m512 w = exp_neg(_mm512_sub_ps(ms, M));  // 0 where m_s = -inf
      // rows a slot never saw a key for (m_s = -inf) add nothing: their OT is unread (seg_lanes_*)
      const __mmask16 seen = _mm512_cmp_ps_mask(ms, _mm512_set1_ps(-INFINITY), _CMP_NEQ_UQ);
      L = _mm512_fmadd_ps(w, _mm512_loadu_ps(mp + s * slot_size + Rp), L);
      const float* po = parts + s * slot_size + c;
      for (int i = 0; i < d; ++i) {
        float* o = OT + (int64_t)i * Rp + c;
        const __m512 p = _mm512_loadu_ps(po + (int64_t)i * Rp);
        const __m512 oo = _mm512_loadu_ps(o);
        _mm512_storeu_ps(o, s == 0 ? _mm512_maskz_mul_ps(seen, w, p) : _mm512_mask_blend_ps(seen, oo, _mm512_fmadd_ps(w, p, oo)));
      }
    }
    _mm512_storeu_ps(inv_l + c, _mm512_div_ps(_mm512_set1_ps(1.f), L));
  }
}

}  // namespace avx512

// Null entries are AVX2's (filled by the IsaTable in attention.cpp).
extern const AttnKernels kAttnAvx512Own = {nullptr,  // k_tile_f32: AVX2 8x8 transposes
                                           nullptr,  // k_tile_f16
                                           nullptr,  // v_tile_f16
                                           nullptr,  // qk: the lanes path below replaced the row-major scores
                                           nullptr,  // qk_direct_f32 (decode): AVX2's, whose summation order
                                           nullptr,  // qk_direct_f16  test_isa_forward's cross-ISA logits rely on
                                           &avx512::softmax_tile,
                                           &avx512::pv<float>,
                                           &avx512::pv<uint16_t>,
                                           nullptr,  // to_f16
                                           &avx512::seg_lanes<float>,
                                           &avx512::seg_lanes<uint16_t>,
                                           &avx512::to_lanes,
                                           &avx512::from_lanes,
                                           &avx512::merge_lanes};
}  // namespace bitdlm
