// AMX kernels: the prefill's weight matmuls on the tile unit (TDPBF16PS), for CPUs with AMX-BF16
// (Intel Xeon from Sapphire Rapids on). The "amx" table is the AVX-512 one with its bf16, q8 and q4
// matmuls replaced for prompts of 16 tokens or more; everything else, decode included (memory-bound),
// stays AVX-512. q8 and q4 weights are dequantized to bf16 for the tiles (why: above matmul_q_tiles).
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
// Y = X W^T in tiles: the weights are the B operand and the tokens the A one, so that C is
// [16 tokens][16 weight rows], Y's own orientation. TDPBF16PS wants B in pairs: row r of a B tile
// is, for each of 16 weight rows, its columns 2r and 2r + 1. A packed bf16 group (quant.h) is
// exactly that, 32 rows wide: a B tile is 16 of its column pairs for 16 of its rows, rows of 64
// bytes 128 apart, read as it lies. q8 / q4 weights are dequantized into the same shape (below).
// The tokens are rounded to bf16 once per call, rows zero-padded to whole blocks of 32 columns
// (avx512::rows_to_bf16, as the AVX-512 prefill rounds them): an A tile is 16 tokens x 32 columns.

constexpr int kTileTokens = 16;
constexpr int kTokenBlock = 128;  // tokens whose bf16 rows (up to 1.2 MiB at K = 4864) stay in L2

// C[i][j] in tmm 2i + j = the sum over nb column blocks of A[i] (tmm 4 + i) times B[j] (tmm 6 + j),
// for i < NA, j < NB. Tile i of an operand starts at p + i * next and moves by step uint16s a
// block; its rows are stride bytes apart.
struct Operand {
    const uint16_t* p;
    size_t next, step, stride;
};
template <class Tiles, int NA, int NB>
static void accumulate(const Operand& A, const Operand& B, int nb) {
    Tiles::template zero<0>();
    if (NB == 2) Tiles::template zero<1>();
    if (NA == 2) Tiles::template zero<2>();
    if (NA == 2 && NB == 2) Tiles::template zero<3>();
    for (int b = 0; b < nb; b++) {
        const uint16_t *a = A.p + size_t(b) * A.step, *bb = B.p + size_t(b) * B.step;
        Tiles::template load<4>(a, A.stride);
        Tiles::template load<6>(bb, B.stride);
        Tiles::template dp_bf16<0, 4, 6>();
        if (NB == 2) {
            Tiles::template load<7>(bb + B.next, B.stride);
            Tiles::template dp_bf16<1, 4, 7>();
        }
        if (NA == 2) {
            Tiles::template load<5>(a + A.next, A.stride);
            Tiles::template dp_bf16<2, 5, 6>();
            if (NB == 2) Tiles::template dp_bf16<3, 5, 7>();
        }
    }
}

// C[i][j] (16 tokens x 16 weight rows) into Y, for the tokens below M and rows below n1.
template <class Tiles, int C>
static void store_rows(float* Y, int ldy, int M, int m, int n, int n1, const float* bias) {
    alignas(64) float c[16][16];
    Tiles::template store<C>(c, 64);
    const int nr = imin(kQRows, n1 - n);
    for (int t = 0; t < 16 && m + t < M; t++)
        for (int r = 0; r < nr; r++) Y[size_t(m + t) * ldy + n + r] = c[t][r] + (bias ? bias[n + r] : 0.f);
}

// Tokens [m, m + 32) against NG B tiles of 16 weight rows (tile j at weights.p + j * weights.next):
// C[i][j] is token tile i, rows n + 16j.
template <class Tiles, int NG>
static void tile_pass(const uint16_t* xb, size_t Kp, const Operand& weights, int nb, int m, float* Y, int ldy, int M,
                      int n, int n1, const float* bias) {
    const Operand tokens{xb + size_t(m) * Kp, size_t(kTileTokens) * Kp, kQBlock, Kp * 2};
    accumulate<Tiles, 2, NG>(tokens, weights, nb);
    store_rows<Tiles, 0>(Y, ldy, M, m, n, n1, bias);
    store_rows<Tiles, 2>(Y, ldy, M, m + kTileTokens, n, n1, bias);
    if (NG == 2) {
        store_rows<Tiles, 1>(Y, ldy, M, m, n + kQRows, n1, bias);
        store_rows<Tiles, 3>(Y, ldy, M, m + kTileTokens, n + kQRows, n1, bias);
    }
}

static TileConfig all_16x64() {
    TileConfig cfg;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    return cfg;
}

// bf16 W: n0 a multiple of 16 (kernels.h). Two B tiles of 16 rows a pass: the two halves of a
// group, or (from a half-way start) the second half of one and the first of the next.
template <class Tiles>
static void matmul_bf16_tiles(const float* X, int ldx, int M, int K, const uint16_t* W, const float* bias, float* Y,
                              int ldy, int n0, int n1) {
    const int nb = q_blocks(K);
    size_t Kp;  // = nb * 32
    const int rows = (M + 2 * kTileTokens - 1) / (2 * kTileTokens) * 2 * kTileTokens;  // whole token tile pairs
    const uint16_t* xb = avx512::rows_to_bf16(X, ldx, M, K, rows, Kp);
    Tiles::configure(all_16x64());
    for (int m0 = 0; m0 < M; m0 += kTokenBlock) {
        const int m1 = imin(M, m0 + kTokenBlock);
        for (int n = n0; n < n1; n += 2 * kQRows) {
            const int r0 = n % kBf16Rows;
            const uint16_t* b = reinterpret_cast<const uint16_t*>(bf16_group(W, K, n)) + 2 * r0;
            const size_t next = r0 == 0 ? 2 * kQRows : bf16_group_values(K) - 2 * kQRows;
            const Operand weights{b, next, size_t(kQBlock) * kBf16Rows, kBf16Rows * 4};
            for (int m = m0; m < m1; m += 2 * kTileTokens) {
                if (n1 - n > kQRows)
                    tile_pass<Tiles, 2>(xb, Kp, weights, nb, m, Y, ldy, m1, n, n1, bias);
                else
                    tile_pass<Tiles, 1>(xb, Kp, weights, nb, m, Y, ldy, m1, n, n1, bias);
            }
        }
    }
    Tiles::release();  // the thread's tile state is dropped: no 8 KiB to save at each context switch
}

// ---------------------------------------------------------------------------------------------
// Y = X W^T for q8 / q4 W, on the same bf16 tiles.
//
// An int8 tile product (TDPBSUD) would need its int32 sums scaled per block of 32 columns (each
// row and block has its own scale): a 16 x 16 tile taken out and scaled every block, 16 vector
// rows of work for every 8192 multiply-adds, as much vector work as VNNI's own dot products. So the
// weights are dequantized instead, a row group at a time, to bf16 -- scale * level, rounded to 8
// significant bits, which adds a few percent to q8's own error variance and less to q4's -- and
// multiplied on bf16 tiles whose f32 sums run over all of K. The tokens are the f32 activations
// rounded to bf16 (8 significant bits, where the integer kernels' int8 blocks keep 7 of the block's
// largest value), as the bf16 prefill rounds them.
//
// A q8 block holds, for each 4 columns, 16 rows x 4 levels in 64 bytes (quant.h): the two B rows of
// column pairs (0, 1) and (2, 3) of that quad, once split. A q4 block holds two such quads per 64
// bytes, in the low and high nibbles. A row group's blocks dequantized are B tiles of 16 rows, 512
// uint16s a block.

// 16 rows x 4 columns of levels (64 bytes, row by row) to the two B rows of column pairs (0, 1)
// and (2, 3): bf16 of scale[row] * (level - zero point). sc[q] and zsc[q] hold, in lane l, the
// scale of row 4q + l / 4 and that times the zero point; level * s - zero * s is exact in f32
// (9 significant bits times 11), so the one rounding is to bf16.
static inline void quad_to_pairs(__m512i levels, const __m512* sc, const __m512* zsc, uint16_t* out) {
    // quarter q: rows 4q .. 4q + 3 (the extract's index must be a constant even unoptimized)
    auto dequant = [&](__m128i quarter, int q) {
        return _mm512_fmsub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(quarter)), sc[q], zsc[q]);
    };
    const __m512 f[4] = {dequant(_mm512_castsi512_si128(levels), 0), dequant(_mm512_extracti32x4_epi32(levels, 1), 1),
                         dequant(_mm512_extracti32x4_epi32(levels, 2), 2), dequant(_mm512_extracti32x4_epi32(levels, 3), 3)};
    // as 32-bit pairs: dword d of lo is row d / 2, columns 2 (d % 2) and 2 (d % 2) + 1 (hi: rows 8 on)
    const __m512i lo = __m512i(_mm512_cvtne2ps_pbh(f[1], f[0])), hi = __m512i(_mm512_cvtne2ps_pbh(f[3], f[2]));
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    _mm512_store_si512(out, _mm512_permutex2var_epi32(lo, even, hi));
    _mm512_store_si512(out + 32, _mm512_permutex2var_epi32(lo, odd, hi));
}

// One row group of a packed q8 / q4 matrix (nb blocks) to B tiles: 512 uint16 a block.
template <bool Q4>
static void group_to_tiles(const uint8_t* group, int nb, uint16_t* out) {
    const size_t block_bytes = Q4 ? kQ4BlockBytes : kQ8BlockBytes;
    const __m512 zero = _mm512_set1_ps(Q4 ? 8.f : 128.f);
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    const __m512i quarter = _mm512_srli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 2);
    for (int b = 0; b < nb; b++, out += 512) {
        const uint8_t* blk = group + size_t(b) * block_bytes;
        const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk)));
        __m512 sc[4], zsc[4];
        for (int q = 0; q < 4; q++) {
            sc[q] = _mm512_permutexvar_ps(_mm512_add_epi32(quarter, _mm512_set1_epi32(4 * q)), s);
            zsc[q] = _mm512_mul_ps(sc[q], zero);
        }
        if (Q4) {
            for (int g = 0; g < 4; g++) {  // columns 8g .. 8g + 3 in the low nibbles, 8g + 4 .. 8g + 7 in the high
                const __m512i v = _mm512_loadu_si512(blk + 32 + 64 * g);
                quad_to_pairs(_mm512_and_si512(v, low4), sc, zsc, out + 128 * g);
                quad_to_pairs(_mm512_and_si512(_mm512_srli_epi16(v, 4), low4), sc, zsc, out + 128 * g + 64);
            }
        } else {
            for (int g = 0; g < 8; g++) quad_to_pairs(_mm512_loadu_si512(blk + 32 + 64 * g), sc, zsc, out + 64 * g);
        }
    }
}

// n0 starts a row group, as for the VNNI kernels. A pair of row groups is dequantized once per
// block of tokens and meets all of them.
template <class Tiles, bool Q4>
static void matmul_q_tiles(const float* X, int ldx, int M, int K, const uint8_t* W, const float* bias, float* Y,
                           int ldy, int n0, int n1) {
    static thread_local ThreadScratch<uint16_t> wscratch;
    const int nb = q_blocks(K);
    const size_t wstride = size_t(nb) * 512;
    const size_t group_bytes = size_t(nb) * (Q4 ? kQ4BlockBytes : kQ8BlockBytes);
    size_t Kp;  // = nb * 32
    const int rows = (M + 2 * kTileTokens - 1) / (2 * kTileTokens) * 2 * kTileTokens;  // whole token tile pairs
    const uint16_t* xb = avx512::rows_to_bf16(X, ldx, M, K, rows, Kp);
    uint16_t* wt = wscratch.get(2 * wstride);
    Tiles::configure(all_16x64());
    const Operand weights{wt, wstride, 512, 64};
    for (int m0 = 0; m0 < M; m0 += kTokenBlock) {
        const int m1 = imin(M, m0 + kTokenBlock);
        for (int n = n0; n < n1; n += 2 * kQRows) {
            const int ng = n1 - n > kQRows ? 2 : 1;
            for (int j = 0; j < ng; j++)
                group_to_tiles<Q4>(W + size_t(n / kQRows + j) * group_bytes, nb, wt + size_t(j) * wstride);
            for (int m = m0; m < m1; m += 2 * kTileTokens) {
                if (ng == 2)
                    tile_pass<Tiles, 2>(xb, Kp, weights, nb, m, Y, ldy, m1, n, n1, bias);
                else
                    tile_pass<Tiles, 1>(xb, Kp, weights, nb, m, Y, ldy, m1, n, n1, bias);
            }
        }
    }
    Tiles::release();
}

// ---------------------------------------------------------------------------------------------

// Fewer tokens than a tile: the AVX-512 kernels (decode is memory-bound; a few tokens fill too
// little of a tile to pay for packing).
constexpr int kMinTokens = kTileTokens;

// A tile backend's table: the AVX-512 one with its three weight matmuls on tiles.
template <class Tiles>
struct TiledMatmuls {
    static void bf16(const float* X, int ldx, int M, int K, const uint16_t* W, const float* bias, float* Y, int ldy,
                     int n0, int n1) {
        if (M < kMinTokens) return kernels_avx512()->matmul_bf16(X, ldx, M, K, W, bias, Y, ldy, n0, n1);
        matmul_bf16_tiles<Tiles>(X, ldx, M, K, W, bias, Y, ldy, n0, n1);
    }
    static void q8(const float* X, int ldx, const int8_t* xq, const float* xd, const int32_t* xs, int M, int K,
                   const uint8_t* W, const float* bias, float* Y, int ldy, int n0, int n1) {
        if (M < kMinTokens) return kernels_avx512()->matmul_q8(X, ldx, xq, xd, xs, M, K, W, bias, Y, ldy, n0, n1);
        matmul_q_tiles<Tiles, false>(X, ldx, M, K, W, bias, Y, ldy, n0, n1);
    }
    static void q4(const float* X, int ldx, const int8_t* xq, const float* xd, const int32_t* xs, int M, int K,
                   const uint8_t* W, const float* bias, float* Y, int ldy, int n0, int n1) {
        if (M < kMinTokens) return kernels_avx512()->matmul_q4(X, ldx, xq, xd, xs, M, K, W, bias, Y, ldy, n0, n1);
        matmul_q_tiles<Tiles, true>(X, ldx, M, K, W, bias, Y, ldy, n0, n1);
    }
    static Kernels table(const char* isa) {
        Kernels k = *kernels_avx512();
        k.isa = isa;
        k.matmul_bf16 = bf16;
        k.matmul_q8 = q8;
        k.matmul_q4 = q4;
        k.q_prompt_repacks_tokens = true;
        k.matmul_bf16_swiglu = nullptr;  // the AVX-512 ones would not run on the tiles
        k.matmul_bf16_panels = nullptr;
        k.matmul_bf16_add = nullptr;
        return k;
    }
};
#if defined(QWEN2RT_AMX_ASM)
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
    const int M = 40, K = 200, N = 40;  // two token tile pairs, part-filled; a part-filled column block
    std::vector<float> X(size_t(M) * K), Wf(size_t(N) * K), bias(N), y_hw(size_t(M) * N), y_emu(size_t(M) * N);
    uint32_t s = 12345;
    auto next = [&] {
        s = s * 1664525u + 1013904223u;
        return float(int(s >> 9) - (1 << 22)) / float(1 << 22);
    };
    for (float& v : X) v = next();
    for (float& v : Wf) v = next();
    for (float& v : bias) v = next();
    auto agree = [&] {
        for (size_t i = 0; i < y_hw.size(); i++)
            if (!(std::fabs(y_hw[i] - y_emu[i]) <= 1e-4f * (1.f + std::fabs(y_emu[i])))) return false;
        return true;
    };
    std::vector<uint16_t> W(bf16_bytes(N, K) / 2);
    pack_bf16(Wf.data(), N, K, size_t(K), W.data(), 1);
    matmul_bf16_tiles<AmxTiles>(X.data(), K, M, K, W.data(), bias.data(), y_hw.data(), N, 0, N);
    matmul_bf16_tiles<EmulatedTiles>(X.data(), K, M, K, W.data(), bias.data(), y_emu.data(), N, 0, N);
    if (!agree()) return false;
    // q4 (the q8 kernel differs only in how its levels are unpacked, on the vector unit)
    std::vector<uint8_t> Wq(q4_bytes(N, K));
    quantize_q4(Wf.data(), N, K, size_t(K), Wq.data(), 1);
    matmul_q_tiles<AmxTiles, true>(X.data(), K, M, K, Wq.data(), bias.data(), y_hw.data(), N, 0, N);
    matmul_q_tiles<EmulatedTiles, true>(X.data(), K, M, K, Wq.data(), bias.data(), y_emu.data(), N, 0, N);
    return agree();
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
    static const Kernels table = amx::TiledMatmuls<amx::EmulatedTiles>::table("amx-emulated");
    return &table;
}

const Kernels* kernels_amx() {
#if defined(QWEN2RT_AMX_ASM)
    static const Kernels table = amx::TiledMatmuls<amx::AmxTiles>::table("amx");
    return &table;
#else
    return nullptr;
#endif
}

}  // namespace qwen2rt
