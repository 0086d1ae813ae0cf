// Dequantization of ggml/GGUF tensor data (the block formats plus F16 and BF16) to float32.
//
// Every function produces, bit for bit, what the `gguf` Python package's numpy reference
// (gguf/quants.py) produces: the same float32 operations in the same order.
#pragma once

#include <cstddef>
#include <cstdint>

namespace qwen2rt {

// ggml type ids (enum ggml_type) of the formats implemented here.
enum GgmlType : int {
    GGML_F16 = 1,
    GGML_Q4_0 = 2,
    GGML_Q4_1 = 3,
    GGML_Q5_0 = 6,
    GGML_Q5_1 = 7,
    GGML_Q8_0 = 8,
    GGML_Q2_K = 10,
    GGML_Q3_K = 11,
    GGML_Q4_K = 12,
    GGML_Q5_K = 13,
    GGML_Q6_K = 14,
    GGML_BF16 = 30,
};

// Row dequantizers: `blocks` holds n_elements / block_size consecutive blocks; `out` receives
// n_elements floats. n_elements must be a multiple of the format's block size (32 for Q4_0..Q8_0,
// 256 for the K formats, 1 for F16/BF16); these do no checking — use dequantize_gguf for that.
void dequantize_row_f16(const uint8_t* blocks, float* out, int64_t n_elements);
void dequantize_row_bf16(const uint8_t* blocks, float* out, int64_t n_elements);
void dequantize_row_q4_0(const uint8_t* blocks, float* out, int64_t n_elements);
void dequantize_row_q4_1(const uint8_t* blocks, float* out, int64_t n_elements);
void dequantize_row_q5_0(const uint8_t* blocks, float* out, int64_t n_elements);
void dequantize_row_q5_1(const uint8_t* blocks, float* out, int64_t n_elements);
void dequantize_row_q8_0(const uint8_t* blocks, float* out, int64_t n_elements);
void dequantize_row_q2_k(const uint8_t* blocks, float* out, int64_t n_elements);
void dequantize_row_q3_k(const uint8_t* blocks, float* out, int64_t n_elements);
void dequantize_row_q4_k(const uint8_t* blocks, float* out, int64_t n_elements);
void dequantize_row_q5_k(const uint8_t* blocks, float* out, int64_t n_elements);
void dequantize_row_q6_k(const uint8_t* blocks, float* out, int64_t n_elements);

// True when ggml_type is one of the types above.
bool gguf_dequant_supported(int ggml_type);

// Bytes that n_elements of ggml_type occupy. Throws InvalidArgument for an unsupported type, a
// negative count or one that is not a multiple of the block size.
size_t gguf_dequant_src_bytes(int ggml_type, int64_t n_elements);

// Dequantizes n_elements of ggml_type from src (src_bytes long) into dst, splitting the blocks
// across `threads` OpenMP threads. Checks everything before reading: throws InvalidArgument for an
// unsupported type, a bad count, src_bytes != the size n_elements needs, or threads < 1.
// Returns true (every failure throws).
bool dequantize_gguf(int ggml_type, const uint8_t* src, size_t src_bytes, float* dst, int64_t n_elements,
                     int threads);

}  // namespace qwen2rt
