// Quantized weight formats q8, q6 and q4, and the int8 activations they are multiplied with.
// docs/formats.md explains the choices; in short:
//
// A weight matrix [N rows, K cols] is cut into groups of 16 rows (one AVX-512 register holds one
// int32 accumulator per row) and blocks of 32 columns (one scale per row and block). Rows past N
// and columns past K are zero padding. The bytes of one (row group, block) are contiguous:
//
//   q8 (8.5 bits/weight, 544 bytes):  f16 scale[16] | 8 x (16 rows x 4 uint8)
//       byte 32 + 64*g + 4*r + j holds q + 128 for row r, column 4g + j; w = scale[r] * q, q in -127..127
//   q4 (4.5 bits/weight, 288 bytes):  f16 scale[16] | 4 x (16 rows x 4 uint8)
//       byte 32 + 64*g + 4*r + j holds q(column 8g + j) | q(column 8g + 4 + j) << 4 for row r;
//       w = scale[r] * (q - 8), q in 0..15
//   q6 (6.5 bits/weight, 416 bytes):  q4's 288 bytes holding the low 4 bits of q | 2 x (16 rows x 4 uint8)
//       byte 288 + 64*h + 4*r + j holds the high 2 bits of q(column 16h + 4m + j) at bits 2m, 2m + 1
//       (m = 0..3) for row r; w = scale[r] * (q - 32), q in 0..63
//
// so that 64 bytes are one register of 16 rows x 4 columns: `vpdpbusd` multiplies it with 4
// activation bytes broadcast to every lane and adds into 16 row sums, with no horizontal
// reduction. Weights are the unsigned operand (q + 128, the nibble itself, or the nibble with its
// two high bits put above it); the activation is int8, so the offset (128, 32 or 8) times the sum of
// the activation block is subtracted once per block. q6 is the lm_head of q4 models: llama.cpp's
// Q4_0 files keep theirs in 6 bits too (Q6_K): a quarter of q4's rounding step, 2 bits under q8.
//
// Activations are quantized once per input vector, per block of 32: int8 q, f32 scale, and the
// block's sum of q.
//
// bf16 matrices are packed in groups too, with no scales: groups of 32 rows, column pair by column
// pair (kBf16Rows and bf16_group below). A decode tile reads its group as one stream; reading 4 rows
// of a row-major matrix at once, 4 streams, read 45 GB/s where a plain read got 57 (Zen 4, 2 threads,
// a 0.5B model's layer matrices in 2 MiB pages), and the earlier 8-row groups 56.5.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common.h"

namespace qwen2rt {

constexpr int kQRows = 16;   // rows interleaved in one group
constexpr int kQBlock = 32;  // columns sharing one scale
constexpr size_t kQ8BlockBytes = 32 + 512;
constexpr size_t kQ4BlockBytes = 32 + 256;
constexpr size_t kQ6BlockBytes = kQ4BlockBytes + 128;

// Bytes of one (row group, block) of a packed format, and the offset its unsigned levels carry.
constexpr size_t q_block_bytes(DType t) {
    return t == DType::Q8 ? kQ8BlockBytes : t == DType::Q6 ? kQ6BlockBytes : kQ4BlockBytes;
}
constexpr int32_t q_zero_point(DType t) { return t == DType::Q8 ? 128 : t == DType::Q6 ? 32 : 8; }

static inline int q_row_groups(int rows) { return (rows + kQRows - 1) / kQRows; }
static inline int q_blocks(int cols) { return (cols + kQBlock - 1) / kQBlock; }

// Bytes of a packed [rows, cols] matrix (t: Q8, Q6 or Q4).
size_t q_bytes(DType t, int rows, int cols);
size_t bf16_bytes(int rows, int cols);

// A packed bf16 matrix of K columns is held in groups of kBf16Rows rows, each group column pair by
// column pair: [n / 32][k / 2][n % 32][k % 2], columns zero-padded to whole blocks of 32 (as the
// q8/q4 layouts are) and rows to a whole group. One column pair of a group is then 32 rows' 4-byte
// pairs, 128 contiguous bytes: two vectors of 16 rows, the operand a `vdpbf16ps` (AVX-512) or an
// AMX B tile (TDPBF16PS) takes as it lies, so the prefill multiplies the weights with no repacking.
constexpr int kBf16Rows = 32;
// uint16s of one group
static inline size_t bf16_group_values(int K) { return size_t(q_blocks(K)) * kQBlock * kBf16Rows; }
// The group holding row n, as 32-bit column pairs: pair p of row n % 32 is at [p * 32 + n % 32].
static inline const uint32_t* bf16_group(const uint16_t* W, int K, int n) {
    return reinterpret_cast<const uint32_t*>(W + size_t(n / kBf16Rows) * bf16_group_values(K));
}
// Where value (n, k) is, in uint16s from W.
static inline size_t bf16_index(int K, int n, int k) {
    return size_t(n / kBf16Rows) * bf16_group_values(K) + (size_t(k / 2) * kBf16Rows + size_t(n % kBf16Rows)) * 2 +
           size_t(k % 2);
}
// A row-major float32 matrix rounded to bf16 (nearest even) into the packed layout, zero-padded.
void pack_bf16(const float* W, int rows, int cols, size_t ldw, uint16_t* out, int threads);
void unpack_row_bf16(const uint16_t* packed, int cols, int row, float* out);

// Quantize a row-major float32 matrix into the packed layout of t (rows of W are `ldw` floats
// apart). q8: scale = max|w| / 127, round to nearest. q4 and q6: for each block the scale is chosen
// among candidates around max|w| / 8 (q6: / 32) to minimise the squared error (docs/formats.md).
void quantize_q(DType t, const float* W, int rows, int cols, size_t ldw, uint8_t* out, int threads);

// The level of column j (< 32) of row r in a block of t, its offset included (w = scale[r] *
// (level - q_zero_point(t))): the layouts above, one value at a time, for the portable kernels.
inline int q_level(DType t, const uint8_t* blk, int r, int j) {
    const uint8_t* row = blk + 32 + 4 * r;
    if (t == DType::Q8) return row[64 * (j / 4) + j % 4];
    const uint8_t byte = row[64 * (j / 8) + j % 4];
    const int low = (j % 8) < 4 ? (byte & 15) : (byte >> 4);
    if (t == DType::Q4) return low;
    return low | ((row[256 + 64 * (j / 16) + j % 4] >> (2 * ((j / 4) % 4))) & 3) << 4;
}

// One row of a packed matrix of t back to float32 (cols values): embedding lookups and tests.
void dequantize_row_q(DType t, const uint8_t* packed, int cols, int row, float* out);

// Activation rows quantized for the q8/q4 matmuls: for M rows of K values, K padded to a multiple
// of 32; q [M, Kp] int8, d [M, Kp/32] scales, s [M, Kp/32] block sums of q.
struct QuantizedActs {
    int8_t* q = nullptr;
    float* d = nullptr;
    int32_t* s = nullptr;
    int blocks = 0;  // per row
};

}  // namespace qwen2rt
