// Dequantizers for the ggml block formats, written from the format descriptions (see gguf_dequant.h).
//
// Bit-exactness with the gguf package's numpy reference: the same float32 operations in the same
// order, scale = d * float(sub-block scale), then value = scale * q (+/- min). Every product here is
// exact in float32 (an f16 significand of 11 bits times integers of at most 7 + 6 significant bits is
// at most 24 bits, far from overflow and underflow), so only the final add rounds, and a compiler contracting a*b+c into a fused
// multiply-add cannot change any result.
//
// Block layouts (little-endian; "f16" is an IEEE half):
//   Q4_0  32 elems, 18 B: f16 d | 16 B nibbles. Element i<16 = low nibble of byte i, i>=16 = high nibble
//         of byte i-16; value = d * (q - 8).
//   Q4_1  32 elems, 20 B: f16 d | f16 m | 16 B nibbles (as Q4_0); value = d * q + m.
//   Q5_0  32 elems, 22 B: f16 d | u32 qh | 16 B nibbles; bit i of qh is bit 4 of element i;
//         value = d * (q - 16).
//   Q5_1  32 elems, 24 B: f16 d | f16 m | u32 qh | 16 B nibbles; value = d * q + m.
//   Q8_0  32 elems, 34 B: f16 d | 32 x int8; value = q * d.
//   K formats: 256-element super-blocks. Where 2-bit fields are packed, a 32-byte group holds four
//   consecutive runs of 32 elements in bit pairs 0-1, 2-3, 4-5, 6-7; nibbles hold two runs (low, high).
//   Q2_K  84 B: 16 B scales (low nibble: scale, high nibble: min, per 16 elements) | 64 B 2-bit quants
//         (two 32-byte groups of 128 elements) | f16 d | f16 dmin;
//         value = (d * scale) * q - dmin * min.
//   Q3_K 110 B: 32 B hmask (bit k of byte l: high bit of element 32k+l) | 64 B 2-bit low quants (as
//         Q2_K) | 12 B 6-bit scales | f16 d. q = low - (high bit ? 0 : 4); value = (d * (scale-32)) * q.
//         Scale i (of 16, one per 16 elements): low 4 bits = nibble (i<8 ? low : high) of byte i%8,
//         high 2 bits = bits 2*(i/4).. of byte 8 + i%4.
//   Q4_K 144 B: f16 d | f16 dmin | 12 B 6-bit scales and mins (8 each, one per 32 elements) | 128 B
//         nibbles (32-byte group g holds runs 2g (low) and 2g+1 (high)); value = (d*sc)*q - dmin*m.
//         For j<4: sc = b[j] & 63, m = b[j+4] & 63; for j>=4: sc = (b[j+4] & 15) | (b[j-4] >> 6) << 4,
//         m = (b[j+4] >> 4) | (b[j] >> 6) << 4.
//   Q5_K 176 B: as Q4_K with 32 B qh after the scales (bit s of byte l: bit 4 of element 32s+l).
//   Q6_K 210 B: 128 B low nibbles | 64 B 2-bit highs | 16 x int8 scales | f16 d. Per 128-element half h:
//         element r: low = nibble (r/64) of ql[64h + r%64], high = bit pair (r/32) of qh[32h + r%32];
//         q = (low | high << 4) - 32; value = (d * scale[j/16]) * q.
#include "gguf_dequant.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "common.h"

// GCC (and clang) fully unroll the 16-iteration inner loops before the loop vectoriser sees them, and
// the straight-line code is then left scalar; keeping them as loops gets them vectorised (2-2.5x).
#if defined(__GNUC__)
#define QWEN2RT_KEEP_LOOP _Pragma("GCC unroll 1")
#else
#define QWEN2RT_KEEP_LOOP
#endif

namespace qwen2rt {

namespace {

inline uint16_t load_u16(const uint8_t* p) { return uint16_t(p[0] | (p[1] << 8)); }
inline uint32_t load_u32(const uint8_t* p) {
    return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}
inline float half(const uint8_t* p) { return f16_to_f32(load_u16(p)); }

// kBit[i] = 1 << i: masks the high bit of element i out of a Q5 block's 32-bit qh with a table
// load instead of a per-element variable shift, which SSE2 cannot vectorise.
constexpr uint32_t kBit[32] = {
    1u << 0,  1u << 1,  1u << 2,  1u << 3,  1u << 4,  1u << 5,  1u << 6,  1u << 7,  1u << 8,  1u << 9,  1u << 10,
    1u << 11, 1u << 12, 1u << 13, 1u << 14, 1u << 15, 1u << 16, 1u << 17, 1u << 18, 1u << 19, 1u << 20, 1u << 21,
    1u << 22, 1u << 23, 1u << 24, 1u << 25, 1u << 26, 1u << 27, 1u << 28, 1u << 29, 1u << 30, 1u << 31};

}  // namespace

void dequantize_row_f16(const uint8_t* blocks, float* out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = f16_to_f32(load_u16(blocks + 2 * i));
}

void dequantize_row_bf16(const uint8_t* blocks, float* out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = bf16_to_f32(load_u16(blocks + 2 * i));
}

void dequantize_row_q4_0(const uint8_t* blocks, float* out, int64_t n) {
    for (int64_t b = 0; b < n / 32; b++, blocks += 18, out += 32) {
        const float d = half(blocks);
        const uint8_t* qs = blocks + 2;
        QWEN2RT_KEEP_LOOP
        for (int i = 0; i < 16; i++) out[i] = d * float(int(qs[i] & 15) - 8);
        QWEN2RT_KEEP_LOOP
        for (int i = 0; i < 16; i++) out[i + 16] = d * float(int(qs[i] >> 4) - 8);
    }
}

void dequantize_row_q4_1(const uint8_t* blocks, float* out, int64_t n) {
    for (int64_t b = 0; b < n / 32; b++, blocks += 20, out += 32) {
        const float d = half(blocks), m = half(blocks + 2);
        const uint8_t* qs = blocks + 4;
        QWEN2RT_KEEP_LOOP
        for (int i = 0; i < 16; i++) out[i] = d * float(qs[i] & 15) + m;
        QWEN2RT_KEEP_LOOP
        for (int i = 0; i < 16; i++) out[i + 16] = d * float(qs[i] >> 4) + m;
    }
}

void dequantize_row_q5_0(const uint8_t* blocks, float* out, int64_t n) {
    for (int64_t b = 0; b < n / 32; b++, blocks += 22, out += 32) {
        const float d = half(blocks);
        const uint32_t qh = load_u32(blocks + 2);
        const uint8_t* qs = blocks + 6;
        QWEN2RT_KEEP_LOOP
        for (int i = 0; i < 16; i++) out[i] = d * float(int((qs[i] & 15) | ((qh & kBit[i]) ? 16 : 0)) - 16);
        QWEN2RT_KEEP_LOOP
        for (int i = 0; i < 16; i++) out[i + 16] = d * float(int((qs[i] >> 4) | ((qh & kBit[i + 16]) ? 16 : 0)) - 16);
    }
}

void dequantize_row_q5_1(const uint8_t* blocks, float* out, int64_t n) {
    for (int64_t b = 0; b < n / 32; b++, blocks += 24, out += 32) {
        const float d = half(blocks), m = half(blocks + 2);
        const uint32_t qh = load_u32(blocks + 4);
        const uint8_t* qs = blocks + 8;
        QWEN2RT_KEEP_LOOP
        for (int i = 0; i < 16; i++) out[i] = d * float((qs[i] & 15) | ((qh & kBit[i]) ? 16 : 0)) + m;
        QWEN2RT_KEEP_LOOP
        for (int i = 0; i < 16; i++) out[i + 16] = d * float((qs[i] >> 4) | ((qh & kBit[i + 16]) ? 16 : 0)) + m;
    }
}

void dequantize_row_q8_0(const uint8_t* blocks, float* out, int64_t n) {
    for (int64_t b = 0; b < n / 32; b++, blocks += 34, out += 32) {
        const float d = half(blocks);
        const int8_t* qs = reinterpret_cast<const int8_t*>(blocks + 2);
        QWEN2RT_KEEP_LOOP
        for (int i = 0; i < 32; i++) out[i] = float(qs[i]) * d;
    }
}

void dequantize_row_q2_k(const uint8_t* blocks, float* out, int64_t n) {
    for (int64_t b = 0; b < n / 256; b++, blocks += 84, out += 256) {
        const uint8_t* scales = blocks;
        const float d = half(blocks + 80), dmin = half(blocks + 82);
        for (int h = 0; h < 2; h++) {
            const uint8_t* qs = blocks + 16 + 32 * h;
            for (int s = 0; s < 4; s++) {          // 32-element run: bit pair s of the group
                for (int k = 0; k < 2; k++) {      // two 16-element sub-blocks, one scale each
                    const int g = 8 * h + 2 * s + k;
                    const float dl = d * float(scales[g] & 15);
                    const float ml = dmin * float(scales[g] >> 4);
                    float* o = out + 16 * g;
                    const uint8_t* q = qs + 16 * k;
                    QWEN2RT_KEEP_LOOP
                    for (int i = 0; i < 16; i++) o[i] = dl * float((q[i] >> (2 * s)) & 3) - ml;
                }
            }
        }
    }
}

void dequantize_row_q3_k(const uint8_t* blocks, float* out, int64_t n) {
    for (int64_t b = 0; b < n / 256; b++, blocks += 110, out += 256) {
        const uint8_t* hmask = blocks;
        const uint8_t* sc = blocks + 96;
        const float d = half(blocks + 108);
        for (int h = 0; h < 2; h++) {
            const uint8_t* qs = blocks + 32 + 32 * h;
            for (int s = 0; s < 4; s++) {
                const int run = 4 * h + s;  // 32-element run, 0..7: its high bits are bit `run` of hmask
                for (int k = 0; k < 2; k++) {
                    const int g = 2 * run + k;
                    const int lo = g < 8 ? (sc[g] & 15) : (sc[g - 8] >> 4);
                    const int hi = (sc[8 + g % 4] >> (2 * (g / 4))) & 3;
                    const float dl = d * float((lo | hi << 4) - 32);
                    float* o = out + 16 * g;
                    const uint8_t* q = qs + 16 * k;
                    const uint8_t* hm = hmask + 16 * k;
                    QWEN2RT_KEEP_LOOP
                    for (int i = 0; i < 16; i++) {
                        const int v = int((q[i] >> (2 * s)) & 3) - (((hm[i] >> run) & 1) ? 0 : 4);
                        o[i] = dl * float(v);
                    }
                }
            }
        }
    }
}

namespace {
// The 6-bit scale and min of sub-block j (0..7) of a Q4_K / Q5_K block.
inline void k_scale_min(const uint8_t* b, int j, int& sc, int& m) {
    if (j < 4) {
        sc = b[j] & 63;
        m = b[j + 4] & 63;
    } else {
        sc = (b[j + 4] & 15) | (b[j - 4] >> 6) << 4;
        m = (b[j + 4] >> 4) | (b[j] >> 6) << 4;
    }
}
}  // namespace

void dequantize_row_q4_k(const uint8_t* blocks, float* out, int64_t n) {
    for (int64_t b = 0; b < n / 256; b++, blocks += 144, out += 256) {
        const float d = half(blocks), dmin = half(blocks + 2);
        const uint8_t* scales = blocks + 4;
        for (int j = 0; j < 8; j++) {
            int sc, m;
            k_scale_min(scales, j, sc, m);
            const float dl = d * float(sc), ml = dmin * float(m);
            const uint8_t* qs = blocks + 16 + 32 * (j / 2);
            const int shift = 4 * (j % 2);
            float* o = out + 32 * j;
            QWEN2RT_KEEP_LOOP
            for (int i = 0; i < 32; i++) o[i] = dl * float((qs[i] >> shift) & 15) - ml;
        }
    }
}

void dequantize_row_q5_k(const uint8_t* blocks, float* out, int64_t n) {
    for (int64_t b = 0; b < n / 256; b++, blocks += 176, out += 256) {
        const float d = half(blocks), dmin = half(blocks + 2);
        const uint8_t* scales = blocks + 4;
        const uint8_t* qh = blocks + 16;
        for (int j = 0; j < 8; j++) {
            int sc, m;
            k_scale_min(scales, j, sc, m);
            const float dl = d * float(sc), ml = dmin * float(m);
            const uint8_t* qs = blocks + 48 + 32 * (j / 2);
            const int shift = 4 * (j % 2);
            float* o = out + 32 * j;
            QWEN2RT_KEEP_LOOP
            for (int i = 0; i < 32; i++) {
                const int q = int((qs[i] >> shift) & 15) | int((qh[i] >> j) & 1) << 4;
                o[i] = dl * float(q) - ml;
            }
        }
    }
}

void dequantize_row_q6_k(const uint8_t* blocks, float* out, int64_t n) {
    for (int64_t b = 0; b < n / 256; b++, blocks += 210, out += 256) {
        const int8_t* scales = reinterpret_cast<const int8_t*>(blocks + 192);
        const float d = half(blocks + 208);
        for (int h = 0; h < 2; h++) {
            const uint8_t* ql = blocks + 64 * h;
            const uint8_t* qh = blocks + 128 + 32 * h;
            for (int s = 0; s < 4; s++) {  // 32-element run within the half
                const uint8_t* lo = ql + 32 * (s % 2);
                const int lshift = 4 * (s / 2);
                for (int k = 0; k < 2; k++) {
                    const int g = 8 * h + 2 * s + k;
                    const float dl = d * float(scales[g]);
                    float* o = out + 16 * g;
                    QWEN2RT_KEEP_LOOP
                    for (int i = 0; i < 16; i++) {
                        const int l = 16 * k + i;
                        const int q = (int((lo[l] >> lshift) & 15) | int((qh[l] >> (2 * s)) & 3) << 4) - 32;
                        o[i] = dl * float(q);
                    }
                }
            }
        }
    }
}

namespace {

struct Format {
    int block;  // elements per block
    int bytes;  // bytes per block
    void (*fn)(const uint8_t*, float*, int64_t);
};

bool find_format(int type, Format& f) {
    switch (type) {
        case GGML_F16: f = {1, 2, dequantize_row_f16}; return true;
        case GGML_BF16: f = {1, 2, dequantize_row_bf16}; return true;
        case GGML_Q4_0: f = {32, 18, dequantize_row_q4_0}; return true;
        case GGML_Q4_1: f = {32, 20, dequantize_row_q4_1}; return true;
        case GGML_Q5_0: f = {32, 22, dequantize_row_q5_0}; return true;
        case GGML_Q5_1: f = {32, 24, dequantize_row_q5_1}; return true;
        case GGML_Q8_0: f = {32, 34, dequantize_row_q8_0}; return true;
        case GGML_Q2_K: f = {256, 84, dequantize_row_q2_k}; return true;
        case GGML_Q3_K: f = {256, 110, dequantize_row_q3_k}; return true;
        case GGML_Q4_K: f = {256, 144, dequantize_row_q4_k}; return true;
        case GGML_Q5_K: f = {256, 176, dequantize_row_q5_k}; return true;
        case GGML_Q6_K: f = {256, 210, dequantize_row_q6_k}; return true;
        default: return false;
    }
}

Format checked_format(int type, int64_t n_elements) {
    Format f;
    if (!find_format(type, f)) throw InvalidArgument("dequantize_gguf: unsupported ggml type " + std::to_string(type));
    if (n_elements < 0) throw InvalidArgument("dequantize_gguf: negative element count");
    if (n_elements % f.block)
        throw InvalidArgument("dequantize_gguf: " + std::to_string(n_elements) + " elements is not a multiple of the block size " +
                              std::to_string(f.block));
    return f;
}

}  // namespace

bool gguf_dequant_supported(int ggml_type) {
    Format f;
    return find_format(ggml_type, f);
}

size_t gguf_dequant_src_bytes(int ggml_type, int64_t n_elements) {
    const Format f = checked_format(ggml_type, n_elements);
    return checked_mul(size_t(n_elements / f.block), size_t(f.bytes));
}

bool dequantize_gguf(int ggml_type, const uint8_t* src, size_t src_bytes, float* dst, int64_t n_elements, int threads) {
    const Format f = checked_format(ggml_type, n_elements);
    const size_t need = checked_mul(size_t(n_elements / f.block), size_t(f.bytes));
    if (src_bytes != need)
        throw InvalidArgument("dequantize_gguf: " + std::to_string(n_elements) + " elements of type " + std::to_string(ggml_type) +
                              " take " + std::to_string(need) + " bytes, got " + std::to_string(src_bytes));
    if (threads < 1) throw InvalidArgument("dequantize_gguf: threads must be >= 1");
    if (n_elements == 0) return true;
    if (!src || !dst) throw InvalidArgument("dequantize_gguf: null buffer");

    // Chunks of about 16K output floats (64 KiB). Guided scheduling hands out long contiguous runs
    // first and short ones at the end, so a thread that lost its core (oversubscribed machine) does
    // not hold up the others the way a static split would.
    const int64_t n_blocks = n_elements / f.block;
    const int64_t chunk = std::max<int64_t>(1, 16384 / f.block);
    const int64_t n_chunks = (n_blocks + chunk - 1) / chunk;
    const int nt = int(std::min<int64_t>(threads, n_chunks));
    if (nt <= 1) {
        f.fn(src, dst, n_elements);
        return true;
    }
#pragma omp parallel for num_threads(nt) schedule(guided)
    for (int64_t c = 0; c < n_chunks; c++) {
        const int64_t b0 = c * chunk;
        const int64_t nb = std::min(chunk, n_blocks - b0);
        f.fn(src + b0 * f.bytes, dst + b0 * f.block, nb * f.block);
    }
    return true;
}

}  // namespace qwen2rt
