// AVX-512 kernels (F, BW, VL, DQ; VNNI and BF16 for the quantized formats to come). This unit alone is
// compiled with those -m flags; it is only called after cpu_features() says the CPU and OS have them.
//
// No inline function with external linkage may be instantiated here (std::min, std::fill, helpers
// from common.h): the linker could pick this AVX-512 copy for the generic code too. Everything in
// this file is static or in its own namespace and uses only intrinsics and builtins.
#include <immintrin.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <type_traits>
#include <utility>

#include "cpu_features.h"
#include "kernels.h"
#include "numeric.h"
#include "quant.h"

namespace qwen2rt {
namespace avx512 {

#include "kernels_portable.inc"
#include "transpose16.inc"

static inline int imin(int a, int b) { return a < b ? a : b; }
static inline __mmask16 tail_mask(int n) { return __mmask16((1u << n) - 1u); }

static inline __m512 load_w(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load_w(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }

// exp(x) for a vector, within 2 ulp of expf: 2^n * p(r), r = x - n*ln2 in [-ln2/2, ln2/2].
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-104.f), x);  // x first in the NaN-propagating slot
    x = _mm512_min_ps(_mm512_set1_ps(89.f), x);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}

// ---------------------------------------------------------------------------------------------
// matmul (f32 weights, row-major): an MR x NR register tile of dot products. Each step loads NR
// weight vectors and MR token vectors and does MR*NR FMAs; the accumulators are reduced once at the
// end of K.

// An f32 decode tile (one token) asks, each step, for as many bytes of the tile kDecodeTilesAhead on
// as it reads of its own, into L2. On Zen 4, against asking for the next tile into L1: a decode step's
// bf16 layer matrices alone (row-major then, as f32 is) read at 40-42 instead of 36 GB/s while the
// host's bandwidth was high (51-52 GB/s reading the same bytes plainly), 30 instead of 29 while it was
// low; f32 45 against 44 and 32.5 against 31. One, two or three tiles on measured alike, 8 or 16 lower.
constexpr int kDecodeTilesAhead = 2;

template <int MR, int NR>
static void matmul_tile(const float* X, int ldx, int K, const float* W, const float* bias, float* Y, int ldy) {
    __m512 acc[MR][NR];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        if (MR == 1)  // f32 decode streams W from memory: a tile further on is asked for
            prefetch_step<NR * 16 * sizeof(float), 2>(reinterpret_cast<const char*>(W + size_t(kDecodeTilesAhead * NR) * K),
                                                   k / 16);
        __m512 w[NR];
        for (int j = 0; j < NR; j++) w[j] = load_w(w_at(W, K, j, k));
        for (int i = 0; i < MR; i++) {
            const __m512 x = _mm512_loadu_ps(X + size_t(i) * ldx + k);
            for (int j = 0; j < NR; j++) acc[i][j] = _mm512_fmadd_ps(x, w[j], acc[i][j]);
        }
    }
    if (k < K) {
        const __mmask16 m = tail_mask(K - k);
        __m512 w[NR];
        for (int j = 0; j < NR; j++) w[j] = load_w(w_at(W, K, j, k), m);
        for (int i = 0; i < MR; i++) {
            const __m512 x = _mm512_maskz_loadu_ps(m, X + size_t(i) * ldx + k);
            for (int j = 0; j < NR; j++) acc[i][j] = _mm512_fmadd_ps(x, w[j], acc[i][j]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++)
            Y[size_t(i) * ldy + j] = _mm512_reduce_add_ps(acc[i][j]) + (bias ? bias[j] : 0.f);
}

using TileFn = void (*)(const float*, int, int, const float*, const float*, float*, int);

template <int MR>
static TileFn tile_for_nr(int nr) {
    switch (nr) {
        case 1: return matmul_tile<MR, 1>;
        case 2: return matmul_tile<MR, 2>;
        case 3: return matmul_tile<MR, 3>;
        default: return matmul_tile<MR, 4>;
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
    if (M == 1) {  // decode: one token, four weight rows at a time (memory-bound)
        int n = n0;
        for (; n < n1; n += 4) {
            const int nr = imin(4, n1 - n);
            tile_for(1, nr)(X, ldx, K, w_row(W, K, n), B(n), Y + n, ldy);
        }
        return;
    }
    // A few tokens (a prompt runs on panels, matmul_f32): a block of up to 64 tokens (64*K floats,
    // in L2) meets every weight row of [n0, n1); four weight rows (in L1) are reused across it.
    constexpr int kTokenBlock = 64;
    for (int m0 = 0; m0 < M; m0 += kTokenBlock) {
        const int m1 = imin(M, m0 + kTokenBlock);
        for (int n = n0; n < n1; n += 4) {
            const int nr = imin(4, n1 - n);
            for (int m = m0; m < m1; m += 4) {
                const int mr = imin(4, m1 - m);
                tile_for(mr, nr)(X + size_t(m) * ldx, ldx, K, w_row(W, K, n), B(n), Y + size_t(m) * ldy + n, ldy);
            }
        }
    }
}

// An empty asm that "changes" v, so that v is held in a register from here (as in the AVX2 kernels):
// a weight vector that two instructions use (shifted and masked, bf16; low and high nibbles, q4) is
// then read once. Left to itself gcc 12 folds the load into both instructions (vpslld and vpandd, or
// vpsrlw and vpandd, with a memory operand): two reads of the same 64 bytes. One Zen 4 core, decode
// (one token): the bf16 kernel from L2 read 58 GB/s of weights with two reads and 85 with one, and
// the layer's matrices (benchmarks/matmul_kernels.cpp, mostly from L3) ran at 73-82 G/s against
// 52-55; q4 at 218 against 182-202. From DRAM a decode step gains less (bf16 0-2%): it waits on
// memory either way, but a faster kernel leaves it more of the time to wait.
static inline void keep_in_register(__m512i& v) { asm("" : "+v"(v)); }

// bf16 weights, decode: the packed groups (quant.h) put 32 rows' column pair in two 64-byte
// vectors, a row a 32-bit lane. Shifting the lanes left by 16 gives the even column as f32, masking
// off the low halves the odd one, and each feeds an FMA with that column of x broadcast: 32 sums at
// once with no horizontal reduction, the group read as one stream, with software prefetch only where
// decode_prefetch_bytes() says (on 2 Zen 4 cores, asking ahead had cost a fifth of the bandwidth to
// the 8-row groups before; on a Xeon it gained a tenth). x stays
// f32: decode is memory-bound, so the tokens' bf16 rounding of the prefill would save nothing.
// Rows [r0, r0 + 16V) of group g.
template <int V>
static void bf16_decode_group(const float* x, int K, const uint32_t* g, int r0, const float* bias, float* y,
                              int rows) {
    const __m512i odd_mask = _mm512_set1_epi32(int(0xffff0000u));
    __m512 even[V], odd[V];
    for (int v = 0; v < V; v++) even[v] = odd[v] = _mm512_setzero_ps();
    const int pairs = K / 2;
    const int ahead = V == 2 ? decode_prefetch_bytes() : 0;  // whole groups: one stream of 128 bytes a step
    for (int p = 0; p < pairs; p++) {
        if (ahead) {
            const char* q = reinterpret_cast<const char*>(g + size_t(p) * kBf16Rows) + ahead;
            _mm_prefetch(q, _MM_HINT_T1);
            _mm_prefetch(q + 64, _MM_HINT_T1);
        }
        const __m512 xe = _mm512_set1_ps(x[2 * p]), xo = _mm512_set1_ps(x[2 * p + 1]);
        for (int v = 0; v < V; v++) {
            __m512i w = _mm512_loadu_si512(g + size_t(p) * kBf16Rows + r0 + 16 * v);
            keep_in_register(w);
            even[v] = _mm512_fmadd_ps(xe, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)), even[v]);
            odd[v] = _mm512_fmadd_ps(xo, _mm512_castsi512_ps(_mm512_and_si512(w, odd_mask)), odd[v]);
        }
    }
    if (K % 2) {  // the last column alone: the one past it is not in x
        const __m512 xe = _mm512_set1_ps(x[K - 1]);
        for (int v = 0; v < V; v++) {
            const __m512i w = _mm512_loadu_si512(g + size_t(pairs) * kBf16Rows + r0 + 16 * v);
            even[v] = _mm512_fmadd_ps(xe, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)), even[v]);
        }
    }
    for (int v = 0; v < V && 16 * v < rows; v++) {
        const __mmask16 m = rows - 16 * v >= 16 ? __mmask16(0xffff) : tail_mask(rows - 16 * v);
        const __m512 bv = bias ? _mm512_maskz_loadu_ps(m, bias + 16 * v) : _mm512_setzero_ps();
        _mm512_mask_storeu_ps(y + 16 * v, m, _mm512_add_ps(_mm512_add_ps(even[v], odd[v]), bv));
    }
}

// bf16 weights, prefill: compute-bound, so the tokens are rounded to bf16 once and each
// `vdpbf16ps` does 32 multiply-adds (an f32 FMA 16). The products of bf16 values are exact and
// summed in f32, so the one rounding is the tokens' (8 significant bits, as llama.cpp's BF16 and
// PyTorch's bfloat16 round them).
//
// The tokens go in panels of up to 12, rearranged into column pairs, [pair][token]; a group of the
// packed weights already is a panel of 32 rows, [pair][row]. A pair step of the register tile loads
// 2 weight vectors (32 rows) and broadcasts each of 12 tokens' pairs into `vdpbf16ps`: 24
// accumulators, one f32 sum per (row, token), with no horizontal reduction, as a BLAS multiplies
// packed operands. f32 weights (below) run the same tile with one f32 column where bf16 has a pair
// and an FMA, but they are held row-major, so their 32-row panels are rearranged per call (16x16
// transposes). Qwen2.5-0.5B's matrices, one Zen 4 core (benchmarks/matmul_kernels.cpp), of
// `vdpbf16ps`'s 234 GFLOP/s peak: bf16 at 256 tokens 209 on the held groups, 207 when 8-row groups
// were rearranged into panels per call; at 16 tokens 203, where those 8-row groups ran 4 x 4 tiles
// of rows at 135. f32 at 512 tokens 100-104 of the FMA's 117.

static inline __m512 silu_mul16(__m512 g, __m512 u) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
    return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e)), u);
}

constexpr int kPanelTokens = 12;
constexpr int kPanelVecs = 2;  // 16 rows each
constexpr int kPanelRows = 16 * kPanelVecs;
static_assert(kPanelRows == kBf16Rows, "a packed bf16 group is one weight panel");
static_assert(kPanelTokens == kBf16PanelTokens, "the token panels of kernels.h");
// Below this many tokens the f32 weights' per-call panels cost more than they save (a sixth of the
// products' time at 16 tokens): those prompts run on 4 x 4 tiles of rows (matmul).
constexpr int kF32PanelMinTokens = 32;

// What a panel holds, as 32-bit units: a pair of columns as bf16 (bf16 weights, `vdpbf16ps`), or
// one f32 column (f32 weights, FMA). The kernels below are the same for both.
struct Bf16Pairs {
    using Weight = uint16_t;
    static int units(int K) { return q_blocks(K) * 16; }  // whole packed blocks of 32 columns
    // 16 units from unit u of token row x, rounded to bf16
    static __m512i token16(const float* x, int u, int K) {
        const int k = 2 * u;
        const __mmask16 lo = k + 16 <= K ? __mmask16(0xffff) : k < K ? tail_mask(K - k) : 0;
        const __mmask16 hi = k + 32 <= K ? __mmask16(0xffff) : k + 16 < K ? tail_mask(K - k - 16) : 0;
        return __m512i(_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, x + k + 16), _mm512_maskz_loadu_ps(lo, x + k)));
    }
    static __m512 madd(__m512 acc, uint32_t x, __m512i w) {
        return _mm512_dpbf16_ps(acc, __m512bh(_mm512_set1_epi32(int(x))), __m512bh(w));
    }
};
struct F32Columns {
    using Weight = float;
    static int units(int K) { return (K + 15) / 16 * 16; }
    static __m512i token16(const float* x, int u, int K) {
        return _mm512_castps_si512(_mm512_maskz_loadu_ps(u + 16 <= K ? __mmask16(0xffff) : tail_mask(K - u), x + u));
    }
    static __m512 madd(__m512 acc, uint32_t x, __m512i w) {
        float xf;
        __builtin_memcpy(&xf, &x, 4);
        return _mm512_fmadd_ps(_mm512_set1_ps(xf), _mm512_castsi512_ps(w), acc);
    }
};

// The first mt rows of X (mt <= kPanelTokens) as a token panel: out[u * mt + t] = token t's unit u,
// for U::units(K) units (zero past K).
template <class U>
static void tokens_to_panel(const float* X, int ldx, int mt, int K, uint32_t* out) {
    for (int u0 = 0; u0 < U::units(K); u0 += 16) {
        __m512i v[16];
        for (int t = 0; t < 16; t++) v[t] = t < mt ? U::token16(X + size_t(t) * ldx, u0, K) : _mm512_setzero_si512();
        transpose16(v);  // v[u] lane t: token t's unit u0 + u
        const __mmask16 m = tail_mask(mt);
        for (int u = 0; u < 16; u++) _mm512_mask_storeu_epi32(out + size_t(u0 + u) * mt, m, v[u]);
    }
}

// Rows n .. n + kPanelRows of a row-major f32 W (rows from n_end on zero) as a weight panel, the
// layout of a packed bf16 group: out[(u * kPanelVecs + v) * 16 + r] = row n + 16v + r's column u.
static void f32_rows_to_panel(const float* W, int K, int n, int n_end, uint32_t* out) {
    for (int vec = 0; vec < kPanelVecs; vec++) {
        const int r0 = n + 16 * vec;
        for (int u0 = 0; u0 < F32Columns::units(K); u0 += 16) {
            __m512i v[16];
            for (int r = 0; r < 16; r++)
                v[r] = r0 + r < n_end ? F32Columns::token16(W + size_t(r0 + r) * K, u0, K) : _mm512_setzero_si512();
            transpose16(v);  // v[u] lane r: row r's column u0 + u
            for (int u = 0; u < 16; u++) _mm512_store_si512(out + (size_t(u0 + u) * kPanelVecs + vec) * 16, v[u]);
        }
    }
}

// Y[t][j - r0] = bias[j - r0] + sum over the P units of the weight panel times the token panel (MT
// tokens), for the panel's rows r0 <= j < r0 + rows (r0 0 or 16: a thread's share may start half
// way into a group; the other half's sums are made and dropped). With a gate tile (the same rows of
// another product, kPanelRows apart per token), Y is silu(gate) times those sums instead; with add,
// Y += them (the residual stream taking o_proj's or down_proj's output).
template <class U, int MT>
static void panel_tile(const uint32_t* wp, const uint32_t* xp, int P, const float* bias, const float* gate, bool add,
                       float* Y, int ldy, int r0, int rows) {
    __m512 acc[MT][kPanelVecs];
    for (int t = 0; t < MT; t++)
        for (int v = 0; v < kPanelVecs; v++) acc[t][v] = _mm512_setzero_ps();
    for (int p = 0; p < P; p++) {
        __m512i w[kPanelVecs];
        for (int v = 0; v < kPanelVecs; v++) w[v] = _mm512_loadu_si512(wp + (size_t(p) * kPanelVecs + v) * 16);
        for (int t = 0; t < MT; t++)
            for (int v = 0; v < kPanelVecs; v++) acc[t][v] = U::madd(acc[t][v], xp[size_t(p) * MT + t], w[v]);
    }
    for (int v = r0 / 16; v < kPanelVecs; v++) {
        const int at = 16 * v - r0, left = rows - at;  // this vector's first row, from Y's row r0
        if (left <= 0) break;
        const __mmask16 m = left >= 16 ? __mmask16(0xffff) : tail_mask(left);
        const __m512 bv = bias ? _mm512_maskz_loadu_ps(m, bias + at) : _mm512_setzero_ps();
        for (int t = 0; t < MT; t++) {
            float* y = Y + size_t(t) * ldy + at;
            const __m512 s = _mm512_add_ps(acc[t][v], bv);
            if (gate)
                _mm512_mask_storeu_ps(y, m, silu_mul16(_mm512_maskz_loadu_ps(m, gate + t * kPanelRows + at), s));
            else
                _mm512_mask_storeu_ps(y, m, add ? _mm512_add_ps(_mm512_maskz_loadu_ps(m, y), s) : s);
        }
    }
}

using PanelTileFn = void (*)(const uint32_t*, const uint32_t*, int, const float*, const float*, bool, float*, int, int,
                             int);
template <class U, int... MT>
static PanelTileFn panel_tile_for(int mt, std::integer_sequence<int, MT...>) {
    static const PanelTileFn fns[] = {panel_tile<U, MT + 1>...};
    return fns[mt - 1];
}

// The M rows of X as token panels (bf16: the layout of kernels.h, bf16_panel_index), in this
// thread's scratch.
template <class U>
static const uint32_t* make_token_panels(const float* X, int ldx, int M, int K) {
    static thread_local ThreadScratch<uint32_t> token_panels;
    const int P = U::units(K);
    const int panels = (M + kPanelTokens - 1) / kPanelTokens;
    uint32_t* xp = token_panels.get(size_t(panels) * kPanelTokens * P);
    for (int i = 0; i < panels; i++) {
        const int mt = imin(kPanelTokens, M - i * kPanelTokens);
        tokens_to_panel<U>(X + size_t(i) * kPanelTokens * ldx, ldx, mt, K, xp + size_t(i) * kPanelTokens * P);
    }
    return xp;
}

// Y[:, n0:n1] for the M tokens in panels xp, of K columns. bf16: n0 a multiple of 16, the panels the
// packed groups themselves; f32: each 32-row panel rearranged here. With Wgate (bf16), Y =
// silu(X Wgate^T) * (X W^T) (matmul_bf16_swiglu), and with h_panels that product also goes, each
// tile as it is made, to the token panels of M rows of ldy columns that the next product reads (n0 a
// multiple of 32: a tile is whole units); Y may then be null. No software prefetch: asking for the
// next group into L2 a share per token panel (prefetcht1) had cost bf16 prompts 2% at 512 tokens,
// 3% at 128, 8% at 64 and a quarter of their speed at 16 (one process, alternating, 12-16 rounds),
// where the weights stream from memory and the hardware prefetcher already has them on the way; it
// did nothing for f32 (within 1%).
template <class U>
static void panel_products(const uint32_t* xp, int M, int K, const typename U::Weight* W, const float* bias, float* Y,
                           int ldy, int n0, int n1, bool add = false, const uint16_t* Wgate = nullptr,
                           uint32_t* h_panels = nullptr) {
    constexpr bool kBf16 = std::is_same_v<U, Bf16Pairs>;
    static thread_local ThreadScratch<uint32_t> weight_panel;
    const int P = U::units(K), Ph = Bf16Pairs::units(ldy);
    const int panels = (M + kPanelTokens - 1) / kPanelTokens;
    uint32_t* const f32_panel = kBf16 ? nullptr : weight_panel.get(size_t(P) * kPanelRows);
    const uint32_t* wp = f32_panel;
    for (int n = n0, rows; n < n1; n += rows) {
        const int r0 = kBf16 ? n % kPanelRows : 0;
        rows = imin(kPanelRows - r0, n1 - n);
        if constexpr (kBf16)
            wp = bf16_group(W, K, n);
        else
            f32_rows_to_panel(W, K, n, n1, f32_panel);
        const uint32_t* wg = Wgate ? bf16_group(Wgate, K, n) : nullptr;
        for (int i = 0; i < panels; i++) {
            const int m = i * kPanelTokens, mt = imin(kPanelTokens, M - m);
            const PanelTileFn tile = panel_tile_for<U>(mt, std::make_integer_sequence<int, kPanelTokens>());
            alignas(64) float gate_tile[kPanelTokens * kPanelRows], y_tile[kPanelTokens * kPanelRows];
            if (wg) tile(wg, xp + size_t(m) * P, P, nullptr, nullptr, false, gate_tile, kPanelRows, r0, rows);
            float* y = Y ? Y + size_t(m) * ldy + n : y_tile;
            const int ld = Y ? ldy : kPanelRows;
            tile(wp, xp + size_t(m) * P, P, bias ? bias + n : nullptr, wg ? gate_tile : nullptr, add, y, ld, r0, rows);
            if (h_panels)  // units n / 2 on of tokens m..m + mt; past ldy, zeros
                tokens_to_panel<Bf16Pairs>(y, ld, mt, rows, h_panels + size_t(m) * Ph + size_t(n / 2) * mt);
        }
    }
}

static void matmul_f32(const float* X, int ldx, int M, int K, const float* W, const float* bias, float* Y, int ldy,
                       int n0, int n1) {
    if (M >= kF32PanelMinTokens)
        return panel_products<F32Columns>(make_token_panels<F32Columns>(X, ldx, M, K), M, K, W, bias, Y, ldy, n0, n1);
    matmul(X, ldx, M, K, W, bias, Y, ldy, n0, n1);
}

// n0 a multiple of 16 (kernels.h). With no weights to rearrange, every prompt, down to 2 tokens, runs
// on the panels.
static void matmul_bf16(const float* X, int ldx, int M, int K, const uint16_t* W, const float* bias, float* Y,
                        int ldy, int n0, int n1) {
    if (M > 1) return panel_products<Bf16Pairs>(make_token_panels<Bf16Pairs>(X, ldx, M, K), M, K, W, bias, Y, ldy, n0, n1);
    for (int n = n0, rows; n < n1; n += rows) {
        const int r0 = n % kBf16Rows;
        rows = imin(kBf16Rows - r0, n1 - n);
        const uint32_t* g = bf16_group(W, K, n);
        const float* b = bias ? bias + n : nullptr;
        if (r0 == 0 && rows > 16)
            bf16_decode_group<2>(X, K, g, 0, b, Y + n, rows);
        else
            bf16_decode_group<1>(X, K, g, r0, b, Y + n, rows);
    }
}

// ---------------------------------------------------------------------------------------------

static void rmsnorm(const float* x, const float* w, float eps, int n, float* y) {
    __m512 acc = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_loadu_ps(x + i);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    if (i < n) {
        const __m512 v = _mm512_maskz_loadu_ps(tail_mask(n - i), x + i);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    const float r = 1.f / sqrtf(_mm512_reduce_add_ps(acc) / float(n) + eps);
    const __m512 vr = _mm512_set1_ps(r);
    for (i = 0; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_loadu_ps(w + i), _mm512_mul_ps(_mm512_loadu_ps(x + i), vr)));
    if (i < n) {
        const __mmask16 m = tail_mask(n - i);
        _mm512_mask_storeu_ps(y + i, m,
                              _mm512_mul_ps(_mm512_maskz_loadu_ps(m, w + i),
                                            _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), vr)));
    }
}

static void silu_mul(const float* gate, const float* up, int n, float* out) {
    int i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(out + i, silu_mul16(_mm512_loadu_ps(gate + i), _mm512_loadu_ps(up + i)));
    if (i < n) {
        const __mmask16 m = tail_mask(n - i);
        _mm512_mask_storeu_ps(out + i, m, silu_mul16(_mm512_maskz_loadu_ps(m, gate + i), _mm512_maskz_loadu_ps(m, up + i)));
    }
}

// The MLP's silu(X Wgate^T) * (X Wup^T) (kernels.h). A prompt's gate and up share the token panels
// (rearranged once, not per product), and each 12 x 32 tile of gate, made into a buffer on the
// stack, is multiplied into the same tile of up as that tile is stored: no gate and up rows in
// memory, and no silu_mul pass over them. 512 tokens of Qwen2.5-0.5B in bf16 ran 4.4% faster than
// with the two products and silu_mul (one process, alternating, 16 rounds); the sums are the same.
// A decode step (M = 1) runs the two products and silu_mul.
static void matmul_bf16_swiglu(const float* X, int ldx, int M, int K, const uint16_t* Wgate, const uint16_t* Wup,
                               float* Y, int ldy, int n0, int n1, uint32_t* h_panels) {
    if (M > 1 || h_panels)
        return panel_products<Bf16Pairs>(make_token_panels<Bf16Pairs>(X, ldx, M, K), M, K, Wup, nullptr, Y, ldy, n0, n1,
                                         false, Wgate, h_panels);
    if (n0 >= n1) return;
    static thread_local ThreadScratch<float> up_row;
    float* up = up_row.get(size_t(n1));  // up[n0, n1)
    matmul_bf16(X, ldx, 1, K, Wgate, nullptr, Y, ldy, n0, n1);
    matmul_bf16(X, ldx, 1, K, Wup, nullptr, up, ldy, n0, n1);
    silu_mul(Y + n0, up + n0, n1 - n0, Y + n0);
}

// A prompt on bf16 weights whose tokens are already panels (the hidden rows that matmul_bf16_swiglu
// made for down_proj); with add, into Y.
static void matmul_bf16_panels(const uint32_t* xp, int M, int K, const uint16_t* W, const float* bias, float* Y,
                               int ldy, int n0, int n1, bool add) {
    panel_products<Bf16Pairs>(xp, M, K, W, bias, Y, ldy, n0, n1, add);
}
// A prompt's product added into Y (o_proj into the residual stream).
static void matmul_bf16_add(const float* X, int ldx, int M, int K, const uint16_t* W, float* Y, int ldy, int n0,
                            int n1) {
    panel_products<Bf16Pairs>(make_token_panels<Bf16Pairs>(X, ldx, M, K), M, K, W, nullptr, Y, ldy, n0, n1, true);
}

static void add(float* y, const float* x, int n) {
    int i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_add_ps(_mm512_loadu_ps(y + i), _mm512_loadu_ps(x + i)));
    for (; i < n; i++) y[i] += x[i];
}

// ---------------------------------------------------------------------------------------------
// Quantized weights (layouts in quant.h): one register holds 16 rows x 4 columns of a block, so
// `vpdpbusd` with 4 broadcast activation bytes adds into one int32 sum per row.

static void quantize_acts(const float* X, int ldx, int M, int K, int8_t* q, float* d, int32_t* s) {
    const int B = q_blocks(K), Kp = B * kQBlock;
    const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    for (int m = 0; m < M; m++) {
        const float* x = X + size_t(m) * ldx;
        for (int b = 0; b < B; b++) {
            const int k0 = b * kQBlock, n = imin(kQBlock, K - k0);
            const __mmask16 m0 = tail_mask(imin(16, n)), m1 = n > 16 ? tail_mask(n - 16) : 0;
            const __m512 v0 = _mm512_maskz_loadu_ps(m0, x + k0), v1 = _mm512_maskz_loadu_ps(m1, x + k0 + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(v0, sign), _mm512_and_ps(v1, sign)));
            const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
            const __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv));  // round to nearest even
            const __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
            int8_t* qb = q + size_t(m) * Kp + k0;
            _mm_storeu_si128(reinterpret_cast<__m128i*>(qb), _mm512_cvtepi32_epi8(i0));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16), _mm512_cvtepi32_epi8(i1));
            d[size_t(m) * B + b] = amax / 127.f;
            s[size_t(m) * B + b] = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
        }
    }
}

static inline __m512i bcast4(const int8_t* p) {
    int32_t v;
    __builtin_memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

// sums[t * NG + g] (the 16 rows of row group g) += NG consecutive row groups times MR activation
// rows, over all blocks. Each activation broadcast feeds NG products. nzs holds -zero_point * the
// activation block's sum (the weights' offset, 128, 32 or 8, times it), so that each block's int32
// sums start from it instead of subtracting it afterwards.
template <int MR, int NG, DType T>
static inline void q_tile(const int8_t* xq, const float* xd, const int32_t* nzs, int B, const uint8_t* group,
                          size_t group_bytes, __m512* sums) {
    const int Kp = B * kQBlock;
    constexpr size_t block_bytes = q_block_bytes(T);
    const __m512i low4 = _mm512_set1_epi8(0x0f), high2 = _mm512_set1_epi8(0x30);
    const int ahead = MR == 1 ? decode_prefetch_bytes() : 0;  // a decode streams W from memory
    for (int b = 0; b < B; b++) {
        const uint8_t* blk = group + size_t(b) * block_bytes;
        if (ahead)  // the block `ahead` bytes on, a group or more further along the thread's rows
            for (size_t l = 0; l < block_bytes; l += 64) _mm_prefetch(reinterpret_cast<const char*>(blk) + ahead + l, _MM_HINT_T1);
        const int8_t* x = xq + b * kQBlock;
        __m512i acc[MR * NG];
        for (int t = 0; t < MR; t++) {
            const __m512i start = _mm512_set1_epi32(nzs[size_t(t) * B + b]);
            for (int g = 0; g < NG; g++) acc[t * NG + g] = start;
        }
        if (T != DType::Q8) {
            __m512i h2[NG][2];  // q6: the high 2 bits of columns 16h + 4m + j at bits 2m
            if (T == DType::Q6)
                for (int g = 0; g < NG; g++)
                    for (int h = 0; h < 2; h++) {
                        h2[g][h] = _mm512_loadu_si512(blk + g * group_bytes + 288 + 64 * h);
                        keep_in_register(h2[g][h]);
                    }
            for (int c = 0; c < 4; c++) {
                __m512i lo[NG], hi[NG];
                for (int g = 0; g < NG; g++) {
                    __m512i v = _mm512_loadu_si512(blk + g * group_bytes + 32 + 64 * c);
                    keep_in_register(v);
                    lo[g] = _mm512_and_si512(v, low4);
                    hi[g] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
                    if (T == DType::Q6) {  // columns 8c.. (m = 2 (c % 2)) and 8c + 4.. (m + 1): bits 2m to 4
                        const __m512i h = h2[g][c / 2];
                        const __m512i hl = c % 2 ? h : _mm512_slli_epi16(h, 4);
                        const __m512i hh = c % 2 ? _mm512_srli_epi16(h, 2) : _mm512_slli_epi16(h, 2);
                        lo[g] = _mm512_ternarylogic_epi32(lo[g], hl, high2, 0xf8);  // lo | (hl & 0x30)
                        hi[g] = _mm512_ternarylogic_epi32(hi[g], hh, high2, 0xf8);
                    }
                }
                for (int t = 0; t < MR; t++) {
                    const __m512i xl = bcast4(x + size_t(t) * Kp + 8 * c), xh = bcast4(x + size_t(t) * Kp + 8 * c + 4);
                    for (int g = 0; g < NG; g++) {
                        acc[t * NG + g] = _mm512_dpbusd_epi32(acc[t * NG + g], lo[g], xl);
                        acc[t * NG + g] = _mm512_dpbusd_epi32(acc[t * NG + g], hi[g], xh);
                    }
                }
            }
        } else {
            for (int c = 0; c < 8; c++) {
                __m512i w[NG];
                for (int g = 0; g < NG; g++) w[g] = _mm512_loadu_si512(blk + g * group_bytes + 32 + 64 * c);
                for (int t = 0; t < MR; t++) {
                    const __m512i xc = bcast4(x + size_t(t) * Kp + 4 * c);
                    for (int g = 0; g < NG; g++) acc[t * NG + g] = _mm512_dpbusd_epi32(acc[t * NG + g], w[g], xc);
                }
            }
        }
        __m512 wscale[NG];
        for (int g = 0; g < NG; g++)
            wscale[g] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + g * group_bytes)));
        for (int t = 0; t < MR; t++) {
            const __m512 d = _mm512_set1_ps(xd[size_t(t) * B + b]);
            for (int g = 0; g < NG; g++)
                sums[t * NG + g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t * NG + g]), _mm512_mul_ps(wscale[g], d),
                                                   sums[t * NG + g]);
        }
    }
}

// Y rows of MR tokens x NG row groups (16 rows each; the first `rows` of them stored).
template <DType T, int MR, int NG>
static void q_rows(const int8_t* xq, const float* xd, const int32_t* nzs, int B, const uint8_t* group,
                   size_t group_bytes, const float* bias, float* Y, int ldy, int rows) {
    __m512 sums[MR * NG];
    __mmask16 mask[NG];
    for (int g = 0; g < NG; g++) {
        const int left = rows - 16 * g;
        mask[g] = left >= 16 ? __mmask16(0xffff) : tail_mask(left);
        const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask[g], bias + 16 * g) : _mm512_setzero_ps();
        for (int t = 0; t < MR; t++) sums[t * NG + g] = bv;
    }
    q_tile<MR, NG, T>(xq, xd, nzs, B, group, group_bytes, sums);
    for (int t = 0; t < MR; t++)
        for (int g = 0; g < NG; g++) _mm512_mask_storeu_ps(Y + size_t(t) * ldy + 16 * g, mask[g], sums[t * NG + g]);
}

template <DType T>
static void matmul_q(const float*, int, const int8_t* xq, const float* xd, const int32_t* xs, int M, int K, const uint8_t* W,
                     const float* bias, float* Y, int ldy, int n0, int n1) {
    const int B = q_blocks(K), Kp = B * kQBlock;
    const size_t group_bytes = size_t(B) * q_block_bytes(T);
    static thread_local ThreadScratch<int32_t> scratch;
    int32_t* nzs = scratch.get(size_t(M) * B);
    for (size_t i = 0; i < size_t(M) * B; i++) nzs[i] = -q_zero_point(T) * xs[i];
    // A block of up to 64 tokens (64 * Kp bytes of activations, in L2) meets every row group of
    // [n0, n1); two row groups at a time are reused across the block 4 tokens at a time: on one Zen 4
    // core, Qwen2.5-0.5B's q4 / q8 matrices at 512 tokens ran at 320 / 310 GOP/s against 290 / 280
    // with one group (4 x 1, 8 x 1 and 6 x 2 tiles were no faster). Decode (one token) keeps one
    // group, one stream of weights.
    constexpr int MR = 4, NG = 2;
    constexpr int kTokenBlock = 64;
    const int step = M == 1 ? kQRows : NG * kQRows;
    for (int m0 = 0; m0 < M; m0 += kTokenBlock) {
        const int m1 = imin(M, m0 + kTokenBlock);
        for (int n = n0; n < n1; n += step) {
            const uint8_t* group = W + size_t(n / kQRows) * group_bytes;
            const int rows = imin(step, n1 - n);
            const float* bn = bias ? bias + n : nullptr;
            auto run = [&](int m, auto mr) {
                const size_t a = size_t(m) * B;
                if (rows > kQRows)
                    q_rows<T, decltype(mr)::value, NG>(xq + size_t(m) * Kp, xd + a, nzs + a, B, group, group_bytes,
                                                        bn, Y + size_t(m) * ldy + n, ldy, rows);
                else
                    q_rows<T, decltype(mr)::value, 1>(xq + size_t(m) * Kp, xd + a, nzs + a, B, group, group_bytes,
                                                       bn, Y + size_t(m) * ldy + n, ldy, rows);
            };
            int m = m0;
            for (; m + MR <= m1; m += MR) run(m, std::integral_constant<int, MR>());
            for (; m < m1; m++) run(m, std::integral_constant<int, 1>());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Decode attention (kernels.h): up to 8 heads that share a KV head are held in registers at once.
// A block of 32 keys is two vectors of 16 scores per head (16 of the 32 registers) with each K vector
// loaded once for all of them; the block's softmax runs on those registers; then P V over 32 columns
// at a time (16 accumulators, each V vector loaded once for every head). More heads than 8 go in
// groups (G = 12: 6 + 6), each reading the block again from L1. Zen 4 splits a 512-bit FMA in two,
// so there it is as fast as the AVX2 kernel (0.166 ms for 7 heads x 8k keys x 64 in L1, both near the
// FMA bound: 1792 512-bit FMAs a block); a CPU with two 512-bit FMA units has twice the peak. Over a
// bf16 cache (attend_block_bf16) a block is 896 bf16 dot products and no f16 widening: 0.085 ms.

constexpr int kAttnHeads = 8;            // 2 x 8 score or output accumulators, 2 K or V vectors
constexpr int kAttnGroups = 8;           // more heads per KV head than 64 go to the AVX2 kernel
static_assert(kAttnBlock == 32 && kKeyBlock == 16, "a block is two key blocks, a vector of 16 keys each");

// The d-th element of a key block's 16 keys (kernels.h), kb pointing at that row of the block.
static inline __m512 load_keys16(const float* kb) { return _mm512_loadu_ps(kb); }
static inline __m512 load_keys16(const uint16_t* kb) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kb)));
}
static inline __m512 load_values16(const float* v) { return _mm512_loadu_ps(v); }
static inline __m512 load_values16(const uint16_t* v) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v)));
}

// 2^x for x <= 0, as the AVX2 kernel's exp2_nonpositive (kExp2Taylor, numeric.h), with vscalef
// putting in the 2^n.
static inline __m512 exp2_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-126.f));
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(kExp2Taylor[0]);
    for (int k = 1; k < 7; k++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExp2Taylor[k]));
    return _mm512_scalef_ps(p, n);
}

// The block's softmax step for one head, from its 32 scores (s0: keys 0-15, s1: 16-31; keys outside
// in0 / in1 score -inf): e0, e1 = 2^(scale s - m) with the running max m raised to the block's max.
// Returns c, the factor by which the head's output so far must be scaled (vsum is scaled here); the
// caller adds the weights it uses to vsum.
static inline float block_exp(__m512 s0, __m512 s1, __mmask16 in0, __mmask16 in1, __m512 vscale, float& m,
                              __m512& vsum, __m512& e0, __m512& e1) {
    const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
    const __m512 a = _mm512_mask_mul_ps(minus_inf, in0, s0, vscale);
    const __m512 b = _mm512_mask_mul_ps(minus_inf, in1, s1, vscale);
    const float mx = _mm512_reduce_max_ps(_mm512_max_ps(a, b));
    float c = 1.f;
    if (mx > m) {
        c = exp2f(m - mx);  // m = -inf on the first block: 0
        m = mx;
        vsum = _mm512_mul_ps(vsum, _mm512_set1_ps(c));
    }
    const __m512 vm = _mm512_set1_ps(m);
    e0 = _mm512_maskz_mov_ps(in0, exp2_nonpositive(_mm512_sub_ps(a, vm)));
    e1 = _mm512_maskz_mov_ps(in1, exp2_nonpositive(_mm512_sub_ps(b, vm)));
    return c;
}

// Masks of the keys of a block of nb that are there: keys 0-15, 16-31.
static inline __mmask16 keys_in_lo(int nb) { return nb >= 16 ? __mmask16(0xffff) : tail_mask(nb); }
static inline __mmask16 keys_in_hi(int nb) {
    return nb >= 32 ? __mmask16(0xffff) : nb > 16 ? tail_mask(nb - 16) : __mmask16(0);
}

// P V's accumulators for columns c0..c0+31 of H output rows: what the rows hold, scaled by c[h] (the
// running max moved); and back.
template <int H>
static inline void scaled_out(const float* o, int D, int c0, const float* c, __m512 (*acc)[2]) {
    for (int h = 0; h < H; h++) {
        const __m512 ch = _mm512_set1_ps(c[h]);
        acc[h][0] = _mm512_mul_ps(_mm512_loadu_ps(o + h * D + c0), ch);
        acc[h][1] = _mm512_mul_ps(_mm512_loadu_ps(o + h * D + c0 + 16), ch);
    }
}
template <int H>
static inline void store_out(float* o, int D, int c0, const __m512 (*acc)[2]) {
    for (int h = 0; h < H; h++) {
        _mm512_storeu_ps(o + h * D + c0, acc[h][0]);
        _mm512_storeu_ps(o + h * D + c0 + 16, acc[h][1]);
    }
}

// H heads (q and o rows of D) over one block of nb <= 32 keys: kb its 4 key blocks (all readable),
// v its nb value rows. m[h] is the running max of the base-2 scores, vsum[h] the running sum of
// 2^(s - m) in 16 lanes; o[h] is scaled when m moves. p holds the block's H x 32 probabilities.
// With pk / pv set, the next-but-one block's K and V there are asked for into L2, over the FMAs.
template <int H, int D, class KV>
static void attend_block(const float* q, const KV* kb, const KV* v, int nb, __m512 vscale, float* m, __m512* vsum,
                         float* p, float* o, const KV* pk, const KV* pv) {
    __m512 s[H][2];
    for (int h = 0; h < H; h++) s[h][0] = s[h][1] = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int d = 0; d < D; d++) {
        if (pk) prefetch_step<kAttnBlock * sizeof(KV), 2>(reinterpret_cast<const char*>(pk), d);
        const __m512 k0 = load_keys16(kb + d * kKeyBlock);        // keys 0-15
        const __m512 k1 = load_keys16(kb + (D + d) * kKeyBlock);  // keys 16-31
        for (int h = 0; h < H; h++) {
            const __m512 qd = _mm512_set1_ps(q[h * D + d]);
            s[h][0] = _mm512_fmadd_ps(qd, k0, s[h][0]);
            s[h][1] = _mm512_fmadd_ps(qd, k1, s[h][1]);
        }
    }
    float c[H];
    for (int h = 0; h < H; h++) {
        __m512 e0, e1;
        c[h] = block_exp(s[h][0], s[h][1], keys_in_lo(nb), keys_in_hi(nb), vscale, m[h], vsum[h], e0, e1);
        vsum[h] = _mm512_add_ps(vsum[h], _mm512_add_ps(e0, e1));
        _mm512_storeu_ps(p + h * kAttnBlock, e0);
        _mm512_storeu_ps(p + h * kAttnBlock + 16, e1);
    }
    for (int c0 = 0; c0 < D; c0 += 32) {
        __m512 acc[H][2];
        scaled_out<H>(o, D, c0, c, acc);
#pragma GCC unroll 2
        for (int t = 0; t < nb; t++) {
            // the next-but-one block's V, over the D / 32 passes of kAttnBlock rows
            if (pv) prefetch_step<kAttnBlock * sizeof(KV), 2>(reinterpret_cast<const char*>(pv), c0 + t);
            const __m512 v0 = load_values16(v + size_t(t) * D + c0), v1 = load_values16(v + size_t(t) * D + c0 + 16);
            for (int h = 0; h < H; h++) {
                const __m512 pt = _mm512_set1_ps(p[h * kAttnBlock + t]);
                acc[h][0] = _mm512_fmadd_ps(pt, v0, acc[h][0]);
                acc[h][1] = _mm512_fmadd_ps(pt, v1, acc[h][1]);
            }
        }
        store_out<H>(o, D, c0, acc);
    }
}

// The same over a bf16 cache (kernels.h), with `vdpbf16ps`: each instruction sums 32 products into 16
// lanes, so a block takes half the multiply-add instructions of the f32 FMA kernel, and no f16
// conversions. q arrives as H rows of D / 2 bf16 pairs. Scores: a lane is a key, a pair is two
// dimensions (one 64-byte load of the key block is dimensions 2j, 2j+1 of 16 keys). P V: a lane is an
// output dimension, a pair is two positions (one load of the values is positions 2u, 2u+1 of 16
// dimensions), with the probabilities rounded to bf16 and the running sum taken of the rounded ones.
// kb and v hold a whole block (the caller pads a last part-filled one with zeros).
template <int H, int D>
static void attend_block_bf16(const uint32_t* q, const uint16_t* kb, const uint16_t* v, int nb, __m512 vscale,
                              float* m, __m512* vsum, float* p_, float* o, const uint16_t* pk, const uint16_t* pv) {
    constexpr int kPairs = kAttnBlock / 2;  // position pairs in a block
    uint32_t* p = reinterpret_cast<uint32_t*>(p_);  // H rows of kPairs bf16 pairs
    __m512 s[H][2];
    for (int h = 0; h < H; h++) s[h][0] = s[h][1] = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int j = 0; j < D / 2; j++) {
        if (pk) prefetch_step<kAttnBlock * 4, 2>(reinterpret_cast<const char*>(pk), j);
        const __m512bh k0 = __m512bh(_mm512_loadu_si512(kb + j * 2 * kKeyBlockBf16));            // keys 0-15
        const __m512bh k1 = __m512bh(_mm512_loadu_si512(kb + (D / 2 + j) * 2 * kKeyBlockBf16));  // keys 16-31
        for (int h = 0; h < H; h++) {
            const __m512bh qj = __m512bh(_mm512_set1_epi32(int(q[h * (D / 2) + j])));
            s[h][0] = _mm512_dpbf16_ps(s[h][0], qj, k0);
            s[h][1] = _mm512_dpbf16_ps(s[h][1], qj, k1);
        }
    }
    float c[H];
    for (int h = 0; h < H; h++) {
        __m512 e0, e1;
        c[h] = block_exp(s[h][0], s[h][1], keys_in_lo(nb), keys_in_hi(nb), vscale, m[h], vsum[h], e0, e1);
        const __m512i pb = __m512i(_mm512_cvtne2ps_pbh(e1, e0));  // bf16 p[0..31]
        const __m512 r0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(pb)), 16));
        const __m512 r1 =
            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(pb, 1)), 16));
        vsum[h] = _mm512_add_ps(vsum[h], _mm512_add_ps(r0, r1));
        _mm512_storeu_si512(p + h * kPairs, pb);
    }
    for (int c0 = 0; c0 < D; c0 += 32) {
        __m512 acc[H][2];
        scaled_out<H>(o, D, c0, c, acc);
#pragma GCC unroll 2
        for (int u = 0; u < kPairs; u++) {
            // the next-but-one block's V, over the D / 32 passes of kPairs pair rows
            if (pv) prefetch_step<kAttnBlock * 4, 2>(reinterpret_cast<const char*>(pv), c0 / 2 + u);
            const uint16_t* vu = v + (size_t(u) * D + c0) * 2;
            const __m512bh v0 = __m512bh(_mm512_loadu_si512(vu)), v1 = __m512bh(_mm512_loadu_si512(vu + 32));
            for (int h = 0; h < H; h++) {
                const __m512bh pu = __m512bh(_mm512_set1_epi32(int(p[h * kPairs + u])));
                acc[h][0] = _mm512_dpbf16_ps(acc[h][0], pu, v0);
                acc[h][1] = _mm512_dpbf16_ps(acc[h][1], pu, v1);
            }
        }
        store_out<H>(o, D, c0, acc);
    }
}

// Q: q as the block kernel takes it, f32 rows (float) or, for a bf16 cache, rows of bf16 pairs (uint32_t).
template <class KV, class Q>
using AttendBlockFn = void (*)(const Q*, const KV*, const KV*, int, __m512, float*, __m512*, float*, float*,
                               const KV*, const KV*);
template <int D, class KV, class Q>
static AttendBlockFn<KV, Q> attend_block_fn_d(int H) {
    if constexpr (std::is_same_v<Q, uint32_t>) {
        static const AttendBlockFn<KV, Q> f[kAttnHeads] = {
            attend_block_bf16<1, D>, attend_block_bf16<2, D>, attend_block_bf16<3, D>, attend_block_bf16<4, D>,
            attend_block_bf16<5, D>, attend_block_bf16<6, D>, attend_block_bf16<7, D>, attend_block_bf16<8, D>};
        return f[H - 1];
    } else {
        static const AttendBlockFn<KV, Q> f[kAttnHeads] = {
            attend_block<1, D, KV>, attend_block<2, D, KV>, attend_block<3, D, KV>, attend_block<4, D, KV>,
            attend_block<5, D, KV>, attend_block<6, D, KV>, attend_block<7, D, KV>, attend_block<8, D, KV>};
        return f[H - 1];
    }
}

// One pass over the keys a block at a time, every group of heads taking the block in turn (the
// Qwen2 head sizes 64 and 128; the caller hands other sizes, or more than 64 heads, elsewhere). Q is
// float (f32 / f16 cache) or uint32_t (bf16 cache: q as bf16 pairs, K and V in the bf16 layouts).
template <class KV, class Q>
static void attend_blocks(const Q* q, int G, int D, const KV* K, const KV* V, int n_keys, float scale,
                          float* scratch, float* out, float* lse) {
    constexpr bool kBf16 = std::is_same_v<Q, uint32_t>;
    const int groups = (G + kAttnHeads - 1) / kAttnHeads;
    AttendBlockFn<KV, Q> fn[kAttnGroups];
    int first[kAttnGroups + 1];
    first[0] = 0;
    for (int i = 0; i < groups; i++) {  // as even as can be
        const int H = (G - first[i]) / (groups - i);
        fn[i] = D == 64 ? attend_block_fn_d<64, KV, Q>(H) : attend_block_fn_d<128, KV, Q>(H);
        first[i + 1] = first[i] + H;
    }
    const int qrow = kBf16 ? D / 2 : D;  // q elements per head
    float m[kAttnHeads * kAttnGroups];
    __m512 vsum[kAttnHeads * kAttnGroups];
    for (int g = 0; g < G; g++) m[g] = -INFINITY, vsum[g] = _mm512_setzero_ps();
    for (int i = 0; i < G * D; i++) out[i] = 0.f;
    const __m512 vscale = _mm512_set1_ps(scale * kLog2e);  // scores in base 2: exp(x) = 2^(x log2 e)
    // a last part-filled block's K (and bf16 V), padded with zeros to a whole block: the positions past
    // the last are not there to read
    alignas(64) KV ktail[kAttnBlock * 128];
    alignas(64) KV vtail[kBf16 ? kAttnBlock * 128 : 1];

    for (int t0 = 0; t0 < n_keys; t0 += kAttnBlock) {
        const int nb = imin(kAttnBlock, n_keys - t0);
        const KV* kb = K + size_t(t0) * D;  // a block starts at t0 * D in every layout (kernels.h)
        const KV* vb = V + size_t(t0) * D;
        if (nb < kAttnBlock) {
            const size_t have = size_t(key_positions(nb)) * D;
            for (size_t i = 0; i < size_t(kAttnBlock) * D; i++) ktail[i] = i < have ? kb[i] : KV(0);
            kb = ktail;
            if constexpr (kBf16) {  // whole position pairs, the one past an odd nb zeroed
                const size_t pairs = size_t(nb + 1) / 2 * 2 * D;
                for (size_t i = 0; i < size_t(kAttnBlock) * D; i++) vtail[i] = i < pairs ? vb[i] : KV(0);
                if (nb % 2)
                    for (int d = 0; d < D; d++) vtail[value_offset_bf16(nb, d, D)] = 0;
                vb = vtail;
            }
        }
        const bool ask = t0 + kAttnAhead + kAttnBlock <= n_keys;
        for (int i = 0; i < groups; i++) {
            const bool a = ask && i == 0;
            fn[i](q + size_t(first[i]) * qrow, kb, vb, nb, vscale, m + first[i], vsum + first[i],
                  scratch + size_t(first[i]) * kAttnBlock, out + size_t(first[i]) * D,
                  a ? K + size_t(t0 + kAttnAhead) * D : nullptr, a ? V + size_t(t0 + kAttnAhead) * D : nullptr);
        }
    }
    for (int g = 0; g < G; g++) {
        const float sum = _mm512_reduce_add_ps(vsum[g]);
        const __m512 inv = _mm512_set1_ps(1.f / sum);
        for (int d = 0; d < D; d += 16) _mm512_storeu_ps(out + g * D + d, _mm512_mul_ps(_mm512_loadu_ps(out + g * D + d), inv));
        if (lse) lse[g] = (m[g] + log2f(sum)) * kLn2;
    }
}

static bool blocks_fit(int G, int D) { return (D == 64 || D == 128) && G <= kAttnHeads * kAttnGroups; }

static void attention_f32(const float* q, int G, int head_dim, const float* K, const float* V, int n_keys, float scale,
                          float* scratch, float* out, float* lse) {
    if (!blocks_fit(G, head_dim)) return avx2::attention_f32(q, G, head_dim, K, V, n_keys, scale, scratch, out, lse);
    attend_blocks(q, G, head_dim, K, V, n_keys, scale, scratch, out, lse);
}
static void attention_f16(const float* q, int G, int head_dim, const uint16_t* K, const uint16_t* V, int n_keys,
                          float scale, float* scratch, float* out, float* lse) {
    if (!blocks_fit(G, head_dim)) return avx2::attention_f16(q, G, head_dim, K, V, n_keys, scale, scratch, out, lse);
    attend_blocks(q, G, head_dim, K, V, n_keys, scale, scratch, out, lse);
}
static void attention_bf16(const float* q, int G, int head_dim, const uint16_t* K, const uint16_t* V, int n_keys,
                           float scale, float* scratch, float* out, float* lse) {
    if (!blocks_fit(G, head_dim)) return attention_bf16_portable(q, G, head_dim, K, V, n_keys, scale, scratch, out, lse);
    // q rounded to bf16 (to nearest even; the instruction flushes subnormals to zero): 32 floats are
    // 16 pairs, in order
    alignas(64) uint32_t qp[kAttnHeads * kAttnGroups * 64];
    for (int i = 0; i < G * head_dim; i += 32)  // head_dim 64 or 128
        _mm512_store_si512(qp + i / 2, __m512i(_mm512_cvtne2ps_pbh(_mm512_loadu_ps(q + i + 16), _mm512_loadu_ps(q + i))));
    attend_blocks(qp, G, head_dim, K, V, n_keys, scale, scratch, out, lse);
}

// ---------------------------------------------------------------------------------------------
// The instruction peaks (kernels.h): a loop of one instruction on 12 independent registers, with
// nothing from memory, is as many of them a cycle as the core can issue (the caller times it: the
// clock's inline templates must not be instantiated in this unit). In assembly, because a
// compiler given the same loop in C may keep the sums in memory (a first try here measured half).

#define QWEN2RT_REPEAT12(op)                                                                                        \
    op " %%zmm30, %%zmm31, %%zmm0\n" op " %%zmm30, %%zmm31, %%zmm1\n" op " %%zmm30, %%zmm31, %%zmm2\n"          \
    op " %%zmm30, %%zmm31, %%zmm3\n" op " %%zmm30, %%zmm31, %%zmm4\n" op " %%zmm30, %%zmm31, %%zmm5\n"           \
    op " %%zmm30, %%zmm31, %%zmm6\n" op " %%zmm30, %%zmm31, %%zmm7\n" op " %%zmm30, %%zmm31, %%zmm8\n"           \
    op " %%zmm30, %%zmm31, %%zmm9\n" op " %%zmm30, %%zmm31, %%zmm10\n" op " %%zmm30, %%zmm31, %%zmm11\n"
#define QWEN2RT_PEAK_LOOP(op, iters)                                                                                \
    __asm__ volatile("vpxord %%zmm30, %%zmm30, %%zmm30\n vpxord %%zmm31, %%zmm31, %%zmm31\n mov %0, %%rcx\n"   \
                     "1:\n" QWEN2RT_REPEAT12(op) "dec %%rcx\n jnz 1b\n"                                          \
                     :                                                                                           \
                     : "r"(iters)                                                                                \
                     : "rcx", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",    \
                       "xmm10", "xmm11", "xmm30", "xmm31", "cc")

void multiply_add_loop(MultiplyAdd op, long iters) {
    switch (op) {
        case MultiplyAdd::F32: QWEN2RT_PEAK_LOOP("vfmadd231ps", iters); break;
        case MultiplyAdd::Bf16: QWEN2RT_PEAK_LOOP("vdpbf16ps", iters); break;
        case MultiplyAdd::Int8: QWEN2RT_PEAK_LOOP("vpdpbusd", iters); break;
    }
}
#undef QWEN2RT_PEAK_LOOP
#undef QWEN2RT_REPEAT12

static const Kernels table = {
    "avx512",  matmul_f32, matmul_bf16, rmsnorm,   rope_portable, silu_mul, attention_f32, attention_f16, attention_bf16,
    add,
    quantize_acts, matmul_q<DType::Q8>, matmul_q<DType::Q4>, matmul_q<DType::Q6>, matmul_bf16_swiglu, matmul_bf16_panels, matmul_bf16_add,
};

}  // namespace avx512

const Kernels* kernels_avx512() { return &avx512::table; }

}  // namespace qwen2rt
