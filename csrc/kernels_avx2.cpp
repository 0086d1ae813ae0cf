// AVX2 + FMA kernels (8 floats a vector). This unit alone is compiled with -mavx2 -mfma -mf16c and is
// only called after cpu_features() says the CPU and OS have them. As in kernels_avx512.cpp, nothing
// here instantiates an inline function with external linkage.
#include <immintrin.h>
#include <math.h>

#include "kernels.h"
#include "numeric.h"
#include "quant.h"

namespace qwen2rt {
namespace avx2 {

#include "kernels_portable.inc"

static inline int imin(int a, int b) { return a < b ? a : b; }

// How far ahead a decode step asks for the weights it streams from memory: the hardware prefetcher
// alone leaves a core waiting on loads (q4 decode went from 32 to 47 tok/s on a 2-core Zen with it).
constexpr size_t kPrefetchBytes = 2048;

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 load_w(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load_w(const uint16_t* p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
static inline float load_w1(const float* p) { return *p; }
static inline float load_w1(const uint16_t* p) {
    uint32_t u = uint32_t(*p) << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}

// exp(x), within 2 ulp of expf on [-87, 88]; 2^n is built in the exponent bits.
static inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(_mm256_set1_ps(-87.3f), x);
    x = _mm256_min_ps(_mm256_set1_ps(88.3f), x);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    // n in [-126, 128]: split 2^n in two factors so that neither leaves the normal range
    const __m256i ni = _mm256_cvtps_epi32(n);
    const __m256i n1 = _mm256_srai_epi32(ni, 1);
    const __m256i n2 = _mm256_sub_epi32(ni, n1);
    const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, _mm256_set1_epi32(127)), 23));
    const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, _mm256_set1_epi32(127)), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

// ---------------------------------------------------------------------------------------------
// matmul: MR x NR register tile of dot products, as in kernels_avx512.cpp; the K tail (K % 8) is
// finished in scalar code.

template <int MR, int NR, class WT>
static void matmul_tile(const float* X, int ldx, int K, const WT* W, const float* bias, float* Y, int ldy) {
    __m256 acc[MR][NR];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= K; k += 8) {
        if (MR == 1 && (k & 31) == 0)  // decode streams W from memory: ask for it ahead (q_row_group)
            for (int j = 0; j < NR; j++)
                _mm_prefetch(reinterpret_cast<const char*>(W + size_t(j) * K + k) + kPrefetchBytes, _MM_HINT_T0);
        __m256 w[NR];
        for (int j = 0; j < NR; j++) w[j] = load_w(W + size_t(j) * K + k);
        for (int i = 0; i < MR; i++) {
            const __m256 x = _mm256_loadu_ps(X + size_t(i) * ldx + k);
            for (int j = 0; j < NR; j++) acc[i][j] = _mm256_fmadd_ps(x, w[j], acc[i][j]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) {
            float s = hsum(acc[i][j]);
            for (int kk = k; kk < K; kk++) s += X[size_t(i) * ldx + kk] * load_w1(W + size_t(j) * K + kk);
            Y[size_t(i) * ldy + j] = s + (bias ? bias[j] : 0.f);
        }
}

// Decode (one token) with bf16 weights: one 32-byte load holds 16 weights. A bf16 is the top half
// of an f32, so the odd weights become floats by masking off the low halves and the even ones by a
// 16-bit shift; x is split into its even and odd elements once for all NR rows. That is one load,
// two integer ops and two FMAs per 16 weights, instead of two widening loads and two shifts.
template <int NR>
static void bf16_decode_tile(const float* x, int K, const uint16_t* W, const float* bias, float* Y) {
    __m256 even[NR], odd[NR];
    for (int j = 0; j < NR; j++) even[j] = odd[j] = _mm256_setzero_ps();
    const __m256i top = _mm256_set1_epi32(int(0xffff0000u));
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        if ((k & 31) == 0)
            for (int j = 0; j < NR; j++)
                _mm_prefetch(reinterpret_cast<const char*>(W + size_t(j) * K + k) + kPrefetchBytes, _MM_HINT_T0);
        const __m256 a = _mm256_loadu_ps(x + k), b = _mm256_loadu_ps(x + k + 8);
        // [a0 a2 b0 b2 | a4 a6 b4 b6] -> [a0 a2 a4 a6 b0 b2 b4 b6], the same for the odd elements
        const __m256 xe = _mm256_castpd_ps(
            _mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0))), 0xd8));
        const __m256 xo = _mm256_castpd_ps(
            _mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1))), 0xd8));
        for (int j = 0; j < NR; j++) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(W + size_t(j) * K + k));
            even[j] = _mm256_fmadd_ps(xe, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), even[j]);
            odd[j] = _mm256_fmadd_ps(xo, _mm256_castsi256_ps(_mm256_and_si256(v, top)), odd[j]);
        }
    }
    for (int j = 0; j < NR; j++) {
        float s = hsum(_mm256_add_ps(even[j], odd[j]));
        for (int kk = k; kk < K; kk++) s += x[kk] * load_w1(W + size_t(j) * K + kk);
        Y[j] = s + (bias ? bias[j] : 0.f);
    }
}

static void decode_rows(const float* x, int K, const float* W, const float* bias, float* Y, int n0, int n1) {
    int n = n0;
    for (; n + 4 <= n1; n += 4) matmul_tile<1, 4, float>(x, K, K, W + size_t(n) * K, bias ? bias + n : nullptr, Y + n, 0);
    for (; n < n1; n++) matmul_tile<1, 1, float>(x, K, K, W + size_t(n) * K, bias ? bias + n : nullptr, Y + n, 0);
}
static void decode_rows(const float* x, int K, const uint16_t* W, const float* bias, float* Y, int n0, int n1) {
    int n = n0;
    for (; n + 4 <= n1; n += 4) bf16_decode_tile<4>(x, K, W + size_t(n) * K, bias ? bias + n : nullptr, Y + n);
    for (; n < n1; n++) bf16_decode_tile<1>(x, K, W + size_t(n) * K, bias ? bias + n : nullptr, Y + n);
}

template <class WT>
using TileFn = void (*)(const float*, int, int, const WT*, const float*, float*, int);

template <class WT, int MR>
static TileFn<WT> tile_for_nr(int nr) {
    switch (nr) {
        case 1: return matmul_tile<MR, 1, WT>;
        case 2: return matmul_tile<MR, 2, WT>;
        default: return matmul_tile<MR, 3, WT>;
    }
}

template <class WT>
static TileFn<WT> tile_for(int mr, int nr) {
    switch (mr) {
        case 1: return tile_for_nr<WT, 1>(nr);
        case 2: return tile_for_nr<WT, 2>(nr);
        case 3: return tile_for_nr<WT, 3>(nr);
        default: return tile_for_nr<WT, 4>(nr);
    }
}

template <class WT>
static void matmul(const float* X, int ldx, int M, int K, const WT* W, const float* bias, float* Y, int ldy, int n0,
                   int n1) {
    auto B = [&](int n) { return bias ? bias + n : nullptr; };
    if (M == 1) return decode_rows(X, K, W, bias, Y, n0, n1);
    constexpr int kTokenBlock = 64;
    for (int m0 = 0; m0 < M; m0 += kTokenBlock) {
        const int m1 = imin(M, m0 + kTokenBlock);
        for (int n = n0; n < n1; n += 3) {
            const int nr = imin(3, n1 - n);
            for (int m = m0; m < m1; m += 4) {
                const int mr = imin(4, m1 - m);
                tile_for<WT>(mr, nr)(X + size_t(m) * ldx, ldx, K, W + size_t(n) * K, B(n), Y + size_t(m) * ldy + n,
                                     ldy);
            }
        }
    }
}

static void matmul_f32(const float* X, int ldx, int M, int K, const float* W, const float* bias, float* Y, int ldy,
                       int n0, int n1) {
    matmul<float>(X, ldx, M, K, W, bias, Y, ldy, n0, n1);
}
static void matmul_bf16(const float* X, int ldx, int M, int K, const uint16_t* W, const float* bias, float* Y,
                        int ldy, int n0, int n1) {
    matmul<uint16_t>(X, ldx, M, K, W, bias, Y, ldy, n0, n1);
}

// ---------------------------------------------------------------------------------------------

static void rmsnorm(const float* x, const float* w, float eps, int n, float* y) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    float ss = hsum(acc);
    for (; i < n; i++) ss += x[i] * x[i];
    const float r = 1.f / sqrtf(ss / float(n) + eps);
    const __m256 vr = _mm256_set1_ps(r);
    for (i = 0; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(_mm256_loadu_ps(x + i), vr)));
    for (; i < n; i++) y[i] = w[i] * (x[i] * r);
}

static void silu_mul(const float* gate, const float* up, int n, float* out) {
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
        const __m256 s = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), e));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(s, _mm256_loadu_ps(up + i)));
    }
    for (; i < n; i++) out[i] = gate[i] / (1.f + expf(-gate[i])) * up[i];
}

// s = exp(s - max s), returning the sum (the caller scales by its inverse once, at the end).
static float softmax_unnormalized(float* s, int n) {
    int t = 0;
    __m256 vmx = _mm256_set1_ps(s[0]);
    for (; t + 8 <= n; t += 8) vmx = _mm256_max_ps(vmx, _mm256_loadu_ps(s + t));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmx), _mm256_extractf128_ps(vmx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    float mx = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    for (; t < n; t++) mx = s[t] > mx ? s[t] : mx;
    vmx = _mm256_set1_ps(mx);
    __m256 vsum = _mm256_setzero_ps();
    for (t = 0; t + 8 <= n; t += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + t), vmx));
        _mm256_storeu_ps(s + t, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    float sum = hsum(vsum);
    for (; t < n; t++) {
        s[t] = expf(s[t] - mx);
        sum += s[t];
    }
    return sum;
}

// Attention. Keys go kAttnBlock at a time: the block's K (then V) rows are made f32 once (f16 is
// widened into scratch; f32 is used in place) and the G heads then read them from L1.
static inline const float* rows_f32(const float* src, int n, int D, float* /*buf*/) {
    (void)n, (void)D;
    return src;
}
static inline const float* rows_f32(const uint16_t* src, int n, int D, float* buf) {
    for (int i = 0; i < n * D; i += 8)
        _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
    return buf;
}

// A block of a long context some blocks ahead comes from memory while this one is computed (one
// block ahead is too close: the widening loop then waits on its loads).
constexpr int kAttnAhead = 4 * kAttnBlock;
template <class KV>
static inline void prefetch_rows(const KV* p, int n, int D) {
    const char* c = reinterpret_cast<const char*>(p);
    for (size_t o = 0; o < size_t(n > 0 ? n : 0) * D * sizeof(KV); o += 64) _mm_prefetch(c + o, _MM_HINT_T0);
}

// An empty asm that "changes" v, so that v is held in a register from here: integer running sums
// stay running sums (gcc would regroup the adds of an unrolled block into a tree, keep every product
// alive, and spill them), and a vector used twice is loaded once (gcc would fold the load into each use).
static inline void keep_in_register(__m256i& v) { __asm__("" : "+x"(v)); }
static inline void keep_in_register(__m256& v) { __asm__("" : "+x"(v)); }

// [sum(a[0]), sum(a[1]), ..., sum(a[7])]: eight dot products finished with one transposing reduction.
static inline __m256 hsum8(const __m256 a[8]) {
    const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    // s0123 = [a0..a3 partial sums of lanes 0-3 | the same of lanes 4-7]; likewise s4567
    return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// Scores of two heads (qa, qb) against four keys (rows k[0..3] of length D), scaled: one K load
// serves both heads and one q load four keys, so the FMAs, not the loads, set the pace.
static inline void scores_2x4(const float* qa, const float* qb, const float* k, int D, __m256 vscale, float* sa,
                              float* sb) {
    __m256 acc[8];
    for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
    for (int d = 0; d < D; d += 8) {
        const __m256 a = _mm256_loadu_ps(qa + d), b = _mm256_loadu_ps(qb + d);
        for (int j = 0; j < 4; j++) {
            __m256 kv = _mm256_loadu_ps(k + size_t(j) * D + d);
            keep_in_register(kv);  // loaded once for both heads (gcc would fold it into each FMA)
            acc[j] = _mm256_fmadd_ps(a, kv, acc[j]);
            acc[4 + j] = _mm256_fmadd_ps(b, kv, acc[4 + j]);
        }
    }
    const __m256 r = _mm256_mul_ps(hsum8(acc), vscale);  // [a.k0 .. a.k3, b.k0 .. b.k3]
    _mm_storeu_ps(sa, _mm256_castps256_ps128(r));
    _mm_storeu_ps(sb, _mm256_extractf128_ps(r, 1));
}

// Scores of one head against eight keys.
static inline void scores_1x8(const float* qg, const float* k, int D, __m256 vscale, float* sg) {
    __m256 acc[8];
    for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
    for (int d = 0; d < D; d += 8) {
        const __m256 qv = _mm256_loadu_ps(qg + d);
        for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + size_t(j) * D + d), acc[j]);
    }
    _mm256_storeu_ps(sg, _mm256_mul_ps(hsum8(acc), vscale));
}

static inline float score_1x1(const float* qg, const float* k, int D, float scale) {
    __m256 acc = _mm256_setzero_ps();
    for (int d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qg + d), _mm256_loadu_ps(k + d), acc);
    return scale * hsum(acc);
}

// oa[0..W) += sum_t pa[t] v[t][0..W), and the same for a second head (pb, ob) when pb is set: W = 32
// columns of two heads in eight registers, one V load serving both.
template <int W>
static inline void accumulate_pv(const float* pa, const float* pb, const float* v, int nb, int D, float* oa, float* ob) {
    constexpr int R = W / 8;
    __m256 a[R], b[R];
    for (int i = 0; i < R; i++) {
        a[i] = _mm256_loadu_ps(oa + 8 * i);
        b[i] = pb ? _mm256_loadu_ps(ob + 8 * i) : _mm256_setzero_ps();
    }
    if (pb) {
        for (int t = 0; t < nb; t++) {
            const __m256 p = _mm256_broadcast_ss(pa + t), p2 = _mm256_broadcast_ss(pb + t);
            for (int i = 0; i < R; i++) {
                __m256 vv = _mm256_loadu_ps(v + size_t(t) * D + 8 * i);
                keep_in_register(vv);
                a[i] = _mm256_fmadd_ps(p, vv, a[i]);
                b[i] = _mm256_fmadd_ps(p2, vv, b[i]);
            }
        }
        for (int i = 0; i < R; i++) _mm256_storeu_ps(ob + 8 * i, b[i]);
    } else {
        for (int t = 0; t < nb; t++) {
            const __m256 p = _mm256_broadcast_ss(pa + t);
            for (int i = 0; i < R; i++) a[i] = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + size_t(t) * D + 8 * i), a[i]);
        }
    }
    for (int i = 0; i < R; i++) _mm256_storeu_ps(oa + 8 * i, a[i]);
}

template <class KV>
static void attention(const float* q, int G, int D, const KV* K, const KV* V, int n_keys, float scale,
                      float* scratch, float* out) {
    if (D % 8 != 0) return attention_portable(q, G, D, K, V, n_keys, scale, scratch, out);
    const size_t ls = attention_score_stride(n_keys);
    float* scores = scratch;                // [G, ls]
    float* buf = scratch + size_t(G) * ls;  // one block of rows as f32, then G softmax sums
    const __m256 vscale = _mm256_set1_ps(scale);

    // scores = scale * q K^T: heads in pairs against four keys at a time, an odd last head against eight
    for (int t0 = 0; t0 < n_keys; t0 += kAttnBlock) {
        const int nb = imin(kAttnBlock, n_keys - t0);
        const int ahead = imin(kAttnBlock, n_keys - t0 - kAttnAhead);  // rows of the block to prefetch
        if (G < 2) prefetch_rows(K + size_t(t0 + kAttnAhead) * D, ahead, D);
        const float* k = rows_f32(K + size_t(t0) * D, nb, D, buf);
        int g = 0;
        for (; g + 2 <= G; g += 2) {
            const float *qa = q + size_t(g) * D, *qb = qa + D;
            float *sa = scores + size_t(g) * ls + t0, *sb = sa + ls;
            int t = 0;
            for (; t + 4 <= nb; t += 4) {
                // the first pair asks for the block ahead a few rows at a time, between its FMAs
                // (a burst of 64 prefetches at once leaves some of them dropped)
                if (g == 0) prefetch_rows(K + size_t(t0 + kAttnAhead + t) * D, imin(4, ahead - t), D);
                scores_2x4(qa, qb, k + size_t(t) * D, D, vscale, sa + t, sb + t);
            }
            if (g == 0) prefetch_rows(K + size_t(t0 + kAttnAhead + t) * D, ahead - t, D);
            for (; t < nb; t++) {
                sa[t] = score_1x1(qa, k + size_t(t) * D, D, scale);
                sb[t] = score_1x1(qb, k + size_t(t) * D, D, scale);
            }
        }
        if (g < G) {
            const float* qg = q + size_t(g) * D;
            float* sg = scores + size_t(g) * ls + t0;
            int t = 0;
            for (; t + 8 <= nb; t += 8) scores_1x8(qg, k + size_t(t) * D, D, vscale, sg + t);
            for (; t < nb; t++) sg[t] = score_1x1(qg, k + size_t(t) * D, D, scale);
        }
    }
    float* inv_sum = buf + size_t(kAttnBlock) * D;  // [G]
    for (int g = 0; g < G; g++) inv_sum[g] = 1.f / softmax_unnormalized(scores + size_t(g) * ls, n_keys);

    // out = P V: pairs of heads 32 columns at a time (an odd head alone), then each row scaled by 1/sum
    for (int i = 0; i < G * D; i++) out[i] = 0.f;
    for (int t0 = 0; t0 < n_keys; t0 += kAttnBlock) {
        const int nb = imin(kAttnBlock, n_keys - t0);
        const int ahead = imin(kAttnBlock, n_keys - t0 - kAttnAhead);
        const int per_pair = (ahead + (G + 1) / 2 - 1) / ((G + 1) / 2);  // rows ahead each pair prefetches
        const float* v = rows_f32(V + size_t(t0) * D, nb, D, buf);
        for (int g = 0; g < G; g += 2) {
            const int r = g / 2 * per_pair;
            prefetch_rows(V + size_t(t0 + kAttnAhead + r) * D, imin(per_pair, ahead - r), D);
            const bool pair = g + 1 < G;
            const float* pa = scores + size_t(g) * ls + t0;
            const float* pb = pair ? pa + ls : nullptr;
            float* oa = out + size_t(g) * D;
            float* ob = pair ? oa + D : nullptr;
            int d0 = 0;
            for (; d0 + 32 <= D; d0 += 32) accumulate_pv<32>(pa, pb, v + d0, nb, D, oa + d0, pair ? ob + d0 : nullptr);
            for (; d0 < D; d0 += 8) accumulate_pv<8>(pa, pb, v + d0, nb, D, oa + d0, pair ? ob + d0 : nullptr);
        }
    }
    for (int g = 0; g < G; g++) {
        float* og = out + size_t(g) * D;
        const __m256 r = _mm256_set1_ps(inv_sum[g]);
        for (int d = 0; d < D; d += 8) _mm256_storeu_ps(og + d, _mm256_mul_ps(_mm256_loadu_ps(og + d), r));
    }
}

// ---------------------------------------------------------------------------------------------
// Quantized weights (layouts in quant.h). A 64-byte slice of a block (16 rows x 4 columns) is two
// registers here: rows 0-7 and rows 8-15. q8 uses maddubs with the sign trick (|x| times w with
// x's sign) so that no int16 pair sum can saturate; q4's nibbles are small enough to go in as they
// are, and 8 times the activation sum is taken off afterwards.

// Rows of activations to int8 blocks (quant.h), as quantize_acts_portable: amax of a block of 32,
// q = round-to-even(x * 127 / amax), and each block's sum of q for the q4 zero point. A short last
// block is copied into a zero-padded one first.
static void quantize_acts(const float* X, int ldx, int M, int K, int8_t* q, float* d, int32_t* s) {
    const int B = q_blocks(K), Kp = B * kQBlock;
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' lane interleave
    alignas(32) float pad[kQBlock];
    for (int m = 0; m < M; m++) {
        for (int b = 0; b < B; b++) {
            const int k0 = b * kQBlock, n = imin(kQBlock, K - k0);
            const float* x = X + size_t(m) * ldx + k0;
            if (n < kQBlock) {
                for (int j = 0; j < kQBlock; j++) pad[j] = j < n ? x[j] : 0.f;
                x = pad;
            }
            __m256 v[4];
            for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(x + 8 * i);
            __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
                                      _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)));
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
            const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
            __m256i i32[4];
            for (int i = 0; i < 4; i++) i32[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));  // nearest even
            const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i32[0], i32[1]), _mm256_add_epi32(i32[2], i32[3]));
            const __m256i i8 = _mm256_permutevar8x32_epi32(
                _mm256_packs_epi16(_mm256_packs_epi32(i32[0], i32[1]), _mm256_packs_epi32(i32[2], i32[3])), order);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + size_t(m) * Kp + k0), i8);
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
            d[size_t(m) * B + b] = amax / 127.f;
            s[size_t(m) * B + b] = _mm_cvtsi128_si32(s4);
        }
    }
}


static inline __m256i bcast4(const int8_t* p) {
    int32_t v;
    __builtin_memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

template <bool Q4>
static void q_row_group(const int8_t* xq, const float* xd, const int32_t* xs, int B, const uint8_t* group,
                        float* out /* 16 floats */) {
    const size_t block_bytes = Q4 ? kQ4BlockBytes : kQ8BlockBytes;
    const __m256i ones = _mm256_set1_epi16(1), low4 = _mm256_set1_epi8(0x0f), flip = _mm256_set1_epi8(char(0x80));
    __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
    for (int b = 0; b < B; b++) {
        const uint8_t* blk = group + size_t(b) * block_bytes;
        // the lines a few blocks ahead, so that the loads overlap the integer work
        for (size_t o = 0; o < block_bytes; o += 64) _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchBytes + o), _MM_HINT_T0);
        const int8_t* x = xq + b * kQBlock;
        __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
        if (Q4) {
            // A nibble times an int8 is at most 15 * 127 in size, so the eight int16 pair sums of a
            // block (2 * 15 * 127 each) add up in int16 without overflow: one madd per register
            // instead of eight (multiplies are the bottleneck: one port on many cores).
            __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
            for (int g = 0; g < 4; g++) {
                const __m256i xl = bcast4(x + 8 * g), xh = bcast4(x + 8 * g + 4);
                const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 + 64 * g));
                const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 + 64 * g + 32));
                s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(_mm256_and_si256(v0, low4), xl));
                s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v0, 4), low4), xh));
                s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(_mm256_and_si256(v1, low4), xl));
                s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v1, 4), low4), xh));
                keep_in_register(s0);
                keep_in_register(s1);
            }
            const __m256i corr = _mm256_set1_epi32(8 * xs[b]);
            acc0 = _mm256_sub_epi32(_mm256_madd_epi16(s0, ones), corr);
            acc1 = _mm256_sub_epi32(_mm256_madd_epi16(s1, ones), corr);
        } else {
            for (int g = 0; g < 8; g++) {
                const __m256i x4 = bcast4(x + 4 * g), ax = _mm256_abs_epi8(x4);
                for (int half = 0; half < 2; half++) {
                    const __m256i w = _mm256_xor_si256(
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 + 64 * g + 32 * half)), flip);
                    const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w, x4)), ones);
                    if (half) acc1 = _mm256_add_epi32(acc1, p);
                    else acc0 = _mm256_add_epi32(acc0, p);
                }
            }
        }
        const __m256 dx = _mm256_set1_ps(xd[b]);
        const __m256 w0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
        const __m256 w1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16)));
        sum0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc0), _mm256_mul_ps(w0, dx), sum0);
        sum1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc1), _mm256_mul_ps(w1, dx), sum1);
    }
    _mm256_storeu_ps(out, sum0);
    _mm256_storeu_ps(out + 8, sum1);
}

// q4 for two tokens at once (prefill): each 32-byte slice of weights is loaded and split into
// nibbles once for both, which leaves the multiplies as the only per-token work.
static void q4_row_group_x2(const int8_t* xq, const float* xd, const int32_t* xs, int B, int Kp, const uint8_t* group,
                            float* out0, float* out1) {
    const __m256i ones = _mm256_set1_epi16(1), low4 = _mm256_set1_epi8(0x0f);
    __m256 sum[2][2] = {{_mm256_setzero_ps(), _mm256_setzero_ps()}, {_mm256_setzero_ps(), _mm256_setzero_ps()}};
    for (int b = 0; b < B; b++) {
        const uint8_t* blk = group + size_t(b) * kQ4BlockBytes;
        const int8_t* x0 = xq + b * kQBlock;
        const int8_t* x1 = x0 + Kp;
        __m256i s[2][2] = {{_mm256_setzero_si256(), _mm256_setzero_si256()},
                           {_mm256_setzero_si256(), _mm256_setzero_si256()}};  // [token][rows 0-7 | 8-15]
        for (int g = 0; g < 4; g++)
            for (int half = 0; half < 2; half++) {
                const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 + 64 * g + 32 * half));
                const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                s[0][half] = _mm256_add_epi16(s[0][half], _mm256_maddubs_epi16(lo, bcast4(x0 + 8 * g)));
                s[0][half] = _mm256_add_epi16(s[0][half], _mm256_maddubs_epi16(hi, bcast4(x0 + 8 * g + 4)));
                s[1][half] = _mm256_add_epi16(s[1][half], _mm256_maddubs_epi16(lo, bcast4(x1 + 8 * g)));
                s[1][half] = _mm256_add_epi16(s[1][half], _mm256_maddubs_epi16(hi, bcast4(x1 + 8 * g + 4)));
                keep_in_register(s[0][half]);
                keep_in_register(s[1][half]);
            }
        const __m256 w0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
        const __m256 w1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16)));
        for (int t = 0; t < 2; t++) {
            const __m256i corr = _mm256_set1_epi32(8 * xs[size_t(t) * B + b]);
            const __m256 dx = _mm256_set1_ps(xd[size_t(t) * B + b]);
            const __m256i a0 = _mm256_sub_epi32(_mm256_madd_epi16(s[t][0], ones), corr);
            const __m256i a1 = _mm256_sub_epi32(_mm256_madd_epi16(s[t][1], ones), corr);
            sum[t][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a0), _mm256_mul_ps(w0, dx), sum[t][0]);
            sum[t][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a1), _mm256_mul_ps(w1, dx), sum[t][1]);
        }
    }
    _mm256_storeu_ps(out0, sum[0][0]);
    _mm256_storeu_ps(out0 + 8, sum[0][1]);
    _mm256_storeu_ps(out1, sum[1][0]);
    _mm256_storeu_ps(out1 + 8, sum[1][1]);
}

template <bool Q4>
static void matmul_q(const int8_t* xq, const float* xd, const int32_t* xs, int M, int K, const uint8_t* W,
                     const float* bias, float* Y, int ldy, int n0, int n1) {
    const int B = q_blocks(K), Kp = B * kQBlock;
    const size_t group_bytes = size_t(B) * (Q4 ? kQ4BlockBytes : kQ8BlockBytes);
    for (int n = n0; n < n1; n += kQRows) {
        const uint8_t* group = W + size_t(n / kQRows) * group_bytes;
        const int valid = imin(kQRows, n1 - n);
        int m = 0;
        if (Q4)
            for (; m + 2 <= M; m += 2) {
                float out[2][kQRows];
                q4_row_group_x2(xq + size_t(m) * Kp, xd + size_t(m) * B, xs + size_t(m) * B, B, Kp, group, out[0],
                                out[1]);
                for (int t = 0; t < 2; t++) {
                    float* y = Y + size_t(m + t) * ldy + n;
                    for (int r = 0; r < valid; r++) y[r] = out[t][r] + (bias ? bias[n + r] : 0.f);
                }
            }
        for (; m < M; m++) {
            float out[kQRows];
            q_row_group<Q4>(xq + size_t(m) * Kp, xd + size_t(m) * B, xs + size_t(m) * B, B, group, out);
            float* y = Y + size_t(m) * ldy + n;
            for (int r = 0; r < valid; r++) y[r] = out[r] + (bias ? bias[n + r] : 0.f);
        }
    }
}

static void matmul_q8(const int8_t* xq, const float* xd, const int32_t* xs, int M, int K, const uint8_t* W,
                      const float* bias, float* Y, int ldy, int n0, int n1) {
    matmul_q<false>(xq, xd, xs, M, K, W, bias, Y, ldy, n0, n1);
}
static void matmul_q4(const int8_t* xq, const float* xd, const int32_t* xs, int M, int K, const uint8_t* W,
                      const float* bias, float* Y, int ldy, int n0, int n1) {
    matmul_q<true>(xq, xd, xs, M, K, W, bias, Y, ldy, n0, n1);
}

static const Kernels table = {
    "avx2",        matmul_f32, matmul_bf16, rmsnorm,  rope_portable, silu_mul, attention_f32, attention_f16,
    add_portable,
    quantize_acts,          matmul_q8,  matmul_q4,
};

}  // namespace avx2

// Exported for the AVX-512 table (kernels.h).
void avx2::attention_f32(const float* q, int G, int head_dim, const float* K, const float* V, int n_keys,
                         float scale, float* scratch, float* out) {
    avx2::attention(q, G, head_dim, K, V, n_keys, scale, scratch, out);
}
void avx2::attention_f16(const float* q, int G, int head_dim, const uint16_t* K, const uint16_t* V, int n_keys,
                         float scale, float* scratch, float* out) {
    avx2::attention(q, G, head_dim, K, V, n_keys, scale, scratch, out);
}

const Kernels* kernels_avx2() { return &avx2::table; }

}  // namespace qwen2rt
