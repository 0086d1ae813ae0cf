// AMX kernels: the bf16 prefill on the tile unit (TDPBF16PS), for CPUs with AMX-BF16 (Intel Xeon
// from Sapphire Rapids on). The "amx" table is the AVX-512 one with matmul_bf16 replaced for
// prompts of 16 tokens or more; everything else, decode included (memory-bound), stays AVX-512.
//
// The same kernel is compiled twice, over two tile backends with one interface:
//   AmxTiles      the instructions, as inline assembly;
//   EmulatedTiles the instructions' documented semantics in plain C++, on a thread-local tile file.
// The "amx-emulated" table (never picked by detection; tests and QWEN2RT_ISA can name it) runs the
// whole kernel -- token packing, tile shapes, strides, edges -- on any AVX-512 CPU, so the test
// suite checks it against numpy on machines without AMX. On a machine with AMX, amx_usable() also
// runs both backends on one product before it lists "amx", and leaves AMX out (with a warning) if
// they disagree.
//
// Why inline assembly and not the _tile_* intrinsics: gcc 12 declares _tile_loadconfig as reading
// only 8 of the configuration's 64 bytes, so it may drop the stores that fill the rest (llama.cpp
// issue #20824 is that miscompile). Here `ldtilecfg` takes the whole 64-byte struct as its memory
// operand, and every tile load and store clobbers memory, so the compiler keeps every write it needs.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "cpu_features.h"
#include "kernels.h"
#include "numeric.h"
#include "quant.h"

namespace qwen2rt {
namespace amx {

static inline int imin(int a, int b) { return a < b ? a : b; }

// The 64-byte operand of ldtilecfg (palette 1: eight tiles of up to 16 rows of 64 bytes).
struct alignas(64) TileConfig {
    uint8_t palette = 1;
    uint8_t start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {};  // bytes per row of tile i
    uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "ldtilecfg reads 64 bytes");

#if defined(QWEN2RT_AMX_ASM)
struct AmxTiles {
    static void configure(const TileConfig& c) { __asm__ volatile("ldtilecfg %0" : : "m"(c) : "memory"); }
    static void release() { __asm__ volatile("tilerelease" : : : "memory"); }
    template <int T>
    static void zero() {
        __asm__ volatile("tilezero %%tmm%c0" : : "i"(T));
    }
    template <int T>
    static void load(const void* p, size_t stride) {
        __asm__ volatile("tileloadd (%0,%1,1), %%tmm%c2" : : "r"(p), "r"(stride), "i"(T) : "memory");
    }
    template <int T>
    static void store(void* p, size_t stride) {
        __asm__ volatile("tilestored %%tmm%c2, (%0,%1,1)" : : "r"(p), "r"(stride), "i"(T) : "memory");
    }
    // C += A B: A rows of bf16 pairs, B rows of pairs for each of C's columns (AT&T order: B, A, C)
    template <int C, int A, int B>
    static void dp_bf16() {
        __asm__ volatile("tdpbf16ps %%tmm%c2, %%tmm%c1, %%tmm%c0" : : "i"(C), "i"(A), "i"(B));
    }
};
#endif

// What the instructions do (Intel SDM, "Intel AMX Instruction Set Reference"): rows past a tile's
// configured shape read as zero, and a load or a product zeroes them.
struct EmulatedTiles {
    struct File {
        TileConfig cfg;
        alignas(64) uint8_t t[8][16][64];
    };
    static File& file() {
        static thread_local File f;
        return f;
    }
    static void configure(const TileConfig& c) {
        file().cfg = c;
        std::memset(file().t, 0, sizeof(file().t));
    }
    static void release() { std::memset(file().t, 0, sizeof(file().t)); }
    template <int T>
    static void zero() {
        std::memset(file().t[T], 0, sizeof(file().t[T]));
    }
    template <int T>
    static void load(const void* p, size_t stride) {
        File& f = file();
        std::memset(f.t[T], 0, sizeof(f.t[T]));
        for (int r = 0; r < f.cfg.rows[T]; r++)
            std::memcpy(f.t[T][r], static_cast<const uint8_t*>(p) + size_t(r) * stride, f.cfg.colsb[T]);
    }
    template <int T>
    static void store(void* p, size_t stride) {
        File& f = file();
        for (int r = 0; r < f.cfg.rows[T]; r++)
            std::memcpy(static_cast<uint8_t*>(p) + size_t(r) * stride, f.t[T][r], f.cfg.colsb[T]);
    }
    template <int C, int A, int B>
    static void dp_bf16() {
        File& f = file();
        for (int m = 0; m < f.cfg.rows[C]; m++) {
            float c[16];
            std::memcpy(c, f.t[C][m], 64);
            uint16_t a[32];
            std::memcpy(a, f.t[A][m], 64);
            for (int k = 0; k < f.cfg.colsb[A] / 4; k++) {
                uint16_t b[32];
                std::memcpy(b, f.t[B][k], 64);
                for (int n = 0; n < f.cfg.colsb[C] / 4; n++) {
                    c[n] += bf16_to_f32(a[2 * k]) * bf16_to_f32(b[2 * n]);
                    c[n] += bf16_to_f32(a[2 * k + 1]) * bf16_to_f32(b[2 * n + 1]);
                }
            }
            std::memcpy(f.t[C][m], c, 64);
        }
    }
};

// ---------------------------------------------------------------------------------------------
// Y = X W^T for bf16 W, in tiles.
//
// A packed bf16 matrix (quant.h) keeps, for each group of 8 rows and block of 32 columns, the 8
// rows' 32 values one row after another: 512 contiguous bytes, which is an A tile of 8 rows of 64
// bytes as it lies, with no repacking. The tokens are the B operand, which TDPBF16PS wants in
// pairs: row r of a B tile is, for each of 16 tokens, its columns 2r and 2r + 1. They are rounded
// to bf16 into that layout once per call (as the AVX-512 prefill rounds them), 16 tokens x 32
// columns a 1 KiB tile, [token tile][column block][pair][token][2].
//
// The tiles: C[i][j] in tmm 2i + j (weight group i of two, token tile j of two): 8 rows (weight
// rows) x 16 f32 (tokens); A[i] in tmm 4 + i; B[j] in tmm 6 + j. Each column block loads 2 A and 2
// B tiles for 4 products: 16 weight rows x 32 tokens x 32 columns.

constexpr int kTileTokens = 16;
constexpr int kTokenBlock = 128;  // tokens whose packed tiles (up to 1.2 MiB at K = 4864) stay in L2

// 16 vectors of 16 uint32 transposed: out[i] lane j = in[j] lane i.
static inline void transpose16(__m512i* v) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        v[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        v[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        v[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        v[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    // v[4q + s] now holds, in each 128-bit lane L, element s of rows 4q .. 4q + 3 of that lane's
    // columns 4L .. 4L + 3; the lanes are gathered across quads of rows
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_i32x4(v[i], v[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_i32x4(v[i], v[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_i32x4(v[i + 8], v[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(v[i + 8], v[i + 12], 0xdd);
    }
    for (int i = 0; i < 4; i++) {
        v[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        v[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
        v[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
        v[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
    }
}

// X [M, K] f32 -> B tiles (above) for token tiles 0 .. ceil(M / 32) * 2, zero past M and K: a
// per-thread buffer that grows to the largest call.
static const uint16_t* tokens_to_tiles(const float* X, int ldx, int M, int K) {
    static thread_local uint16_t* buf = nullptr;
    static thread_local size_t cap = 0;
    const int nb = q_blocks(K);
    const int tiles = (M + 2 * kTileTokens - 1) / (2 * kTileTokens) * 2;
    const size_t need = size_t(tiles) * size_t(nb) * 512;
    if (need > cap) {
        free(buf);
        cap = need;
        buf = static_cast<uint16_t*>(aligned_alloc(64, cap * 2));
    }
    for (int tt = 0; tt < tiles; tt++)
        for (int b = 0; b < nb; b++) {
            const int k = b * kQBlock;
            const __mmask16 lo = k + 16 <= K ? __mmask16(0xffff) : __mmask16((1u << (K - k)) - 1u);
            const __mmask16 hi = k + 32 <= K ? __mmask16(0xffff) : k + 16 < K ? __mmask16((1u << (K - k - 16)) - 1u) : 0;
            __m512i v[16];
            for (int t = 0; t < kTileTokens; t++) {
                const int m = tt * kTileTokens + t;
                if (m >= M) {
                    v[t] = _mm512_setzero_si512();
                    continue;
                }
                const float* x = X + size_t(m) * ldx + k;
                v[t] = __m512i(_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, x + 16), _mm512_maskz_loadu_ps(lo, x)));
            }
            transpose16(v);  // v[r] lane t: token t's pair r
            uint16_t* out = buf + (size_t(tt) * nb + b) * 512;
            for (int r = 0; r < 16; r++) _mm512_store_si512(out + r * 32, v[r]);
        }
    return buf;
}

// C[i][j] (8 weight rows x 16 tokens) into Y, transposed, for the rows below n1 and tokens below M.
template <class Tiles, int C>
static void store_c(float* Y, int ldy, int M, int m, int n, int n1, const float* bias) {
    alignas(64) float c[8][16];
    Tiles::template store<C>(c, 64);
    for (int r = 0; r < 8 && n + r < n1; r++) {
        const float b = bias ? bias[n + r] : 0.f;
        for (int t = 0; t < 16 && m + t < M; t++) Y[size_t(m + t) * ldy + n + r] = c[r][t] + b;
    }
}

// Weight rows [n, n + 8 * NG) of groups starting at Wg (group stride gstride uint16s) against
// token tiles tt, tt + 1, over nb column blocks.
template <class Tiles, int NG>
static void tile_pass(const uint16_t* Wg, size_t gstride, const uint16_t* xt, int nb, int tt, float* Y, int ldy, int M,
                      int n, int n1, const float* bias) {
    Tiles::template zero<0>();
    Tiles::template zero<1>();
    if (NG == 2) {
        Tiles::template zero<2>();
        Tiles::template zero<3>();
    }
    const uint16_t* b0 = xt + size_t(tt) * nb * 512;
    const uint16_t* b1 = b0 + size_t(nb) * 512;
    for (int b = 0; b < nb; b++) {
        Tiles::template load<4>(Wg + size_t(b) * 256, 64);
        Tiles::template load<6>(b0 + size_t(b) * 512, 64);
        Tiles::template load<7>(b1 + size_t(b) * 512, 64);
        Tiles::template dp_bf16<0, 4, 6>();
        Tiles::template dp_bf16<1, 4, 7>();
        if (NG == 2) {
            Tiles::template load<5>(Wg + gstride + size_t(b) * 256, 64);
            Tiles::template dp_bf16<2, 5, 6>();
            Tiles::template dp_bf16<3, 5, 7>();
        }
    }
    const int m = tt * kTileTokens;
    store_c<Tiles, 0>(Y, ldy, M, m, n, n1, bias);
    store_c<Tiles, 1>(Y, ldy, M, m + kTileTokens, n, n1, bias);
    if (NG == 2) {
        store_c<Tiles, 2>(Y, ldy, M, m, n + 8, n1, bias);
        store_c<Tiles, 3>(Y, ldy, M, m + kTileTokens, n + 8, n1, bias);
    }
}

template <class Tiles>
static void matmul_bf16_tiles(const float* X, int ldx, int M, int K, const uint16_t* W, const float* bias, float* Y,
                              int ldy, int n0, int n1) {
    const int nb = q_blocks(K);
    const uint16_t* xt = tokens_to_tiles(X, ldx, M, K);
    TileConfig cfg;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = t < 6 ? 8 : 16;  // C and A: 8 rows; B: 16 rows of pairs
    }
    Tiles::configure(cfg);
    const size_t gstride = size_t(nb) * kBf16Rows * kQBlock;  // uint16s from one row group to the next
    for (int m0 = 0; m0 < M; m0 += kTokenBlock) {
        const int m1 = imin(M, m0 + kTokenBlock);
        for (int n = n0; n < n1; n += 2 * kBf16Rows) {
            const uint16_t* Wg = bf16_row(W, K, n);
            for (int tt = m0 / kTileTokens; tt * kTileTokens < m1; tt += 2) {
                if (n1 - n > kBf16Rows)
                    tile_pass<Tiles, 2>(Wg, gstride, xt, nb, tt, Y, ldy, m1, n, n1, bias);
                else
                    tile_pass<Tiles, 1>(Wg, gstride, xt, nb, tt, Y, ldy, m1, n, n1, bias);
            }
        }
    }
    Tiles::release();  // the thread's tile state is dropped: no 8 KiB to save at each context switch
}

// Fewer tokens than a tile: the AVX-512 kernels (decode is memory-bound; a few tokens fill too
// little of a tile to pay for packing).
constexpr int kMinTokens = kTileTokens;

static void matmul_bf16_emulated(const float* X, int ldx, int M, int K, const uint16_t* W, const float* bias, float* Y,
                                 int ldy, int n0, int n1) {
    if (M < kMinTokens) return kernels_avx512()->matmul_bf16(X, ldx, M, K, W, bias, Y, ldy, n0, n1);
    matmul_bf16_tiles<EmulatedTiles>(X, ldx, M, K, W, bias, Y, ldy, n0, n1);
}

static Kernels with_matmul_bf16(const char* isa, decltype(Kernels::matmul_bf16) f) {
    Kernels k = *kernels_avx512();
    k.isa = isa;
    k.matmul_bf16 = f;
    return k;
}

#if defined(QWEN2RT_AMX_ASM)
static void matmul_bf16_amx(const float* X, int ldx, int M, int K, const uint16_t* W, const float* bias, float* Y,
                            int ldy, int n0, int n1) {
    if (M < kMinTokens) return kernels_avx512()->matmul_bf16(X, ldx, M, K, W, bias, Y, ldy, n0, n1);
    matmul_bf16_tiles<AmxTiles>(X, ldx, M, K, W, bias, Y, ldy, n0, n1);
}

// Linux hands out the 8 KiB of tile state only to a process that asks (arch_prctl
// ARCH_REQ_XCOMP_PERM for XTILEDATA); without it the first tile instruction faults.
static bool request_tile_state() {
#if defined(__linux__)
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
}

// One product through both backends: a wrong encoding, shape or configuration shows here rather
// than in a model's output.
static bool hardware_agrees_with_emulation() {
    const int M = 40, K = 200, N = 24;
    std::vector<float> X(size_t(M) * K), Wf(size_t(N) * K), bias(N), y_hw(size_t(M) * N), y_emu(size_t(M) * N);
    uint32_t s = 12345;
    auto next = [&] {
        s = s * 1664525u + 1013904223u;
        return float(int(s >> 9) - (1 << 22)) / float(1 << 22);
    };
    for (float& v : X) v = next();
    for (float& v : Wf) v = next();
    for (float& v : bias) v = next();
    std::vector<uint16_t> W(bf16_bytes(N, K) / 2);
    pack_bf16(Wf.data(), N, K, size_t(K), W.data(), 1);
    matmul_bf16_tiles<AmxTiles>(X.data(), K, M, K, W.data(), bias.data(), y_hw.data(), N, 0, N);
    matmul_bf16_tiles<EmulatedTiles>(X.data(), K, M, K, W.data(), bias.data(), y_emu.data(), N, 0, N);
    for (size_t i = 0; i < y_hw.size(); i++)
        if (!(std::fabs(y_hw[i] - y_emu[i]) <= 1e-4f * (1.f + std::fabs(y_emu[i])))) return false;
    return true;
}
#endif

}  // namespace amx

bool amx_usable() {
#if defined(QWEN2RT_AMX_ASM)
    static const bool ok = [] {
        const CpuFeatures& f = cpu_features();
        if (!(f.amx_tile && f.amx_bf16 && f.os_amx)) return false;
        if (!amx::request_tile_state()) return false;
        if (!amx::hardware_agrees_with_emulation()) {
            std::fprintf(stderr, "qwen2rt: the AMX kernels disagree with their emulation on this CPU; using AVX-512\n");
            return false;
        }
        return true;
    }();
    return ok;
#else
    return false;
#endif
}

const Kernels* kernels_amx_emulated() {
    static const Kernels table = amx::with_matmul_bf16("amx-emulated", amx::matmul_bf16_emulated);
    return &table;
}

const Kernels* kernels_amx() {
#if defined(QWEN2RT_AMX_ASM)
    static const Kernels table = amx::with_matmul_bf16("amx", amx::matmul_bf16_amx);
    return &table;
#else
    return nullptr;
#endif
}

}  // namespace qwen2rt
