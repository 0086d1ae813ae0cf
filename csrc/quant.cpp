// Quantizing weights into the q8 / q6 / q4 layouts of quant.h, and reading single rows back.
#include "quant.h"

#include <cmath>
#include <cstring>

#include "common.h"
#include "numeric.h"

namespace qwen2rt {

size_t q_bytes(DType t, int rows, int cols) { return size_t(q_row_groups(rows)) * q_blocks(cols) * q_block_bytes(t); }
size_t bf16_bytes(int rows, int cols) {
    return size_t((rows + kBf16Rows - 1) / kBf16Rows) * bf16_group_values(cols) * 2;
}

namespace {

// The values of one block (up to 32, zero-padded) of row r.
void load_block(const float* W, int rows, int cols, size_t ldw, int r, int b, float* v) {
    for (int j = 0; j < kQBlock; j++) {
        const int c = b * kQBlock + j;
        v[j] = (r < rows && c < cols) ? W[size_t(r) * ldw + c] : 0.f;
    }
}

// q8: scale = max|w| / 127 (held as f16), q = round(w / scale).
void quantize_block_q8(const float* v, uint16_t& scale, int8_t* q) {
    float amax = 0.f;
    for (int j = 0; j < kQBlock; j++) amax = std::fmax(amax, std::fabs(v[j]));
    scale = f32_to_f16(amax / 127.f);
    const float d = f16_to_f32(scale);
    const float inv = d > 0.f ? 1.f / d : 0.f;
    for (int j = 0; j < kQBlock; j++) {
        float x = round_even(v[j] * inv);
        x = x < 127.f ? x : 127.f;
        q[j] = int8_t(x > -127.f ? x : -127.f);
    }
}

// q4 and q6: levels -L..L-1 times a scale (L = 8, 32). Like Q4_0, the value of largest magnitude
// goes to the -L end (scale = -max / t), but t is searched in L-1..L+1 and each candidate's scale
// is refit by least squares for its levels; the candidate with the smallest squared error wins.
// With the least-squares scale d = <v,l> / <l,l>, the error is |v|^2 - <v,l>^2 / <l,l>: one pass
// per candidate. Clamped in integers, which vectorise (float min/max with their NaN rules do not).
template <int L>
inline float clamp_level(float l) {
    int i = int(l);
    i = i < L - 1 ? i : L - 1;
    return float(i > -L ? i : -L);
}

// q[j] = level + L, in 0..2L-1
template <int L>
void quantize_block_levels(const float* v, uint16_t& scale, uint8_t* q) {
    float mx = 0.f;
    for (int j = 0; j < kQBlock; j++)
        if (std::fabs(v[j]) > std::fabs(mx)) mx = v[j];
    if (mx == 0.f) {
        scale = 0;
        for (int j = 0; j < kQBlock; j++) q[j] = L;
        return;
    }
    float best_gain = -1.f, best_d = -mx / float(L);
    for (int step = 0; step <= 8; step++) {
        const float inv = -(float(L - 1) + 0.25f * float(step)) / mx;
        float lane_xl[8] = {}, lane_ll[8] = {};  // 8 independent sums: the loop vectorises
        for (int j0 = 0; j0 < kQBlock; j0 += 8)
            for (int k = 0; k < 8; k++) {
                const float l = clamp_level<L>(round_even(v[j0 + k] * inv));
                lane_xl[k] += v[j0 + k] * l;
                lane_ll[k] += l * l;
            }
        float sxl = 0.f, sll = 0.f;
        for (int k = 0; k < 8; k++) sxl += lane_xl[k], sll += lane_ll[k];
        const float gain = sll > 0.f ? sxl * sxl / sll : 0.f;  // |v|^2 - error
        if (gain > best_gain) best_gain = gain, best_d = sxl / sll;
    }
    scale = f32_to_f16(best_d);
    const float d = f16_to_f32(scale);
    const float inv = d != 0.f ? 1.f / d : 0.f;
    for (int j = 0; j < kQBlock; j++) {
        q[j] = uint8_t(int(clamp_level<L>(round_even(v[j] * inv))) + L);
    }
}

}  // namespace

// The loop every format shares: every (row group, block) pair in parallel, each of its 16 rows
// quantized by `pack(values, scale, block)`, the 16 scales in front.
template <class PackRow>
static void quantize_packed(const float* W, int rows, int cols, size_t ldw, uint8_t* out, size_t block_bytes,
                            int threads, PackRow pack) {
    const int G = q_row_groups(rows), B = q_blocks(cols);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 4)
    for (int64_t gb = 0; gb < int64_t(G) * B; gb++) {
        const int g = int(gb / B), b = int(gb % B);
        uint8_t* blk = out + size_t(gb) * block_bytes;
        uint16_t scales[kQRows];
        for (int r = 0; r < kQRows; r++) {
            float v[kQBlock];
            load_block(W, rows, cols, ldw, g * kQRows + r, b, v);
            pack(v, scales[r], blk + 32 + 4 * r);
        }
        std::memcpy(blk, scales, sizeof(scales));
    }
}

void quantize_q(DType t, const float* W, int rows, int cols, size_t ldw, uint8_t* out, int threads) {
    if (t == DType::Q8)
        return quantize_packed(W, rows, cols, ldw, out, kQ8BlockBytes, threads, [](const float* v, uint16_t& scale, uint8_t* row) {
            int8_t q[kQBlock];
            quantize_block_q8(v, scale, q);
            for (int j = 0; j < kQBlock; j++) row[64 * (j / 4) + j % 4] = uint8_t(int(q[j]) + 128);
        });
    // column 8i + j (j < 4) in the low nibble, 8i + 4 + j in the high nibble; q6 then the high 2 bits
    // of column 16h + 4m + j at bits 2m of byte 256 + 64h + j
    auto pack_nibbles = [](const uint8_t* q, uint8_t* row) {
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 4; j++) row[64 * i + j] = uint8_t((q[8 * i + j] & 15) | (q[8 * i + 4 + j] & 15) << 4);
    };
    if (t == DType::Q4)
        return quantize_packed(W, rows, cols, ldw, out, kQ4BlockBytes, threads, [&](const float* v, uint16_t& scale, uint8_t* row) {
            uint8_t q[kQBlock];
            quantize_block_levels<8>(v, scale, q);
            pack_nibbles(q, row);
        });
    quantize_packed(W, rows, cols, ldw, out, kQ6BlockBytes, threads, [&](const float* v, uint16_t& scale, uint8_t* row) {
        uint8_t q[kQBlock];
        quantize_block_levels<32>(v, scale, q);
        pack_nibbles(q, row);
        for (int h = 0; h < 2; h++)
            for (int j = 0; j < 4; j++) {
                uint8_t bits = 0;
                for (int m = 0; m < 4; m++) bits |= uint8_t((q[16 * h + 4 * m + j] >> 4) << (2 * m));
                row[256 + 64 * h + j] = bits;
            }
    });
}

void dequantize_row_q(DType t, const uint8_t* packed, int cols, int row, float* out) {
    const int B = q_blocks(cols), g = row / kQRows, r = row % kQRows;
    const size_t block_bytes = q_block_bytes(t);
    const int zero = q_zero_point(t);
    for (int b = 0; b < B; b++) {
        const uint8_t* blk = packed + (size_t(g) * B + b) * block_bytes;
        uint16_t s;
        std::memcpy(&s, blk + 2 * r, 2);
        const float d = f16_to_f32(s);
        for (int j = 0; j < kQBlock && b * kQBlock + j < cols; j++) out[b * kQBlock + j] = d * float(q_level(t, blk, r, j) - zero);
    }
}

void pack_bf16(const float* W, int rows, int cols, size_t ldw, uint16_t* out, int threads) {
    const int G = (rows + kBf16Rows - 1) / kBf16Rows, P = q_blocks(cols) * kQBlock / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t g = 0; g < G; g++) {
        uint16_t* group = out + size_t(g) * bf16_group_values(cols);
        for (int p = 0; p < P; p++)
            for (int j = 0; j < kBf16Rows; j++) {
                const int r = int(g) * kBf16Rows + j;
                for (int i = 0; i < 2; i++) {
                    const int c = 2 * p + i;
                    group[(size_t(p) * kBf16Rows + size_t(j)) * 2 + size_t(i)] =  // = [bf16_index(cols, r, c)]
                        (r < rows && c < cols) ? f32_to_bf16(W[size_t(r) * ldw + c]) : 0;
                }
            }
    }
}

void unpack_row_bf16(const uint16_t* packed, int cols, int row, float* out) {
    for (int c = 0; c < cols; c++) out[c] = bf16_to_f32(packed[bf16_index(cols, row, c)]);
}

}  // namespace qwen2rt
