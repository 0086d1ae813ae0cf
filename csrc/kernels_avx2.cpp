// AVX2 + FMA kernels (8 floats a vector). This unit alone is compiled with -mavx2 -mfma -mf16c and is
// only called after cpu_features() says the CPU and OS have them. As in kernels_avx512.cpp, nothing
// here instantiates an inline function with external linkage.
#include <immintrin.h>
#include <math.h>

#include <utility>

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
static inline float load_w1(const float* p) { return *p; }

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
// matmul (f32 weights, row-major): MR x NR register tile of dot products, as in kernels_avx512.cpp;
// the K tail (K % 8) is finished in scalar code.

template <int MR, int NR>
static void matmul_tile(const float* X, int ldx, int K, const float* W, const float* bias, float* Y, int ldy) {
    __m256 acc[MR][NR];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= K; k += 8) {
        if (MR == 1)  // f32 decode streams W from memory: the next tile is asked for
            prefetch_step<NR * 8 * sizeof(float)>(reinterpret_cast<const char*>(W + size_t(NR) * K), k / 8);
        __m256 w[NR];
        for (int j = 0; j < NR; j++) w[j] = load_w(w_at(W, K, j, k));
        for (int i = 0; i < MR; i++) {
            const __m256 x = _mm256_loadu_ps(X + size_t(i) * ldx + k);
            for (int j = 0; j < NR; j++) acc[i][j] = _mm256_fmadd_ps(x, w[j], acc[i][j]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) {
            float s = hsum(acc[i][j]);
            for (int kk = k; kk < K; kk++) s += X[size_t(i) * ldx + kk] * load_w1(w_at(W, K, j, kk));
            Y[size_t(i) * ldy + j] = s + (bias ? bias[j] : 0.f);
        }
}

static void decode_rows(const float* x, int K, const float* W, const float* bias, float* Y, int n0, int n1) {
    int n = n0;
    for (; n + 4 <= n1; n += 4) matmul_tile<1, 4>(x, K, K, W + size_t(n) * K, bias ? bias + n : nullptr, Y + n, 0);
    for (; n < n1; n++) matmul_tile<1, 1>(x, K, K, W + size_t(n) * K, bias ? bias + n : nullptr, Y + n, 0);
}

// bf16 weights (packed, quant.h): a lane is a weight row, as in the AVX-512 panels. A 32-byte load
// is one column pair of 8 rows; a bf16 is the top half of an f32, so the odd column becomes floats
// by masking off the low halves and the even one by a 16-bit shift, and each token's two columns
// are broadcast into an FMA each, into sums of their own (one chain of two dependent FMAs a pair
// would wait on the FMA's latency). V vectors (8V rows from row r0 of the group g) x MT tokens, with
// no horizontal sums: decode takes a whole group (V = 4), a prompt 8 rows x 4 tokens. The tokens'
// columns are broadcast from values (_mm256_set1_ps): through _mm256_broadcast_ss's pointer gcc kept
// the sums in memory, storing each after every FMA, at two thirds of the speed. Columns past K are
// zero in W but not there in X: the last pair of an odd K has no odd column. Against the row tiles
// of the 8-row groups held before, one Zen 4 core (benchmarks/matmul_kernels.cpp avx2 bf16): as fast
// at 256 tokens (64-67 GFLOP/s), 44-60 against 43-46 at 16; decode from L3 within the noise.
template <int MT, int V>
static void bf16_lanes_tile(const float* X, int ldx, int K, const uint32_t* g, int r0, const float* bias, float* Y,
                            int ldy, int rows) {
    __m256 even[MT * V], odd[MT * V];
    for (int i = 0; i < MT * V; i++) even[i] = odd[i] = _mm256_setzero_ps();
    const __m256i top = _mm256_set1_epi32(int(0xffff0000u));
    const uint32_t* w0 = g + r0;  // pair p of vector v: w0 + p * kBf16Rows + 8v
    const float* x0 = X;
    const int pairs = K / 2;
    for (int p = 0; p < pairs; p++, w0 += kBf16Rows, x0 += 2) {
        if (MT == 1)  // decode streams the group from memory
            prefetch_step<kBf16Rows * 4>(reinterpret_cast<const char*>(g + size_t(kPrefetchBytes) / 4), p);
        __m256 we[V], wo[V];
        for (int v = 0; v < V; v++) {
            const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + 8 * v));
            we[v] = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
            wo[v] = _mm256_castsi256_ps(_mm256_and_si256(w, top));
        }
        for (int t = 0; t < MT; t++) {
            const __m256 xe = _mm256_set1_ps(x0[size_t(t) * ldx]), xo = _mm256_set1_ps(x0[size_t(t) * ldx + 1]);
            for (int v = 0; v < V; v++) {
                even[t * V + v] = _mm256_fmadd_ps(xe, we[v], even[t * V + v]);
                odd[t * V + v] = _mm256_fmadd_ps(xo, wo[v], odd[t * V + v]);
            }
        }
    }
    if (K % 2)  // the last column alone: the one past it is not in X
        for (int v = 0; v < V; v++) {
            const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + 8 * v));
            const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
            for (int t = 0; t < MT; t++)
                even[t * V + v] = _mm256_fmadd_ps(_mm256_set1_ps(x0[size_t(t) * ldx]), we, even[t * V + v]);
        }
    // the sums out first, by constant indices (a loop over them with a loop inside would not be
    // unrolled, and gcc would then keep them in memory, storing each after every FMA)
    alignas(32) float out[MT][8 * V];
    for (int t = 0; t < MT; t++)
        for (int v = 0; v < V; v++) _mm256_store_ps(out[t] + 8 * v, _mm256_add_ps(even[t * V + v], odd[t * V + v]));
    for (int t = 0; t < MT; t++)
        for (int r = 0; r < rows; r++) Y[size_t(t) * ldy + r] = out[t][r] + (bias ? bias[r] : 0.f);
}

using LanesTileFn = void (*)(const float*, int, int, const uint32_t*, int, const float*, float*, int, int);
template <int... MT>
static LanesTileFn prompt_tile_for(int mt, std::integer_sequence<int, MT...>) {
    static const LanesTileFn fns[] = {bf16_lanes_tile<MT + 1, 1>...};
    return fns[mt - 1];
}

// n0 a multiple of 16 (kernels.h): a tile starts on a group or half a group. A prompt goes in blocks
// of 64 tokens (in L2), each meeting every 8 rows of [n0, n1) (in L1) 4 tokens at a time.
static void matmul_bf16(const float* X, int ldx, int M, int K, const uint16_t* W, const float* bias, float* Y,
                        int ldy, int n0, int n1) {
    auto B = [&](int n) { return bias ? bias + n : nullptr; };
    if (M == 1) {
        for (int n = n0, rows; n < n1; n += rows) {
            const uint32_t* g = bf16_group(W, K, n);
            const int r0 = n % kBf16Rows;
            rows = imin(r0 == 0 ? kBf16Rows : 16, n1 - n);
            if (rows > 16)  // a whole group in one pass: one stream
                bf16_lanes_tile<1, 4>(X, ldx, K, g, 0, B(n), Y + n, ldy, rows);
            else
                bf16_lanes_tile<1, 2>(X, ldx, K, g, r0, B(n), Y + n, ldy, rows);
        }
        return;
    }
    constexpr int kTokenBlock = 64, kTileTokens = 4;
    for (int m0 = 0; m0 < M; m0 += kTokenBlock) {
        const int m1 = imin(M, m0 + kTokenBlock);
        for (int n = n0; n < n1; n += 8) {
            const uint32_t* g = bf16_group(W, K, n);
            for (int m = m0; m < m1; m += kTileTokens)
                prompt_tile_for(imin(kTileTokens, m1 - m), std::make_integer_sequence<int, kTileTokens>())(
                    X + size_t(m) * ldx, ldx, K, g, n % kBf16Rows, B(n), Y + size_t(m) * ldy + n, ldy, imin(8, n1 - n));
        }
    }
}

using TileFn = void (*)(const float*, int, int, const float*, const float*, float*, int);

template <int MR>
static TileFn tile_for_nr(int nr) {
    switch (nr) {
        case 1: return matmul_tile<MR, 1>;
        case 2: return matmul_tile<MR, 2>;
        default: return matmul_tile<MR, 3>;
    }
}

static TileFn tile_for(int mr, int nr) {
    switch (mr) {
        case 1: return tile_for_nr<1>(nr);
        case 2: return tile_for_nr<2>(nr);
        case 3: return tile_for_nr<3>(nr);
        default: return tile_for_nr<4>(nr);
    }
}

static void matmul(const float* X, int ldx, int M, int K, const float* W, const float* bias, float* Y, int ldy, int n0,
                   int n1) {
    auto B = [&](int n) { return bias ? bias + n : nullptr; };
    if (M == 1) return decode_rows(X, K, W, bias, Y, n0, n1);
    constexpr int kTokenBlock = 64;
    for (int m0 = 0; m0 < M; m0 += kTokenBlock) {
        const int m1 = imin(M, m0 + kTokenBlock);
        for (int n = n0, nr; n < n1; n += nr) {
            nr = imin(3, n1 - n);
            for (int m = m0; m < m1; m += 4) {
                const int mr = imin(4, m1 - m);
                tile_for(mr, nr)(X + size_t(m) * ldx, ldx, K, w_row(W, K, n), B(n), Y + size_t(m) * ldy + n, ldy);
            }
        }
    }
}

static void matmul_f32(const float* X, int ldx, int M, int K, const float* W, const float* bias, float* Y, int ldy,
                       int n0, int n1) {
    matmul(X, ldx, M, K, W, bias, Y, ldy, n0, n1);
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

// Attention (kernels.h). The G heads that share a KV head go in groups of up to six, which fill the
// registers: a group's scores are 2H accumulators of 8 keys each (K is stored in key blocks, so q[d]
// is broadcast once for 16 keys and no score needs a horizontal sum), and its P V is 2H accumulators
// of 8 columns (p[t] broadcast once for 16 columns). Keys go kAttnBlock at a time, in one pass with a
// running max: every group reads the block's K and V from L1, and the scores never leave it. On a
// 2-core Zen 3 (G = 7, D = 64, f16, 8k keys) against the previous kernel (pairs of heads against
// rows of K with a horizontal sum per score, two passes): 0.31 -> 0.22 ms per (layer, KV head) with
// the cache in L3, and 9.3 -> 6.7 ms per token for the 48 (layer, KV head) pairs of Qwen2.5-0.5B on
// 2 threads from DRAM. Then two accumulator sets for groups of 3 heads or fewer (accumulator_sets)
// and scores in base 2 with a shorter exp (exp2_nonpositive): 0.22 -> 0.195 ms per (layer, KV head)
// in L3, of which 0.082 is Q K, 0.085 P V and 0.03 the softmax (each left out in turn; Q K and P V
// each have an FMA floor of 0.072 ms at this core's 102 GFLOP/s).
static inline __m256 load_kv(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load_kv(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}


// An empty asm that "changes" v, so that v is held in a register from here: integer running sums
// stay running sums (gcc would regroup the adds of an unrolled block into a tree, keep every product
// alive, and spill them), and a vector used twice is loaded once (gcc would fold the load into each use).
static inline void keep_in_register(__m256i& v) { __asm__("" : "+x"(v)); }
static inline void keep_in_register(__m256& v) { __asm__("" : "+x"(v)); }

// Accumulator sets for a kernel with n accumulators in its loop: an FMA takes 4 cycles and two issue a
// cycle, so fewer than 8 independent sums leave FMA slots empty (3 heads x 2 vectors: 6, 75%); up to
// 6, a second set takes every other step, and the two are added at the end.
constexpr int accumulator_sets(int n) { return n <= 6 ? 2 : 1; }

// s[h][0..8*NB) = scale * q[h] . k[t] for H heads and the first 8 * NB (8 or 16) keys of key block kb
// (kernels.h); with pk set, as many keys' bytes there are asked for.
template <int H, int NB, class KV>
__attribute__((always_inline)) static inline void scores_block(const float* q, int D, const KV* kb, __m256 vscale,
                                                               float* s, size_t ls, const KV* pk) {
    constexpr int S = accumulator_sets(H * NB);  // even d into the first set, odd d into the second
    __m256 acc[S][H][NB];
    for (int u = 0; u < S; u++)
        for (int h = 0; h < H; h++)
            for (int j = 0; j < NB; j++) acc[u][h][j] = _mm256_setzero_ps();
#pragma GCC unroll 8
    for (int d = 0; d < D; d += S) {
        if (pk) prefetch_step<S * kKeyBlock * sizeof(KV), 2>(reinterpret_cast<const char*>(pk), d / S);
        for (int u = 0; u < S; u++) {
            __m256 k[NB];
            for (int j = 0; j < NB; j++) {
                k[j] = load_kv(kb + size_t(d + u) * kKeyBlock + 8 * j);
                keep_in_register(k[j]);
            }
            for (int h = 0; h < H; h++) {
                __m256 qd = _mm256_broadcast_ss(q + size_t(h) * D + d + u);
                keep_in_register(qd);
                for (int j = 0; j < NB; j++) acc[u][h][j] = _mm256_fmadd_ps(qd, k[j], acc[u][h][j]);
            }
        }
    }
    for (int h = 0; h < H; h++)
        for (int j = 0; j < NB; j++) {
            const __m256 a = S == 2 ? _mm256_add_ps(acc[0][h][j], acc[S - 1][h][j]) : acc[0][h][j];
            _mm256_storeu_ps(s + size_t(h) * ls + 8 * j, _mm256_mul_ps(a, vscale));
        }
}

// o[h][0..8*C) += sum_t p[h][t] v[t][0..8*C) for H heads (p rows ls apart, o and v rows D apart);
// with pv set, nb rows' worth of 8*C columns there are asked for.
template <int H, int C, class KV>
__attribute__((always_inline)) static inline void accumulate_pv(const float* p, size_t ls, const KV* v, int nb, int D,
                                                                float* o, const KV* pv) {
    constexpr int S = accumulator_sets(H * C);  // even t into the first set, odd t into the second
    __m256 acc[S][H][C];
    for (int h = 0; h < H; h++)
        for (int i = 0; i < C; i++) {
            acc[0][h][i] = _mm256_loadu_ps(o + size_t(h) * D + 8 * i);
            if (S == 2) acc[S - 1][h][i] = _mm256_setzero_ps();
        }
    int t = 0;
#pragma GCC unroll 4
    for (; t + S <= nb; t += S) {
        if (pv) prefetch_step<S * 8 * C * sizeof(KV), 2>(reinterpret_cast<const char*>(pv), t / S);
        for (int u = 0; u < S; u++) {
            __m256 vt[C];
            for (int i = 0; i < C; i++) {
                vt[i] = load_kv(v + size_t(t + u) * D + 8 * i);
                keep_in_register(vt[i]);
            }
            for (int h = 0; h < H; h++) {
                __m256 pt = _mm256_broadcast_ss(p + size_t(h) * ls + t + u);
                keep_in_register(pt);
                for (int i = 0; i < C; i++) acc[u][h][i] = _mm256_fmadd_ps(pt, vt[i], acc[u][h][i]);
            }
        }
    }
    for (; t < nb; t++)  // an odd last key
        for (int i = 0; i < C; i++) {
            const __m256 vt = load_kv(v + size_t(t) * D + 8 * i);
            for (int h = 0; h < H; h++)
                acc[0][h][i] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + size_t(h) * ls + t), vt, acc[0][h][i]);
        }
    for (int h = 0; h < H; h++)
        for (int i = 0; i < C; i++) {
            const __m256 a = S == 2 ? _mm256_add_ps(acc[0][h][i], acc[S - 1][h][i]) : acc[0][h][i];
            _mm256_storeu_ps(o + size_t(h) * D + 8 * i, a);
        }
}

// One group of H heads over a block of nb keys (K in key blocks, V rows). DC is head_dim when it is
// a compile-time constant (64 and 128, the Qwen2 sizes), else 0: with D unknown gcc keeps a pointer
// per head and spills accumulators (half the speed). With pk / pv set, the first n_ahead keys there
// are asked for.
template <int H, int DC, class KV>
static void group_scores(const float* q, int D, const KV* K, int nb, __m256 vscale, float* s, size_t ls,
                         const KV* pk, int n_ahead) {
    if (DC) D = DC;
    int t = 0;
    for (; t + 8 < nb; t += kKeyBlock) {
        const bool ask = pk && t + kKeyBlock <= n_ahead;
        scores_block<H, 2>(q, D, K + key_offset(t, 0, D), vscale, s + t, ls, ask ? pk + size_t(t) * D : nullptr);
    }
    if (t < nb) scores_block<H, 1>(q, D, K + key_offset(t, 0, D), vscale, s + t, ls, static_cast<const KV*>(nullptr));
}
template <int H, int DC, class KV>
static void group_pv(const float* p, size_t ls, const KV* V, int nb, int D, float* o, const KV* pv, int n_ahead) {
    if (DC) D = DC;
    // the block's rows ahead go in column slices, one per call below, each a multiple of 16 columns
    const bool ask = pv && n_ahead == nb && D % 16 == 0;
    int d = 0;
    for (; d + 16 <= D; d += 16)
        accumulate_pv<H, 2>(p, ls, V + d, nb, D, o + d, ask ? pv + size_t(d) * nb : nullptr);
    if (d < D) accumulate_pv<H, 1>(p, ls, V + d, nb, D, o + d, static_cast<const KV*>(nullptr));
}

template <class KV>
using GroupScoresFn = void (*)(const float*, int, const KV*, int, __m256, float*, size_t, const KV*, int);
template <class KV>
using GroupPvFn = void (*)(const float*, size_t, const KV*, int, int, float*, const KV*, int);
constexpr int kMaxGroupHeads = 6;  // 2 x 6 accumulators, 2 K or V vectors and a broadcast: 15 registers
constexpr int kMaxGroups = 8;      // more heads per KV head than 48 go to the portable kernel

template <int DC, class KV>
static void group_fns_for_d(int H, GroupScoresFn<KV>& scores, GroupPvFn<KV>& pv) {
    static const GroupScoresFn<KV> sf[kMaxGroupHeads] = {group_scores<1, DC, KV>, group_scores<2, DC, KV>,
                                                         group_scores<3, DC, KV>, group_scores<4, DC, KV>,
                                                         group_scores<5, DC, KV>, group_scores<6, DC, KV>};
    static const GroupPvFn<KV> pf[kMaxGroupHeads] = {group_pv<1, DC, KV>, group_pv<2, DC, KV>, group_pv<3, DC, KV>,
                                                     group_pv<4, DC, KV>, group_pv<5, DC, KV>, group_pv<6, DC, KV>};
    scores = sf[H - 1], pv = pf[H - 1];
}
template <class KV>
static void group_fns(int H, int D, GroupScoresFn<KV>& scores, GroupPvFn<KV>& pv) {
    if (D == 64) return group_fns_for_d<64, KV>(H, scores, pv);
    if (D == 128) return group_fns_for_d<128, KV>(H, scores, pv);
    group_fns_for_d<0, KV>(H, scores, pv);
}

// 2^x for x <= 0 (a base-2 score less the running max): 2^n built in the exponent bits, 2^r by its
// Taylor series (kExp2Taylor, numeric.h). Half the instructions of exp256: no ln 2 to take apart, and
// no overflow to guard. Below -126 it gives 2^-126.
static inline __m256 exp2_nonpositive(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-126.f));
    const __m256i n = _mm256_cvtps_epi32(x);  // nearest
    const __m256 r = _mm256_sub_ps(x, _mm256_cvtepi32_ps(n));
    __m256 p = _mm256_set1_ps(kExp2Taylor[0]);
    for (int k = 1; k < 7; k++) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExp2Taylor[k]));
    return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23)));
}

// One block of a head's scores in base 2 (scale * log2(e) * q.k), s[0..nb), becomes 2^(s - m), m the
// running max, which first moves up to the block's max if that is higher; sum gains the block's
// terms. Returns the factor that what was accumulated before must be scaled by (1 if m did not move,
// 0 on the first block).
static float softmax_block(float* s, int nb, float& m, float& sum) {
    int t = 0;
    __m256 vmx = _mm256_set1_ps(s[0]);
    for (; t + 8 <= nb; t += 8) vmx = _mm256_max_ps(vmx, _mm256_loadu_ps(s + t));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmx), _mm256_extractf128_ps(vmx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    float mx = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    for (; t < nb; t++) mx = s[t] > mx ? s[t] : mx;
    float c = 1.f;
    if (mx > m) {
        c = exp2f(m - mx);  // m = -inf on the first block: 0
        m = mx;
        sum *= c;
    }
    const __m256 vm = _mm256_set1_ps(m);
    __m256 vsum = _mm256_setzero_ps();
    for (t = 0; t + 8 <= nb; t += 8) {
        const __m256 e = exp2_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + t), vm));
        _mm256_storeu_ps(s + t, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    float bsum = hsum(vsum);
    for (; t < nb; t++) {
        s[t] = exp2f(s[t] - m);
        bsum += s[t];
    }
    sum += bsum;
    return c;
}

// x[0..n) *= c, n a multiple of 8
static inline void scale_row(float* x, int n, float c) {
    const __m256 vc = _mm256_set1_ps(c);
    for (int i = 0; i < n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), vc));
}

// One pass over the keys, a block at a time (scores of every group, softmax with a running max, then
// P V of every group): K and V stream from memory together, and the scores stay in L1.
template <class KV>
static void attention(const float* q, int G, int D, const KV* K, const KV* V, int n_keys, float scale,
                      float* scratch, float* out, float* lse) {
    int groups = (G + kMaxGroupHeads - 1) / kMaxGroupHeads, first[kMaxGroups + 1];
    if (D % 8 != 0 || groups > kMaxGroups) return attention_portable(q, G, D, K, V, n_keys, scale, scratch, out, lse);
    // the groups, as even as can be (G = 7: 4 + 3), each with its kernels
    GroupScoresFn<KV> scores_fn[kMaxGroups];
    GroupPvFn<KV> pv_fn[kMaxGroups];
    first[0] = 0;
    for (int i = 0; i < groups; i++) {
        const int H = (G - first[i]) / (groups - i);
        group_fns<KV>(H, D, scores_fn[i], pv_fn[i]);
        first[i + 1] = first[i] + H;
    }
    constexpr size_t ls = kAttnBlock;
    float* s = scratch;  // [G, kAttnBlock]: one block's scores, then its exp
    float m[kMaxGroups * kMaxGroupHeads], sum[kMaxGroups * kMaxGroupHeads];
    for (int g = 0; g < G; g++) m[g] = -INFINITY, sum[g] = 0.f;
    for (int i = 0; i < G * D; i++) out[i] = 0.f;
    const __m256 vscale = _mm256_set1_ps(scale * kLog2e);  // scores in base 2: exp(x) = 2^(x log2 e)

    for (int t0 = 0; t0 < n_keys; t0 += kAttnBlock) {
        const int nb = imin(kAttnBlock, n_keys - t0), ahead = imin(kAttnBlock, n_keys - t0 - kAttnAhead);
        // the first group asks for the block kAttnAhead keys on, its K over the scores' FMAs and its V
        // over those of P V
        for (int i = 0; i < groups; i++)
            scores_fn[i](q + size_t(first[i]) * D, D, K + key_offset(t0, 0, D), nb, vscale, s + first[i] * ls, ls,
                         i == 0 ? K + size_t(t0 + kAttnAhead) * D : nullptr, ahead);
        for (int g = 0; g < G; g++) {
            const float c = softmax_block(s + g * ls, nb, m[g], sum[g]);
            if (c != 1.f) scale_row(out + size_t(g) * D, D, c);
        }
        for (int i = 0; i < groups; i++)
            pv_fn[i](s + first[i] * ls, ls, V + size_t(t0) * D, nb, D, out + size_t(first[i]) * D,
                     i == 0 ? V + size_t(t0 + kAttnAhead) * D : nullptr, ahead);
    }
    for (int g = 0; g < G; g++) scale_row(out + size_t(g) * D, D, 1.f / sum[g]);
    if (lse)
        for (int g = 0; g < G; g++) lse[g] = (m[g] + log2f(sum[g])) * kLn2;
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

template <DType T>
static void q_row_group(const int8_t* xq, const float* xd, const int32_t* xs, int B, const uint8_t* group,
                        float* out /* 16 floats */) {
    constexpr size_t block_bytes = q_block_bytes(T);
    const __m256i ones = _mm256_set1_epi16(1), low4 = _mm256_set1_epi8(0x0f), flip = _mm256_set1_epi8(char(0x80));
    const __m256i high2 = _mm256_set1_epi8(0x30);
    __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
    for (int b = 0; b < B; b++) {
        const uint8_t* blk = group + size_t(b) * block_bytes;
        // the lines a few blocks ahead, so that the loads overlap the integer work
        for (size_t o = 0; o < block_bytes; o += 64) _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchBytes + o), _MM_HINT_T0);
        const int8_t* x = xq + b * kQBlock;
        __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
        if (T == DType::Q4) {
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
        } else if (T == DType::Q6) {
            // A level (0..63) times an int8: two int16 pair sums (2 * 63 * 127 each) fit in int16, so
            // each register's low and high nibble columns add before one madd.
            for (int g = 0; g < 4; g++) {
                const __m256i xl = bcast4(x + 8 * g), xh = bcast4(x + 8 * g + 4);
                for (int half = 0; half < 2; half++) {
                    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 + 64 * g + 32 * half));
                    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 288 + 64 * (g / 2) + 32 * half));
                    // columns 8g.. take the 2 bits at 2m (m = 2 (g % 2)), 8g + 4.. those at 2m + 2: moved to bits 4-5
                    const __m256i hl = g % 2 ? h : _mm256_slli_epi16(h, 4);
                    const __m256i hh = g % 2 ? _mm256_srli_epi16(h, 2) : _mm256_slli_epi16(h, 2);
                    const __m256i lo = _mm256_or_si256(_mm256_and_si256(v, low4), _mm256_and_si256(hl, high2));
                    const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), low4), _mm256_and_si256(hh, high2));
                    const __m256i p = _mm256_madd_epi16(
                        _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh)), ones);
                    if (half) acc1 = _mm256_add_epi32(acc1, p);
                    else acc0 = _mm256_add_epi32(acc0, p);
                }
            }
            const __m256i corr = _mm256_set1_epi32(32 * xs[b]);
            acc0 = _mm256_sub_epi32(acc0, corr);
            acc1 = _mm256_sub_epi32(acc1, corr);
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

template <DType T>
static void matmul_q(const float*, int, const int8_t* xq, const float* xd, const int32_t* xs, int M, int K, const uint8_t* W,
                     const float* bias, float* Y, int ldy, int n0, int n1) {
    const int B = q_blocks(K), Kp = B * kQBlock;
    const size_t group_bytes = size_t(B) * q_block_bytes(T);
    for (int n = n0; n < n1; n += kQRows) {
        const uint8_t* group = W + size_t(n / kQRows) * group_bytes;
        const int valid = imin(kQRows, n1 - n);
        int m = 0;
        if (T == DType::Q4)
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
            q_row_group<T>(xq + size_t(m) * Kp, xd + size_t(m) * B, xs + size_t(m) * B, B, group, out);
            float* y = Y + size_t(m) * ldy + n;
            for (int r = 0; r < valid; r++) y[r] = out[r] + (bias ? bias[n + r] : 0.f);
        }
    }
}

static const Kernels table = {
    "avx2",        matmul_f32, matmul_bf16, rmsnorm,  rope_portable, silu_mul, attention_f32, attention_f16,
    attention_bf16_portable,  // no bf16 dot product in AVX2: the portable loops, vectorised for AVX2
    add_portable,
    quantize_acts,          matmul_q<DType::Q8>,  matmul_q<DType::Q4>, matmul_q<DType::Q6>,
};

}  // namespace avx2

// Exported for the AVX-512 table (kernels.h).
void avx2::attention_f32(const float* q, int G, int head_dim, const float* K, const float* V, int n_keys,
                         float scale, float* scratch, float* out, float* lse) {
    avx2::attention(q, G, head_dim, K, V, n_keys, scale, scratch, out, lse);
}
void avx2::attention_f16(const float* q, int G, int head_dim, const uint16_t* K, const uint16_t* V, int n_keys,
                         float scale, float* scratch, float* out, float* lse) {
    avx2::attention(q, G, head_dim, K, V, n_keys, scale, scratch, out, lse);
}

const Kernels* kernels_avx2() { return &avx2::table; }

}  // namespace qwen2rt
