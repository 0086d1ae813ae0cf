// AMX kernels: the prefill's weight matmuls on the tile unit (TDPBF16PS), for CPUs with AMX-BF16
// (Intel Xeon from Sapphire Rapids on). The "amx" table is the AVX-512 one with its bf16, q8, q6 and q4
// matmuls replaced for prompts of 16 tokens or more, and the token tiles' own entries (kernels.h:
// tile_tokens, matmul_tiles, swiglu_tiles); everything else, decode included (memory-bound), stays
// AVX-512. q8, q6 and q4 weights are dequantized to bf16 for the tiles (why: above matmul_q_tiles).
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

#include "common.h"
#include "cpu_features.h"
#include "kernels.h"
#include "numeric.h"
#include "quant.h"

namespace qwen2rt {
namespace amx {

static inline int imin(int a, int b) { return a < b ? a : b; }
static inline int imax(int a, int b) { return a > b ? a : b; }

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
    // the configuration in force (64 zero bytes where the tiles are not configured)
    static void save(TileConfig& c) { __asm__ volatile("sttilecfg %0" : "=m"(c) : : "memory"); }
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
        static thread_local File f{unconfigured(), {}};
        return f;
    }
    static TileConfig unconfigured() {
        TileConfig c;
        c.palette = 0;
        return c;
    }
    static void configure(const TileConfig& c) {
        file().cfg = c;
        std::memset(file().t, 0, sizeof(file().t));
    }
    static void release() {
        file().cfg = unconfigured();
        std::memset(file().t, 0, sizeof(file().t));
    }
    static void save(TileConfig& c) { c = file().cfg; }
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

// A kernel's tile configuration, in force for the scope's life; then the thread's configuration from
// before it is put back, or the tiles released (their 8 KiB of state is then not saved at each
// context switch). Putting it back matters to other AMX code on the same threads: llama.cpp's
// kernels configure a thread's tiles once and keep them, and faulted (SIGILL) on the next product
// after a bare release, in a process that ran both (the benchmark's paired runs; OpenMP threads
// are shared).
template <class Tiles>
struct TileScope {
    TileConfig saved;
    explicit TileScope(const TileConfig& c) {
        Tiles::save(saved);
        Tiles::configure(c);
    }
    ~TileScope() {
        if (saved.palette)
            Tiles::configure(saved);
        else
            Tiles::release();
    }
    TileScope(const TileScope&) = delete;
    TileScope& operator=(const TileScope&) = delete;
};

// ---------------------------------------------------------------------------------------------
// Y = X W^T in tiles: the weights are the B operand and the tokens the A one, so that C is
// [16 tokens][16 weight rows], Y's own orientation. TDPBF16PS wants B in pairs: row r of a B tile
// is, for each of 16 weight rows, its columns 2r and 2r + 1. A packed bf16 group (quant.h) is
// exactly that, 32 rows wide: a B tile is 16 of its column pairs for 16 of its rows, rows of 64
// bytes 128 apart, read as it lies. q8 / q6 / q4 weights are dequantized into the same shape (below).
// The tokens are rounded to bf16 once per input, into token tiles (kernels.h; in the model, by the
// threads that write the input's rows): an A tile is 16 tokens x 32 columns.

constexpr int kTileTokens = 16;
// The products' token tiles of a range of K stay in L2 while every weight row of the thread's share
// meets them (2 MiB of L2 a core on Sapphire Rapids): all of K up to 1024 columns for a 512-token
// chunk (the 0.5B model's hidden size is 896), so that only down_proj's K (4864) goes in ranges.
constexpr size_t kTokenRangeBytes = size_t(1) << 20;

// Token tiles (kernels.h: tile_tokens_size): columns [c0, c1) of token t rounded to bf16 (round to
// nearest even, as the AVX-512 prefill rounds them), zeros past c1 in its last block. A pair of
// tiles in one 2 KiB run is one stream for the hardware prefetcher, where token rows K apart were 32.
static void tile_tokens_row(const float* x, int K, int t, int c0, int c1, uint16_t* tiles) {
    uint16_t* o = tiles + size_t(t / 32) * q_blocks(K) * 1024 + size_t(t % 32) * 32;
    for (int k = c0; k < c1; k += 32) {
        const __mmask16 lo = k + 16 <= c1 ? __mmask16(0xffff) : __mmask16((1u << (c1 - k)) - 1);
        const __mmask16 hi = k + 32 <= c1 ? __mmask16(0xffff) : k + 16 < c1 ? __mmask16((1u << (c1 - k - 16)) - 1) : 0;
        const __m512 a = _mm512_maskz_loadu_ps(lo, x + k), b = _mm512_maskz_loadu_ps(hi, x + k + 16);
        _mm512_store_si512(o + size_t(k / 32) * 1024, __m512i(_mm512_cvtne2ps_pbh(b, a)));
    }
}

// For the products called on f32 rows (matmul_bf16 / matmul_q8 / q6 / q4 of the table): the
// thread's own token tiles of them, rows past M zero.
static const uint16_t* tokens_to_tiles(const float* X, int ldx, int M, int K) {
    static thread_local ThreadScratch<uint16_t> scratch;
    const size_t size = tile_tokens_size(M, K);
    uint16_t* out = scratch.get(size);
    std::memset(out + size_t(M / 32) * q_blocks(K) * 1024, 0, (size - size_t(M / 32) * q_blocks(K) * 1024) * 2);
    for (int t = 0; t < M; t++) tile_tokens_row(X + size_t(t) * ldx, K, t, 0, K, out);
    return out;
}

// C[i][j] in tmm 2i + j = its initial value + the sum over nb column blocks of A[i] (tmm 4 + i) times
// B[j] (tmm 6 + j), for i < 2, j < NB. The A tiles of block b are at a + 1024 b (tile 1 512 further
// on), the B tiles at B.p[j] + b * B.step, rows B.stride bytes apart. C's initial
// value: zero, or a tile load from init[c] with rows init_stride[c] bytes apart -- the outputs
// themselves (a product added into them), or with stride 0 one row of 16 biases for every token.
struct Operand {
    const uint16_t* p[2];
    size_t step, stride;
};
struct TileInit {
    const float* p[4] = {};
    size_t stride[4] = {};
};
template <class Tiles, int C>
static void init_tile(const TileInit& init) {
    if (init.p[C])
        Tiles::template load<C>(init.p[C], init.stride[C]);
    else
        Tiles::template zero<C>();
}
template <class Tiles, int NB>
static void accumulate(const uint16_t* a, const Operand& B, int nb, const TileInit& init) {
    init_tile<Tiles, 0>(init);
    init_tile<Tiles, 2>(init);
    if (NB == 2) {
        init_tile<Tiles, 1>(init);
        init_tile<Tiles, 3>(init);
    }
    for (int b = 0; b < nb; b++, a += 1024) {
        Tiles::template load<4>(a, 64);
        Tiles::template load<6>(B.p[0] + size_t(b) * B.step, B.stride);
        Tiles::template dp_bf16<0, 4, 6>();
        if (NB == 2) {
            Tiles::template load<7>(B.p[1] + size_t(b) * B.step, B.stride);
            Tiles::template dp_bf16<1, 4, 7>();
        }
        Tiles::template load<5>(a + 512, 64);
        Tiles::template dp_bf16<2, 5, 6>();
        if (NB == 2) Tiles::template dp_bf16<3, 5, 7>();
    }
}

// Where a tile of C (16 tokens from m x 16 weight rows from n) goes, and what it starts from. A
// whole tile (tokens below M, rows below n1) is stored where it lies in Y; an edge tile goes through
// a buffer. C starts from zero or the bias (a row repeated: stride 0), or, where the products are
// added into Y (a residual, or the sums of the columns before this range of K), from Y itself:
// loaded where it lies, or (an edge tile, or Y with a bias) from a zero-padded copy.
struct TileSpot {
    float* Y;
    int ldy, M, n1;
    const float* bias;  // null: none, or not in this range of K
    bool from_y;
    bool stored(int m, int n) const { return m < M && n < n1; }
    bool whole(int m, int n) const { return m + kTileTokens <= M && n + kQRows <= n1; }
};
static void init_for(const TileSpot& s, int m, int n, int c, float (*pad)[16], TileInit& init) {
    if (!s.stored(m, n)) return;  // zero
    const int nr = imin(kQRows, s.n1 - n);
    if (s.from_y && s.whole(m, n) && !s.bias) {
        init.p[c] = s.Y + size_t(m) * s.ldy + n;
        init.stride[c] = size_t(s.ldy) * 4;
    } else if (s.from_y) {
        for (int t = 0; t < 16; t++)
            for (int r = 0; r < 16; r++)
                pad[t][r] = m + t < s.M && r < nr ? s.Y[size_t(m + t) * s.ldy + n + r] + (s.bias ? s.bias[n + r] : 0.f) : 0.f;
        init.p[c] = &pad[0][0];
        init.stride[c] = 64;
    } else if (s.bias) {
        const float* row = s.bias + n;
        if (nr < kQRows) {  // 16 values to read: a zero-padded copy
            for (int r = 0; r < kQRows; r++) pad[0][r] = r < nr ? s.bias[n + r] : 0.f;
            row = pad[0];
        }
        init.p[c] = row;
        init.stride[c] = 0;
    }
}
template <class Tiles, int C>
static void store_tile(const TileSpot& s, int m, int n) {
    if (!s.stored(m, n)) return;
    if (s.whole(m, n)) {
        Tiles::template store<C>(s.Y + size_t(m) * s.ldy + n, size_t(s.ldy) * 4);
        return;
    }
    alignas(64) float c[16][16];
    Tiles::template store<C>(c, 64);
    const int nr = imin(kQRows, s.n1 - n);
    for (int t = 0; t < 16 && m + t < s.M; t++) std::memcpy(s.Y + size_t(m + t) * s.ldy + n, c[t], size_t(nr) * 4);
}

// Token tile pair p (tokens [32p, 32p + 32)) against NG B tiles of 16 weight rows from row n, over
// nb blocks of columns from the token tiles' block b0.
template <class Tiles, int NG>
static void tile_pass(const uint16_t* tiles, int nbk, int b0, int nb, const Operand& weights, int p, int n,
                      const TileSpot& s) {
    alignas(64) float pad[4][16][16];
    const int m = p * 2 * kTileTokens;
    TileInit init;
    init_for(s, m, n, 0, pad[0], init);
    init_for(s, m + kTileTokens, n, 2, pad[2], init);
    if (NG == 2) {
        init_for(s, m, n + kQRows, 1, pad[1], init);
        init_for(s, m + kTileTokens, n + kQRows, 3, pad[3], init);
    }
    accumulate<Tiles, NG>(tiles + (size_t(p) * nbk + b0) * 1024, weights, nb, init);
    store_tile<Tiles, 0>(s, m, n);
    store_tile<Tiles, 2>(s, m + kTileTokens, n);
    if (NG == 2) {
        store_tile<Tiles, 1>(s, m, n + kQRows);
        store_tile<Tiles, 3>(s, m + kTileTokens, n + kQRows);
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

// Y (+)= tokens W^T on the tiles, for the weight rows [n0, n1) in passes of two B tiles of 16 rows
// (weights(n, b0, nb, ng) gives the B operand of ng tiles from row n over blocks b0 .. b0 + nb), all
// of the tokens against each pair of B tiles. K goes in ranges whose token tiles (every token's)
// stay in L2 (kTokenRangeBytes) while the weights' rows pass: each weight is read from memory once,
// and C adds each range's sums into Y's from the range before.
template <class Tiles, class Weights>
static void product_on_tiles(const uint16_t* tiles, int M, int K, Weights&& weights, const float* bias, float* Y,
                             int ldy, int n0, int n1, bool add) {
    const int nb = q_blocks(K), pairs = (M + 2 * kTileTokens - 1) / (2 * kTileTokens);
    const int range = imin(nb, imax(1, int(kTokenRangeBytes / (size_t(pairs) * 2048))));
    const TileScope<Tiles> scope(all_16x64());
    for (int b0 = 0; b0 < nb; b0 += range) {
        const int nr = imin(range, nb - b0);
        const TileSpot spot{Y, ldy, M, n1, b0 == 0 ? bias : nullptr, add || b0 > 0};
        for (int n = n0; n < n1; n += 2 * kQRows) {
            const int ng = n1 - n > kQRows ? 2 : 1;
            const Operand w = weights(n, b0, nr, ng);
            for (int p = 0; p < pairs; p++) {
                if (ng == 2)
                    tile_pass<Tiles, 2>(tiles, nb, b0, nr, w, p, n, spot);
                else
                    tile_pass<Tiles, 1>(tiles, nb, b0, nr, w, p, n, spot);
            }
        }
    }
}

// bf16 W: n0 a multiple of 16 (kernels.h). The two B tiles of a pass are the two halves of a group,
// or (from a half-way start) the second half of one and the first of the next, read as they lie.
template <class Tiles>
static void matmul_bf16_tiles(const uint16_t* tiles, int M, int K, const uint16_t* W, const float* bias, float* Y,
                              int ldy, int n0, int n1, bool add) {
    auto weights = [&](int n, int b0, int, int) {
        const int r0 = n % kBf16Rows;
        const uint16_t* b = reinterpret_cast<const uint16_t*>(bf16_group(W, K, n)) + 2 * r0 + size_t(b0) * kQBlock * kBf16Rows;
        const size_t next = r0 == 0 ? 2 * kQRows : bf16_group_values(K) - 2 * kQRows;
        return Operand{{b, b + next}, size_t(kQBlock) * kBf16Rows, kBf16Rows * 4};
    };
    product_on_tiles<Tiles>(tiles, M, K, weights, bias, Y, ldy, n0, n1, add);
}

// ---------------------------------------------------------------------------------------------
// Y = X W^T for q8 / q6 / q4 W, on the same bf16 tiles.
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

// One row group of a packed q8 / q6 / q4 matrix (nb blocks) to B tiles: 512 uint16 a block.
template <DType T>
static void group_to_tiles(const uint8_t* group, int nb, uint16_t* out) {
    constexpr size_t block_bytes = q_block_bytes(T);
    const __m512 zero = _mm512_set1_ps(float(q_zero_point(T)));
    const __m512i low4 = _mm512_set1_epi8(0x0f), high2 = _mm512_set1_epi8(0x30);
    const __m512i quarter = _mm512_srli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 2);
    for (int b = 0; b < nb; b++, out += 512) {
        const uint8_t* blk = group + size_t(b) * block_bytes;
        const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk)));
        __m512 sc[4], zsc[4];
        for (int q = 0; q < 4; q++) {
            sc[q] = _mm512_permutexvar_ps(_mm512_add_epi32(quarter, _mm512_set1_epi32(4 * q)), s);
            zsc[q] = _mm512_mul_ps(sc[q], zero);
        }
        if (T != DType::Q8) {
            for (int g = 0; g < 4; g++) {  // columns 8g .. 8g + 3 in the low nibbles, 8g + 4 .. 8g + 7 in the high
                const __m512i v = _mm512_loadu_si512(blk + 32 + 64 * g);
                __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
                if (T == DType::Q6) {  // their high 2 bits, at bits 2m and 2m + 2 (m = 2 (g % 2)), moved to bits 4-5
                    const __m512i h = _mm512_loadu_si512(blk + 288 + 64 * (g / 2));
                    const __m512i hl = g % 2 ? h : _mm512_slli_epi16(h, 4);
                    const __m512i hh = g % 2 ? _mm512_srli_epi16(h, 2) : _mm512_slli_epi16(h, 2);
                    lo = _mm512_ternarylogic_epi32(lo, hl, high2, 0xf8);  // lo | (hl & 0x30)
                    hi = _mm512_ternarylogic_epi32(hi, hh, high2, 0xf8);
                }
                quad_to_pairs(lo, sc, zsc, out + 128 * g);
                quad_to_pairs(hi, sc, zsc, out + 128 * g + 64);
            }
        } else {
            for (int g = 0; g < 8; g++) quad_to_pairs(_mm512_loadu_si512(blk + 32 + 64 * g), sc, zsc, out + 64 * g);
        }
    }
}

// n0 starts a row group, as for the VNNI kernels. A pass's two row groups are dequantized (the blocks
// of its range of K) once, and meet every token.
static void group_to_tiles(DType t, const uint8_t* group, int nb, uint16_t* out) {
    switch (t) {
        case DType::Q8: return group_to_tiles<DType::Q8>(group, nb, out);
        case DType::Q6: return group_to_tiles<DType::Q6>(group, nb, out);
        default: return group_to_tiles<DType::Q4>(group, nb, out);
    }
}

template <class Tiles, DType T>
static void matmul_q_tiles(const uint16_t* tiles, int M, int K, const uint8_t* W, const float* bias, float* Y,
                           int ldy, int n0, int n1, bool add) {
    static thread_local ThreadScratch<uint16_t> wscratch;
    const int nb = q_blocks(K);
    const size_t wstride = size_t(nb) * 512, block_bytes = q_block_bytes(T);
    uint16_t* wt = wscratch.get(2 * wstride);
    auto weights = [&](int n, int b0, int nr, int ng) {
        for (int j = 0; j < ng; j++)
            group_to_tiles<T>(W + (size_t(n / kQRows + j) * nb + b0) * block_bytes, nr, wt + size_t(j) * wstride);
        return Operand{{wt, wt + wstride}, 512, 64};
    };
    product_on_tiles<Tiles>(tiles, M, K, weights, bias, Y, ldy, n0, n1, add);
}

// ---------------------------------------------------------------------------------------------
// The MLP's gate and up products and silu(gate) * up in one pass, into the hidden rows' token tiles
// (down_proj's input): for each 16 rows n of both matrices, B tile 0 is gate's and B tile 1 is up's,
// so C holds gate and up side by side for 32 tokens; silu_mul (the AVX-512 one, the same function
// the unfused path runs) makes the hidden values, rounded to bf16 as tile_tokens rounds them. The
// f32 gate and up rows are never stored: that pass, and silu_mul's own, was an eighth of a bf16
// prompt's time.

// Columns [n, n + 16) of the hidden rows of token tile pair p from C (gate in tmm 0 / 2, up in 1 / 3).
template <class Tiles>
static void store_swiglu(int M, int p, int n, int n1, uint16_t* h_tiles, int nbh) {
    alignas(64) float g[2][16][16], u[2][16][16];
    Tiles::template store<0>(g[0], 64);
    Tiles::template store<1>(u[0], 64);
    Tiles::template store<2>(g[1], 64);
    Tiles::template store<3>(u[1], 64);
    kernels_avx512()->silu_mul(&g[0][0][0], &u[0][0][0], 2 * 16 * 16, &g[0][0][0]);
    const __mmask16 cols = n + kQRows <= n1 ? __mmask16(0xffff) : __mmask16((1u << (n1 - n)) - 1);  // zeros past n1
    uint16_t* o = h_tiles + size_t(p) * nbh * 1024 + size_t(n / 32) * 1024 + n % 32;
    for (int r = 0; r < 2 * kTileTokens && p * 2 * kTileTokens + r < M; r++) {
        const __m512 h = _mm512_maskz_loadu_ps(cols, g[r / 16][r % 16]);
        _mm256_store_si256(reinterpret_cast<__m256i*>(o + size_t(r) * 32), __m256i(_mm512_cvtneps_pbh(h)));
    }
}

// n0 and n1 multiples of 32 (whole blocks of the hidden rows), or n1 = I; for q8 / q6 / q4, whole row
// groups are dequantized, gate's and up's, 16 rows of each. All of K at once (silu needs whole
// sums): the hidden size, whose token tiles stay in L2.
template <class Tiles>
static void swiglu_tiles(const uint16_t* tiles, int M, int K, int dtype, const void* Wgate, const void* Wup, int n0,
                         int n1, uint16_t* h_tiles, int I) {
    static thread_local ThreadScratch<uint16_t> wscratch;
    const int nb = q_blocks(K), nbh = q_blocks(I), pairs = (M + 2 * kTileTokens - 1) / (2 * kTileTokens);
    const bool bf16 = DType(dtype) == DType::BF16;
    const size_t wstride = size_t(nb) * 512;
    const size_t group_bytes = bf16 ? 0 : size_t(nb) * q_block_bytes(DType(dtype));
    uint16_t* wt = bf16 ? nullptr : wscratch.get(2 * wstride);
    const void* const w[2] = {Wgate, Wup};
    if (n1 == I && I % 32)  // the last block's columns past I are zero (down_proj's K ends there)
        for (int t = 0; t < M; t++)
            std::memset(h_tiles + size_t(t / 32) * nbh * 1024 + size_t(I / 32) * 1024 + size_t(t % 32) * 32 + I % 32, 0,
                        size_t(32 - I % 32) * 2);
    const TileScope<Tiles> scope(all_16x64());
    for (int n = n0; n < n1; n += kQRows) {
        Operand weights{{}, size_t(kQBlock) * kBf16Rows, kBf16Rows * 4};
        for (int j = 0; j < 2; j++) {
            if (bf16) {
                weights.p[j] = reinterpret_cast<const uint16_t*>(bf16_group(static_cast<const uint16_t*>(w[j]), K, n)) +
                               2 * (n % kBf16Rows);
                continue;
            }
            const uint8_t* group = static_cast<const uint8_t*>(w[j]) + size_t(n / kQRows) * group_bytes;
            group_to_tiles(DType(dtype), group, nb, wt + size_t(j) * wstride);
            weights = {{wt, wt + wstride}, 512, 64};
        }
        for (int p = 0; p < pairs; p++) {
            accumulate<Tiles, 2>(tiles + size_t(p) * nb * 1024, weights, nb, TileInit{});
            store_swiglu<Tiles>(M, p, n, n1, h_tiles, nbh);
        }
    }
}

// ---------------------------------------------------------------------------------------------

// Fewer tokens than a tile: the AVX-512 kernels (decode is memory-bound; a few tokens fill too
// little of a tile to pay for packing).
constexpr int kMinTokens = kMinTileTokens;
static_assert(kMinTileTokens == kTileTokens, "kernels.h promises products from one tile of tokens up");

// A tile backend's table: the AVX-512 one with its three weight matmuls on tiles, and the token
// tiles' own entries.
template <class Tiles>
struct TiledMatmuls {
    static void bf16(const float* X, int ldx, int M, int K, const uint16_t* W, const float* bias, float* Y, int ldy,
                     int n0, int n1) {
        if (M < kMinTokens) return kernels_avx512()->matmul_bf16(X, ldx, M, K, W, bias, Y, ldy, n0, n1);
        matmul_bf16_tiles<Tiles>(tokens_to_tiles(X, ldx, M, K), M, K, W, bias, Y, ldy, n0, n1, false);
    }
    template <DType T>
    static void q(const float* X, int ldx, const int8_t* xq, const float* xd, const int32_t* xs, int M, int K,
                  const uint8_t* W, const float* bias, float* Y, int ldy, int n0, int n1) {
        if (M < kMinTokens) {
            const Kernels* v = kernels_avx512();
            const auto vnni = T == DType::Q8 ? v->matmul_q8 : T == DType::Q6 ? v->matmul_q6 : v->matmul_q4;
            return vnni(X, ldx, xq, xd, xs, M, K, W, bias, Y, ldy, n0, n1);
        }
        matmul_q_tiles<Tiles, T>(tokens_to_tiles(X, ldx, M, K), M, K, W, bias, Y, ldy, n0, n1, false);
    }
    static void on_tiles(const uint16_t* tiles, int M, int K, int dtype, const void* W, const float* bias, float* Y,
                         int ldy, int n0, int n1, bool add) {
        if (n0 >= n1) return;
        const auto* w8 = static_cast<const uint8_t*>(W);
        switch (DType(dtype)) {
            case DType::BF16:
                return matmul_bf16_tiles<Tiles>(tiles, M, K, static_cast<const uint16_t*>(W), bias, Y, ldy, n0, n1, add);
            case DType::Q8: return matmul_q_tiles<Tiles, DType::Q8>(tiles, M, K, w8, bias, Y, ldy, n0, n1, add);
            case DType::Q6: return matmul_q_tiles<Tiles, DType::Q6>(tiles, M, K, w8, bias, Y, ldy, n0, n1, add);
            case DType::Q4: return matmul_q_tiles<Tiles, DType::Q4>(tiles, M, K, w8, bias, Y, ldy, n0, n1, add);
            default: std::abort();  // the caller sends only these (qwen2.cpp: matmul_rows)
        }
    }
    static Kernels table(const char* isa) {
        Kernels k = *kernels_avx512();
        k.isa = isa;
        k.matmul_bf16 = bf16;
        k.matmul_q8 = q<DType::Q8>;
        k.matmul_q4 = q<DType::Q4>;
        k.matmul_q6 = q<DType::Q6>;
        k.matmul_bf16_swiglu = nullptr;  // the AVX-512 ones would not run on the tiles
        k.matmul_bf16_panels = nullptr;
        k.matmul_bf16_add = nullptr;
        k.tile_tokens = tile_tokens_row;
        k.matmul_tiles = on_tiles;
        k.swiglu_tiles = swiglu_tiles<Tiles>;
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
    const uint16_t* tiles = tokens_to_tiles(X.data(), K, M, K);
    matmul_bf16_tiles<AmxTiles>(tiles, M, K, W.data(), bias.data(), y_hw.data(), N, 0, N, false);
    matmul_bf16_tiles<EmulatedTiles>(tiles, M, K, W.data(), bias.data(), y_emu.data(), N, 0, N, false);
    if (!agree()) return false;
    // q4 (the q8 / q6 kernels differ only in how their levels are unpacked, on the vector unit)
    std::vector<uint8_t> Wq(q_bytes(DType::Q4, N, K));
    quantize_q(DType::Q4, Wf.data(), N, K, size_t(K), Wq.data(), 1);
    matmul_q_tiles<AmxTiles, DType::Q4>(tiles, M, K, Wq.data(), bias.data(), y_hw.data(), N, 0, N, false);
    matmul_q_tiles<EmulatedTiles, DType::Q4>(tiles, M, K, Wq.data(), bias.data(), y_emu.data(), N, 0, N, false);
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

namespace amx {
template <class Tiles>
static bool keeps_tile_config() {
    TileConfig other;  // another kernel's shapes: 8 rows of 32 bytes in tile 0, 4 of 16 in tile 5
    other.colsb[0] = 32;
    other.rows[0] = 8;
    other.colsb[5] = 16;
    other.rows[5] = 4;
    Tiles::configure(other);
    std::vector<float> X(size_t(16) * 32, 1.f), Y(size_t(16) * 16);
    std::vector<uint16_t> W(bf16_bytes(16, 32) / 2, 0x3f80);
    const uint16_t* tiles = tokens_to_tiles(X.data(), 32, 16, 32);
    matmul_bf16_tiles<Tiles>(tiles, 16, 32, W.data(), nullptr, Y.data(), 16, 0, 16, false);
    TileConfig now;
    Tiles::save(now);
    Tiles::release();
    return std::memcmp(&now, &other, sizeof(now)) == 0 && Y[0] == 32.f;
}
}  // namespace amx

bool amx_keeps_tile_config(bool emulated) {
    if (emulated) return amx::keeps_tile_config<amx::EmulatedTiles>();
#if defined(QWEN2RT_AMX_ASM)
    if (amx_usable()) return amx::keeps_tile_config<amx::AmxTiles>();
#endif
    return false;
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
