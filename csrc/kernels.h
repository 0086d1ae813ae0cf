// The kernel table: every compute kernel the model uses, one table per instruction set.
//
// kernels_generic.cpp is the portable reference; kernels_avx2.cpp, kernels_avx512.cpp and
// kernels_amx.cpp are compiled with their own -m flags and must give the same answers within float
// tolerance (tests/test_kernels.py runs each against numpy). The table in use is picked once, by CPU
// detection, or forced with QWEN2RT_ISA=generic|avx2|avx512|amx (or amx-emulated, for tests).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

namespace qwen2rt {

namespace {
// A per-thread buffer of T that grows to the largest request and is freed with its thread: the
// kernels' rearranged copies of their inputs (declare it `static thread_local`). In an unnamed
// namespace, so that each ISA translation unit keeps its own copy, compiled with its own flags.
template <class T>
struct ThreadScratch {
    T* p = nullptr;
    size_t cap = 0;
    ~ThreadScratch() { free(p); }
    T* get(size_t n) {
        if (n > cap) {
            free(p);
            cap = n;
            p = static_cast<T*>(aligned_alloc(64, (cap * sizeof(T) + 63) / 64 * 64));
        }
        return p;
    }
};
}  // namespace

struct Kernels {
    const char* isa;

    // Y[m*ldy + n] = sum_k X[m*ldx + k] * W[n*K + k] (+ bias[n]) for 0 <= m < M, n0 <= n < n1.
    // W is a [N, K] weight matrix (a torch Linear weight): f32 row-major, bf16 packed (quant.h; n0 a
    // multiple of 16). Each W row is loaded once per block of tokens, so a prefill reuses weights across
    // tokens; the caller splits n across threads.
    void (*matmul_f32)(const float* X, int ldx, int M, int K, const float* W, const float* bias, float* Y,
                       int ldy, int n0, int n1);
    void (*matmul_bf16)(const float* X, int ldx, int M, int K, const uint16_t* W, const float* bias, float* Y,
                        int ldy, int n0, int n1);

    // y = x / sqrt(mean(x^2) + eps) * w over one row of n (y may equal x).
    void (*rmsnorm)(const float* x, const float* w, float eps, int n, float* y);

    // Rotate-half RoPE of one head of 2*half values, in place:
    // (x[i], x[i+half]) <- (x[i]*cos[i] - x[i+half]*sin[i], x[i+half]*cos[i] + x[i]*sin[i]).
    void (*rope)(float* x, const float* cos, const float* sin, int half);

    // out[i] = silu(gate[i]) * up[i], silu(g) = g / (1 + exp(-g)).
    void (*silu_mul)(const float* gate, const float* up, int n, float* out);

    // Attention at one query position for the G query heads that share one KV head:
    //   out[g] = softmax_t(scale * q[g].K[t]) . V[t],  t < n_keys
    // q and out are G rows of head_dim. K and V hold n_keys positions of one KV head of the cache,
    // f32 or IEEE f16: V as rows of head_dim, K in blocks of kKeyBlock positions (key_offset; the
    // last block may be part-filled, its other lanes are read but never used). Each K and V element
    // is read from memory once for all G heads. scratch holds attention_scratch_floats(G, n_keys,
    // head_dim) floats. If lse is not null, lse[g] = log(sum_t exp(scale * q[g].K[t])): outputs of
    // disjoint key ranges then merge into the output over all of them (split-KV, qwen2.cpp).
    void (*attention_f32)(const float* q, int G, int head_dim, const float* K, const float* V, int n_keys,
                          float scale, float* scratch, float* out, float* lse);
    void (*attention_f16)(const float* q, int G, int head_dim, const uint16_t* K, const uint16_t* V, int n_keys,
                          float scale, float* scratch, float* out, float* lse);
    // The same over a bf16 cache, laid out for bf16 pair dot products (key_offset_bf16,
    // value_offset_bf16; head_dim even). q is rounded to bf16 first (as the f16 kernels' K is
    // rounded to f16 when stored); the AVX-512 kernel also rounds the probabilities to bf16.
    void (*attention_bf16)(const float* q, int G, int head_dim, const uint16_t* K, const uint16_t* V, int n_keys,
                           float scale, float* scratch, float* out, float* lse);

    // y[i] += x[i]
    void (*add)(float* y, const float* x, int n);

    // --- quantized weights (quant.h) ---
    // M rows of K floats (ldx apart) to int8 blocks of 32: q [M, Kp] (Kp = K rounded up to 32,
    // zero-padded), per block the scale d = max|x| / 127 and the sum s of its q.
    void (*quantize_acts)(const float* X, int ldx, int M, int K, int8_t* q, float* d, int32_t* s);
    // Y[m*ldy + n] = sum_k x[m,k] w[n,k] (+ bias[n]) for n0 <= n < n1 (n0 a multiple of 16), with x
    // the quantized activations above and W a packed q8 / q4 / q6 matrix of K columns. n0 must start a
    // 16-row group. X holds the same M rows in f32 (ldx apart): a kernel that multiplies another
    // form of them reads X (the AMX tiles round it to bf16); the integer kernels read xq.
    void (*matmul_q8)(const float* X, int ldx, const int8_t* xq, const float* xd, const int32_t* xs, int M, int K,
                      const uint8_t* W, const float* bias, float* Y, int ldy, int n0, int n1);
    void (*matmul_q4)(const float* X, int ldx, const int8_t* xq, const float* xd, const int32_t* xs, int M, int K,
                      const uint8_t* W, const float* bias, float* Y, int ldy, int n0, int n1);
    void (*matmul_q6)(const float* X, int ldx, const int8_t* xq, const float* xd, const int32_t* xs, int M, int K,
                      const uint8_t* W, const float* bias, float* Y, int ldy, int n0, int n1);
    // The MLP's two bf16 products and silu_mul in one: Y[m*ldy + n] = silu(x_m . Wgate[n]) * (x_m . Wup[n])
    // for n0 <= n < n1, gate and up packed as matmul_bf16's W, with the same sums. With h_panels, the
    // result also goes to token panels of M rows of ldy columns (bf16_panel_index; n0 a multiple of
    // 32, n1 too unless it is ldy), the input of matmul_bf16_panels; Y may then be null. Where a table
    // has none (nullptr), the caller runs matmul_bf16 twice and silu_mul: the AVX-512 table fuses
    // them; the tile backends (AMX) have their own bf16 products.
    void (*matmul_bf16_swiglu)(const float* X, int ldx, int M, int K, const uint16_t* Wgate, const uint16_t* Wup,
                               float* Y, int ldy, int n0, int n1, uint32_t* h_panels) = nullptr;
    // matmul_bf16 on tokens already in panels (bf16_panel_index): M rows of K columns; with add,
    // Y[m*ldy + n] += the products (+ bias) instead. nullptr where the table has no panels.
    void (*matmul_bf16_panels)(const uint32_t* panels, int M, int K, const uint16_t* W, const float* bias, float* Y,
                               int ldy, int n0, int n1, bool add) = nullptr;
    // Y[m*ldy + n] += x_m . W[n] for a prompt (M > 1) on bf16 W, the same sums as matmul_bf16: a product
    // added into the residual stream as it is stored. nullptr where the table has none.
    void (*matmul_bf16_add)(const float* X, int ldx, int M, int K, const uint16_t* W, float* Y, int ldy, int n0,
                            int n1) = nullptr;

    // --- token tiles: a tile backend's (AMX) prompt input, made once per input ---
    // The columns [c0, c1) of token row t (x: that row; c0 a multiple of 32, c1 too unless it is K)
    // rounded to bf16 into `tiles`, the order the tile products read (tile_tokens_size): as the int8
    // form of an input is made once by the threads that write its rows (qwen2.cpp, MatmulInput) and
    // read by every product, so the tiles are, instead of every thread rearranging all of a prompt's
    // tokens at every product. nullptr where a table has none.
    void (*tile_tokens)(const float* x, int K, int t, int c0, int c1, uint16_t* tiles) = nullptr;
    // Y[m*ldy + n] (+)= tokens_m . W[n] (+ bias[n]) for m < M (M >= kMinTileTokens), n0 <= n < n1, on
    // token tiles of M rows of K columns and a bf16, q8, q6 or q4 W (matmul_bf16's and matmul_q8's
    // layouts and n0 rules). add: the products are added into Y as they are stored (a residual).
    void (*matmul_tiles)(const uint16_t* tiles, int M, int K, int dtype, const void* W, const float* bias, float* Y,
                         int ldy, int n0, int n1, bool add) = nullptr;
    // The MLP on token tiles: silu(tokens_m . Wgate[n]) * (tokens_m . Wup[n]) for n0 <= n < n1 (n0 a
    // multiple of 32, n1 too unless it is I) into h_tiles, the token tiles of M hidden rows of I
    // columns (down_proj's input); gate and up of one dtype, as matmul_tiles takes them. The same
    // values as matmul_tiles twice, silu_mul and tile_tokens.
    void (*swiglu_tiles)(const uint16_t* tiles, int M, int K, int dtype, const void* Wgate, const void* Wup, int n0,
                         int n1, uint16_t* h_tiles, int I) = nullptr;
};

// Token tiles (Kernels::tile_tokens): pairs of 16-token tiles, and in each pair, for each block of 32
// columns, the two tiles' 16 rows of 32 bf16 side by side (2 KiB), 64-byte aligned. Rows past M are
// never stored from; they may hold anything.
constexpr int kMinTileTokens = 16;
inline size_t tile_tokens_size(int M, int K) {  // uint16s
    return size_t(M + 31) / 32 * (size_t(K + 31) / 32) * 1024;
}

// Token panels, the input of the AVX-512 bf16 prompt products: M rows of K columns as bf16 pairs
// (unit u: columns 2u and 2u + 1, rounded to nearest even), kBf16PanelTokens rows to a panel, and a
// panel's units one after another, each the panel's mt tokens side by side: one 4-byte load is one
// token's pair, broadcast into `vdpbf16ps`. Units run to whole blocks of 32 columns (zeros past K).
constexpr int kBf16PanelTokens = 12;
inline size_t bf16_panel_units(int K) { return size_t(K + 31) / 32 * 16; }
inline size_t bf16_panel_index(int M, int K, int t, int u) {
    const int i = t / kBf16PanelTokens, left = M - i * kBf16PanelTokens;
    const int mt = left < kBf16PanelTokens ? left : kBf16PanelTokens;
    return size_t(i) * kBf16PanelTokens * bf16_panel_units(K) + size_t(u) * mt + size_t(t % kBf16PanelTokens);
}
// uint32 units that token panels of M rows of K columns take
inline size_t bf16_panels_size(int M, int K) {
    return size_t(M + kBf16PanelTokens - 1) / kBf16PanelTokens * kBf16PanelTokens * bf16_panel_units(K);
}

// The cache holds keys transposed in blocks of kKeyBlock positions: [t / 16][head_dim][t % 16]. The
// scores of 16 positions are then one vector sum over head_dim of (q[d] broadcast) x (16 keys' d-th
// element), with no horizontal reduction per score: one AVX-512 load (two AVX2 loads) of a block's
// row. (Blocks of 8, the AVX2 width, made the AVX-512 kernels join two half rows per load: over the
// f16 cache they took 0.180 ms instead of 0.166 for 7 heads x 8k keys in L1.)
constexpr int kKeyBlock = 16;
inline size_t key_offset(int t, int d, int head_dim) {
    return (size_t(t / kKeyBlock) * size_t(head_dim) + size_t(d)) * kKeyBlock + size_t(t % kKeyBlock);
}
// A bf16 cache is laid out for `vdpbf16ps`, which sums the products of pairs of adjacent bf16s into
// one f32 lane: keys in blocks of 16 positions with the dimensions in pairs,
// [t / 16][d / 2][t % 16][d % 2], so that one 64-byte load is two dimensions of 16 keys (16 scores
// a dot product); values with the positions in pairs, [t / 2][d][t % 2], so that one load is two
// positions of 16 dimensions.
constexpr int kKeyBlockBf16 = 16;
inline size_t key_offset_bf16(int t, int d, int head_dim) {
    return (size_t(t / kKeyBlockBf16) * size_t(head_dim) + size_t(d & ~1)) * kKeyBlockBf16 + size_t(t % kKeyBlockBf16) * 2 +
           size_t(d & 1);
}
inline size_t value_offset_bf16(int t, int d, int head_dim) {
    return (size_t(t / 2) * size_t(head_dim) + size_t(d)) * 2 + size_t(t % 2);
}
// Positions a cache of n positions allocates: whole key blocks of either layout. A range of keys that
// starts at a multiple of 16 starts at element t0 * head_dim in every layout.
inline size_t key_positions(int n) { return (size_t(n) + kKeyBlockBf16 - 1) / kKeyBlockBf16 * kKeyBlockBf16; }

// Keys are taken kAttnBlock at a time (whole key blocks), each block of K, then of V, read from L1
// by every group of heads.
constexpr int kAttnBlock = 32;
// The SIMD kernels ask for the block of a long context two blocks ahead, into L2, while they compute
// this one. On Zen 4, from DRAM, one step of Qwen2.5-0.5B's attention at 8k on one core
// (benchmarks/attention.py less its threads): L2 at 1, 2 or 4 blocks 1.1-1.2x the time with the cache
// in L1; L1 at 1 block 1.2x, at 2 blocks 1.4x (prefetched lines evicted before use); none 1.6x. On
// Zen 3, one block ahead was too close for L1: the first loads of a block waited.
constexpr int kAttnAhead = 2 * kAttnBlock;
// Scores: G rows of n_keys (the portable kernel's two passes), or of one block (the AVX2 pass); then
// G rows of head_dim (q rounded to bf16).
inline size_t attention_scratch_floats(int G, int n_keys, int head_dim) {
    return size_t(G) * (size_t(n_keys > kAttnBlock ? n_keys : kAttnBlock) + size_t(head_dim));
}

const Kernels* kernels_generic();
#if defined(QWEN2RT_X86)
const Kernels* kernels_avx2();
const Kernels* kernels_avx512();
// AVX-512 with the prefill's bf16, q8 and q4 matmuls on AMX tiles (kernels_amx.cpp); nullptr when
// this build's assembler has no AMX. amx_usable(): the CPU and OS have AMX-BF16, Linux granted the
// tile state, and the kernels agreed with their emulation once (asked by available_isas after the
// AVX-512 check).
const Kernels* kernels_amx();
bool amx_usable();
// The same kernels over an emulation of the tiles, for tests on AVX-512 CPUs without AMX: never
// picked by detection, only by name ("amx-emulated").
const Kernels* kernels_amx_emulated();
// Whether a tile product on this thread leaves the thread's own tile configuration as it found it
// (a configuration other AMX code set, then a product): true where it does (tests). emulated: on the
// emulated tiles; else the real ones (false where amx_usable() is not).
bool amx_keeps_tile_config(bool emulated);
namespace avx512 {
// The instruction each prefill multiplies with: F32 `vfmadd231ps` (f32 weights, 16 multiply-adds),
// Bf16 `vdpbf16ps` (bf16, 32), Int8 `vpdpbusd` (q8 and q4, 64). multiply_add_loop runs iters x 12 of
// it on registers alone, for timing one core's peak (multiply_add_peak in bindings.cpp, which
// benchmarks/ compare the prefills with). Only where the avx512 table runs.
enum class MultiplyAdd { F32, Bf16, Int8 };
constexpr int multiply_adds_per_instruction(MultiplyAdd op) { return op == MultiplyAdd::F32 ? 16 : op == MultiplyAdd::Bf16 ? 32 : 64; }
void multiply_add_loop(MultiplyAdd op, long iters);
}
// The AVX-512 attention hands head sizes other than 64 and 128 to the AVX2 one.
namespace avx2 {
void attention_f32(const float* q, int G, int head_dim, const float* K, const float* V, int n_keys, float scale,
                   float* scratch, float* out, float* lse);
void attention_f16(const float* q, int G, int head_dim, const uint16_t* K, const uint16_t* V, int n_keys,
                   float scale, float* scratch, float* out, float* lse);
}  // namespace avx2
#endif

// The table for an ISA name, or nullptr when this build or CPU lacks it.
const Kernels* find_kernels(const std::string& isa);
// The table in use (QWEN2RT_ISA if set and valid, else the best the CPU has).
const Kernels& active_kernels();
// Force a path; throws InvalidArgument for an unknown or unavailable one.
void set_active_isa(const std::string& isa);

}  // namespace qwen2rt
