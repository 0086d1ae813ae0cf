// The Qwen2 forward pass, top to bottom, in the order of transformers' modeling_qwen2.py:
//
//   embed_tokens
//   for each layer:
//       h = x + o_proj(attention(rope(q_proj(norm(x))), rope(k_proj(..)), v_proj(..)))
//       x = h + down_proj(silu(gate_proj(norm(h))) * up_proj(norm(h)))
//   logits = lm_head(norm(x))
//
// One OpenMP team runs a whole chunk of tokens: every thread takes its share of each step (rows of a
// weight matrix, tokens, or KV heads) and the team meets at a barrier between steps that depend on
// each other. Weights are f32 or bf16; activations, norms, softmax and accumulation are f32.
#include "qwen2.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <numeric>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#include "gguf_dequant.h"
#include "kernels.h"
#include "numeric.h"
#include "quant.h"

namespace qwen2rt {

// ---------------------------------------------------------------------------------------------
// A thread's place in the team, and the barrier that ends a step.

namespace {

struct Team {
    int tid = 0, nth = 1;
    Team() {
#ifdef _OPENMP
        tid = omp_get_thread_num();
        nth = omp_get_num_threads();
#endif
    }
    void sync() const {
#ifdef _OPENMP
#pragma omp barrier
#endif
    }
    // This thread's share [a, b) of n items, cut at multiples of `align` so that a thread owns whole
    // heads (align = head_dim) or whole register tiles.
    void split(int n, int align, int& a, int& b) const {
        const int units = (n + align - 1) / align;
        a = std::min(n, int(int64_t(units) * tid / nth) * align);
        b = std::min(n, int(int64_t(units) * (tid + 1) / nth) * align);
    }
};

// The next range [a, b) of `units` work units that this thread claims from `next`, which the team
// shares; false when none are left. A claim takes a share of what is left that shrinks as the work
// runs out (OpenMP's guided schedule), so that a thread slowed down (by the host, or by a share
// that costs more) leaves little for the others to wait on at the barrier.
bool claim(std::atomic<int>& next, int units, int nth, int& a, int& b) {
    int cur = next.load(std::memory_order_relaxed);
    while (cur < units) {
        const int end = std::min(units, cur + std::max(1, (units - cur) / (2 * nth)));
        if (next.compare_exchange_weak(cur, end, std::memory_order_relaxed)) {
            a = cur;
            b = end;
            return true;
        }
    }
    return false;
}

// Subnormal floats cost a hundred cycles an operation on many x86 cores, and a long context makes
// them: softmax weights of far-away keys times small values. Each thread of a pass flushes them to
// zero (MXCSR FTZ and DAZ) and restores its previous mode afterwards (the caller's thread is one).
struct FlushSubnormals {
#if defined(__x86_64__) || defined(__i386__)
    unsigned saved = _mm_getcsr();
    FlushSubnormals() { _mm_setcsr(saved | 0x8040u); }
    ~FlushSubnormals() { _mm_setcsr(saved); }
#endif
};

// The input rows of one or more matmuls: float32, and their int8 form (quant.h) for q8 / q6 / q4
// matrices or their token tiles for a tile backend's prompt products (kernels.h), made once per
// input and shared by every matrix that reads it.
struct MatmulInput {
    const float* x;
    int K;  // row length
    int8_t* q;
    float* d;
    int32_t* s;
    uint16_t* tiles = nullptr;  // null: the products read x (and q)

    int blocks() const { return q_blocks(K); }
    // Quantizes row t (the caller splits rows across threads and syncs before the matmuls).
    void quantize_row(const Kernels& Kn, int t) const { quantize_cols(Kn, t, 0, K); }
    // Quantizes columns [c0, c0 + len) of row t: whole blocks (c0 and len multiples of kQBlock, or
    // the range ends the row), so the thread that wrote them can quantize them at once.
    void quantize_cols(const Kernels& Kn, int t, int c0, int len) const {
        const size_t B = size_t(blocks()), b0 = size_t(c0 / kQBlock);
        Kn.quantize_acts(x + size_t(t) * K + c0, K, 1, len, q + (size_t(t) * B + b0) * kQBlock, d + size_t(t) * B + b0,
                         s + size_t(t) * B + b0);
    }
    // Columns [c0, c0 + len) of row t as token tiles, under the same rule as quantize_cols.
    void tile_cols(const Kernels& Kn, int t, int c0, int len) const {
        Kn.tile_tokens(x + size_t(t) * K, K, t, c0, c0 + len, tiles);
    }
    MatmulInput from_row(int r) const {  // (no tiles: they are made for a whole chunk)
        const size_t B = size_t(blocks());
        return {x + size_t(r) * K, K, q + size_t(r) * B * kQBlock, d + size_t(r) * B, s + size_t(r) * B};
    }
};

// Whether the products of W run on token tiles, where its input has them (kernels.h: matmul_tiles).
bool on_tiles(const MatmulInput& in, const Matrix& W) {
    return in.tiles && (W.dtype == DType::BF16 || is_quantized(W.dtype));
}

// Y[:, a:b] = X W[a:b]^T (+ bias) for this thread's rows [a, b) of W; with add (on token tiles
// only), Y[:, a:b] += X W[a:b]^T.
void matmul_rows(const Kernels& K, const MatmulInput& in, int M, const Matrix& W, const float* bias, float* Y,
                 int ldy, int a, int b, bool add = false) {
    if (a >= b) return;
    if (on_tiles(in, W)) return K.matmul_tiles(in.tiles, M, W.cols, int(W.dtype), W.data, bias, Y, ldy, a, b, add);
    const auto* packed = static_cast<const uint8_t*>(W.data);
    switch (W.dtype) {
        case DType::F32:
            K.matmul_f32(in.x, in.K, M, W.cols, static_cast<const float*>(W.data), bias, Y, ldy, a, b);
            break;
        case DType::BF16:
            K.matmul_bf16(in.x, in.K, M, W.cols, static_cast<const uint16_t*>(W.data), bias, Y, ldy, a, b);
            break;
        case DType::Q8: K.matmul_q8(in.x, in.K, in.q, in.d, in.s, M, W.cols, packed, bias, Y, ldy, a, b); break;
        case DType::Q4: K.matmul_q4(in.x, in.K, in.q, in.d, in.s, M, W.cols, packed, bias, Y, ldy, a, b); break;
        case DType::Q6: K.matmul_q6(in.x, in.K, in.q, in.d, in.s, M, W.cols, packed, bias, Y, ldy, a, b); break;
        default: break;
    }
}

float* f32(const AlignedBuffer& b) { return b.as<float>(); }

}  // namespace

// ---------------------------------------------------------------------------------------------
// KV cache

size_t KVCache::bytes_needed(int layers, int kv_heads, int head_dim, int max_context, DType dtype) {
    return checked_mul(checked_mul(checked_mul(checked_mul(size_t(layers), size_t(kv_heads)), size_t(head_dim)),
                                   key_positions(max_context)),
                       2 * dtype_size(dtype));
}

KVCache::KVCache(int layers, int kv_heads, int head_dim, int max_context, DType dtype)
    : kv_heads_(kv_heads), head_dim_(head_dim), max_context_(max_context), dtype_(dtype) {
    if (dtype != DType::F32 && dtype != DType::F16 && dtype != DType::BF16)
        throw InvalidArgument("the KV cache holds f32, f16 or bf16");
    const size_t half = bytes_needed(layers, kv_heads, head_dim, max_context, dtype) / 2;
    k_ = AlignedBuffer(half);
    v_ = AlignedBuffer(half);
}

void KVCache::settle(int n) {
    if (!collapsing_ || n < settled_ + kSettleStep) return;
    settled_ = n;
    // Each buffer is kv_heads * layers rows of `row` bytes, each written from its start.
    const size_t row = key_positions(max_context_) * size_t(head_dim_) * dtype_size(dtype_);
    const size_t written = std::min(row, key_positions(n) * size_t(head_dim_) * dtype_size(dtype_));
    const AlignedBuffer* buffers[2] = {&k_, &v_};
    for (int b = 0; b < 2; b++) {
        const uintptr_t base = reinterpret_cast<uintptr_t>(buffers[b]->data()), end = base + buffers[b]->size();
        const uintptr_t first = (base + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
        std::vector<bool>& done = huge_[b];
        if (end > first) done.resize((end - first) / kHugePageBytes);
        for (size_t i = 0; i < done.size(); i++) {
            if (done[i]) continue;
            const size_t lo = first - base + i * kHugePageBytes, hi = lo + kHugePageBytes;  // offsets of page i
            size_t bytes = 0;  // of page i in the written part of some row
            for (size_t r = lo / row; r * row < hi; r++) {
                const size_t from = std::max(lo, r * row), to = std::min(hi, r * row + written);
                if (to > from) bytes += to - from;
            }
            if (2 * bytes < kHugePageBytes) continue;
            done[i] = true;
            if (!collapse_huge_page(reinterpret_cast<void*>(base + lo))) {
                collapsing_ = false;
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Construction and weights

Qwen2Model::Qwen2Model(const Qwen2Config& cfg, DType weight_dtype, int threads, int max_context, DType kv_dtype)
    : cfg_(cfg), dtype_(weight_dtype), threads_(threads), max_context_(max_context), kv_dtype_(kv_dtype) {
    auto need = [](bool ok, const std::string& what) {
        if (!ok) throw InvalidArgument("unsupported Qwen2 config: " + what);
    };
    need(cfg.vocab_size > 0 && cfg.hidden_size > 0 && cfg.intermediate_size > 0 && cfg.num_layers > 0,
         "vocab_size, hidden_size, intermediate_size and num_hidden_layers must be positive");
    need(cfg.num_heads > 0 && cfg.num_kv_heads > 0 && cfg.num_heads % cfg.num_kv_heads == 0,
         "num_attention_heads must be a positive multiple of num_key_value_heads");
    need(cfg.head_dim > 0 && cfg.head_dim % 2 == 0 && cfg.head_dim <= 1024, "head_dim must be even and <= 1024");
    need(cfg.hidden_size <= (1 << 20) && cfg.intermediate_size <= (1 << 22) && cfg.vocab_size <= (1 << 24) &&
             int64_t(cfg.num_heads) * cfg.head_dim <= (1 << 20) && cfg.num_layers <= 4096,
         "sizes out of range");
    need(cfg.rms_norm_eps > 0 && std::isfinite(cfg.rms_norm_eps), "rms_norm_eps must be positive");
    need(cfg.rope_theta > 0 && std::isfinite(cfg.rope_theta), "rope_theta must be positive");
    if (weight_dtype == DType::F16) throw InvalidArgument("weights can be held as f32, bf16, q8, q6 or q4");
    if (max_context < 1 || max_context > (1 << 24)) throw InvalidArgument("max_context must be in 1..16777216");
    if (threads_ < 1) threads_ = 1;
#ifndef _OPENMP
    threads_ = 1;
#endif

    layers_.resize(cfg.num_layers);
    set_sequences(1);  // KVCache refuses a kv_dtype other than f32, f16 or bf16
    row_seq_.resize(kChunk);
    row_pos_.resize(kChunk);

    const size_t C = kChunk, H = cfg.hidden_size, I = cfg.intermediate_size;
    const size_t QD = size_t(cfg.num_heads) * cfg.head_dim, KVD = size_t(cfg.num_kv_heads) * cfg.head_dim;
    const size_t group = cfg.num_heads / cfg.num_kv_heads;
    s_.x = AlignedBuffer(C * H * 4);
    const size_t norm_rows = std::max(C, size_t(threads_) * kOwnNormRows);
    s_.xn = AlignedBuffer(norm_rows * H * 4);
    s_.xn_q = AlignedBuffer(norm_rows * size_t(q_blocks(int(H))) * kQBlock);
    s_.xn_d = AlignedBuffer(norm_rows * size_t(q_blocks(int(H))) * 4);
    s_.xn_s = AlignedBuffer(norm_rows * size_t(q_blocks(int(H))) * 4);
    s_.q = AlignedBuffer(C * QD * 4);
    s_.k = AlignedBuffer(C * KVD * 4);
    s_.v = AlignedBuffer(C * KVD * 4);
    s_.att = AlignedBuffer(C * QD * 4);
    s_.proj = AlignedBuffer(C * H * 4);
    s_.gate = AlignedBuffer(C * I * 4);
    s_.up = AlignedBuffer(C * I * 4);
    s_.h_panels = AlignedBuffer(bf16_panels_size(int(C), int(I)) * 4);
    s_.xn_tiles = AlignedBuffer(tile_tokens_size(int(C), int(H)) * 2);
    s_.att_tiles = AlignedBuffer(tile_tokens_size(int(C), int(QD)) * 2);
    s_.h_tiles = AlignedBuffer(tile_tokens_size(int(C), int(I)) * 2);
    s_.rope = AlignedBuffer(C * cfg.head_dim * 4);
    const size_t widest = std::max(QD, I);  // the longer of the rows quantized into act_*
    s_.act_q = AlignedBuffer(C * size_t(q_blocks(int(widest))) * kQBlock);
    s_.act_d = AlignedBuffer(C * size_t(q_blocks(int(widest))) * 4);
    s_.act_s = AlignedBuffer(C * size_t(q_blocks(int(widest))) * 4);
    // split-KV parts: fewer items than threads, cut at most threads ways each, so under 2 x threads
    // parts of G outputs and G log-sum-exps
    s_.att_part = AlignedBuffer(checked_mul(size_t(2 * threads_) * group * (cfg.head_dim + 1), 4));
    s_.scores = AlignedBuffer(
        checked_mul(checked_mul(size_t(threads_), attention_scratch_floats(int(group), max_context, cfg.head_dim)), 4));
    s_.next_unit.reset(new std::atomic<int>[size_t(cfg.num_layers) * kClaimSteps]);
}

void Qwen2Model::set_sequences(int n) {
    if (n < 1 || n > kChunk) throw InvalidArgument("sequences must be in 1.." + std::to_string(kChunk));
    caches_.resize(size_t(n));  // dropping slots frees their caches
    tokens_.resize(size_t(n));
    for (int i = 0; i < n; i++)
        if (caches_[i].max_context() == 0) {
            caches_[i] = KVCache(cfg_.num_layers, cfg_.num_kv_heads, cfg_.head_dim, max_context_, kv_dtype_);
            tokens_[i].clear();
            tokens_[i].reserve(size_t(max_context_));
        }
}

size_t Qwen2Model::kv_cache_bytes() const {
    size_t total = 0;
    for (const KVCache& c : caches_) total += c.bytes();
    return total;
}

Matrix* Qwen2Model::find_matrix(const std::string& name, int& rows, int& cols) {
    const int H = cfg_.hidden_size, I = cfg_.intermediate_size;
    const int QD = cfg_.num_heads * cfg_.head_dim, KVD = cfg_.num_kv_heads * cfg_.head_dim;
    if (name == "model.embed_tokens.weight") return rows = cfg_.vocab_size, cols = H, &embed_tokens_;
    if (name == "lm_head.weight") return rows = cfg_.vocab_size, cols = H, &lm_head_;
    int layer = -1, used = 0;
    if (std::sscanf(name.c_str(), "model.layers.%d.%n", &layer, &used) != 1 || used == 0) return nullptr;
    if (layer < 0 || layer >= cfg_.num_layers) return nullptr;
    LayerWeights& L = layers_[layer];
    const std::string rest = name.substr(used);
    if (rest == "self_attn.q_proj.weight") return rows = QD, cols = H, &L.q_proj;
    if (rest == "self_attn.k_proj.weight") return rows = KVD, cols = H, &L.k_proj;
    if (rest == "self_attn.v_proj.weight") return rows = KVD, cols = H, &L.v_proj;
    if (rest == "self_attn.o_proj.weight") return rows = H, cols = QD, &L.o_proj;
    if (rest == "mlp.gate_proj.weight") return rows = I, cols = H, &L.gate_proj;
    if (rest == "mlp.up_proj.weight") return rows = I, cols = H, &L.up_proj;
    if (rest == "mlp.down_proj.weight") return rows = H, cols = I, &L.down_proj;
    return nullptr;
}

std::vector<float>* Qwen2Model::find_vector(const std::string& name, int& len) {
    const int H = cfg_.hidden_size;
    const int QD = cfg_.num_heads * cfg_.head_dim, KVD = cfg_.num_kv_heads * cfg_.head_dim;
    if (name == "model.norm.weight") return len = H, &norm_;
    int layer = -1, used = 0;
    if (std::sscanf(name.c_str(), "model.layers.%d.%n", &layer, &used) != 1 || used == 0) return nullptr;
    if (layer < 0 || layer >= cfg_.num_layers) return nullptr;
    LayerWeights& L = layers_[layer];
    const std::string rest = name.substr(used);
    if (rest == "input_layernorm.weight") return len = H, &L.input_layernorm;
    if (rest == "post_attention_layernorm.weight") return len = H, &L.post_attention_layernorm;
    if (rest == "self_attn.q_proj.bias") return len = QD, &L.q_bias;
    if (rest == "self_attn.k_proj.bias") return len = KVD, &L.k_bias;
    if (rest == "self_attn.v_proj.bias") return len = KVD, &L.v_bias;
    return nullptr;
}

// Converts n elements of `src` (in dtype `from`) to `to`, in parallel. One plain loop per pair of
// types, so that each vectorises.
static void convert(const void* src, DType from, void* dst, DType to, size_t n, int threads) {
    const int64_t N = int64_t(n);
    const auto* s16 = static_cast<const uint16_t*>(src);
    const auto* s32 = static_cast<const float*>(src);
    auto* d16 = static_cast<uint16_t*>(dst);
    auto* d32 = static_cast<float*>(dst);
    if (from == to) {
        std::memcpy(dst, src, n * dtype_size(to));
    } else if (to == DType::F32 && from == DType::BF16) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t i = 0; i < N; i++) d32[i] = bf16_to_f32(s16[i]);
    } else if (to == DType::F32 && from == DType::F16) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t i = 0; i < N; i++) d32[i] = f16_to_f32(s16[i]);
    } else if (to == DType::BF16 && from == DType::F32) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t i = 0; i < N; i++) d16[i] = f32_to_bf16(s32[i]);
    } else if (to == DType::BF16 && from == DType::F16) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t i = 0; i < N; i++) d16[i] = f32_to_bf16(f16_to_f32(s16[i]));
    } else {
        throw InvalidArgument(std::string("no conversion from ") + dtype_name(from) + " to " + dtype_name(to));
    }
}

// The first NaN or Inf among the `nbytes` of values at `data` in dtype `t` (for q8 / q4: among the
// f16 scales of the packed blocks, whose integer values are always finite): the index of the value
// (q8 / q4: of the block), or -1. A bad checkpoint is refused at
// load rather than turned into NaN logits later. Two passes: a flag (which vectorises, and is all
// that a good file pays for), then the position.
static int64_t first_non_finite(const void* data, DType t, size_t nbytes, int threads) {
    const auto* u16 = static_cast<const uint16_t*>(data);
    const auto* u32 = static_cast<const uint32_t*>(data);
    size_t item = dtype_size(t), per = 1;  // items of `item` bytes, each starting with `per` values
    uint32_t mask = 0;
    if (t == DType::F32) mask = 0x7f800000u;
    else if (t == DType::BF16) mask = 0x7f80u;
    else if (t == DType::F16) mask = 0x7c00u;
    else {  // q8 / q6 / q4: blocks, each starting with 16 f16 scales
        mask = 0x7c00u;
        item = q_block_bytes(t);
        per = 16;
    }
    const size_t stride = item / 2;  // in halves (f16/bf16/q8/q6/q4)
    const int64_t N = int64_t(nbytes / item);
    int bad = 0;
    if (t == DType::F32) {
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : bad)
        for (int64_t i = 0; i < N; i++) bad |= (u32[i] & mask) == mask;
    } else {
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : bad)
        for (int64_t i = 0; i < N; i++)
            for (size_t j = 0; j < per; j++) bad |= (u16[size_t(i) * stride + j] & mask) == mask;
    }
    if (!bad) return -1;
    for (int64_t i = 0; i < N; i++)
        for (size_t j = 0; j < per; j++) {
            const uint32_t v = t == DType::F32 ? u32[i] : u16[size_t(i) * stride + j];
            if ((v & mask) == mask) return i;
        }
    return -1;
}

// Bytes of a [rows, cols] matrix held as `t` (bf16 packed, quant.h).
static size_t matrix_bytes(DType t, int rows, int cols) {
    if (is_quantized(t)) return q_bytes(t, rows, cols);
    if (t == DType::BF16 || t == DType::BF16P) return bf16_bytes(rows, cols);
    return checked_mul(checked_mul(size_t(rows), size_t(cols)), dtype_size(t));
}
// Bytes of a [rows, cols] source tensor of `t`: f32 / bf16 / f16 row-major, the others packed.
static size_t source_bytes(DType t, int rows, int cols) {
    if (t == DType::BF16) return checked_mul(checked_mul(size_t(rows), size_t(cols)), 2);
    return matrix_bytes(t, rows, cols);
}
// Whether a target type is held in a packed layout, and whether a source already is in the target's.
static bool is_packed(DType t) { return is_quantized(t) || t == DType::BF16; }
static bool same_layout(DType src, DType target) {
    return src == target ? target != DType::BF16 : src == DType::BF16P && target == DType::BF16;
}

// Bytes of a stored matrix: packed, plain, or GGUF blocks (Matrix::gguf_type).
static size_t stored_bytes(const Matrix& m) {
    if (m.gguf_type >= 0) return checked_mul(gguf_dequant_src_bytes(m.gguf_type, m.cols), size_t(m.rows));
    return matrix_bytes(m.dtype, m.rows, m.cols);
}

uint8_t* WeightArena::take(size_t bytes) {
    bytes = (bytes + 63) / 64 * 64;
    if (blocks_.empty() || used_ + bytes > kBlock) {
        blocks_.emplace_back(kBlock, /*huge_pages=*/true);
        used_ = 0;
    }
    uint8_t* p = blocks_.back().as<uint8_t>() + used_;
    used_ += bytes;
    return p;
}

bool Qwen2Model::set_tensor(const std::string& name, const void* data, DType src, const std::vector<int64_t>& shape,
                            size_t nbytes, bool may_borrow, DType target, int gguf_type) {
    int rows = 0, cols = 0, len = 0;
    Matrix* m = find_matrix(name, rows, cols);
    std::vector<float>* v = m ? nullptr : find_vector(name, len);
    if (!m && !v) throw InvalidArgument("unexpected tensor '" + name + "' for this Qwen2 config");
    if (name == "lm_head.weight" && cfg_.tie_word_embeddings) return false;  // tied: the embedding serves
    if (m == &embed_tokens_) embed_file_.reset();  // a new table is read from wherever it is now

    auto shape_str = [](const std::vector<int64_t>& s) {
        std::string out = "[";
        for (size_t i = 0; i < s.size(); i++) out += (i ? ", " : "") + std::to_string(s[i]);
        return out + "]";
    };
    const std::vector<int64_t> want = m ? std::vector<int64_t>{rows, cols} : std::vector<int64_t>{len};
    if (shape != want)
        throw InvalidArgument("tensor '" + name + "' has shape " + shape_str(shape) + ", the config implies " +
                              shape_str(want));
    const bool gguf = gguf_type >= 0;  // `data` holds GGUF blocks of that ggml type, read row by row
    if (v && (is_quantized(src) || src == DType::BF16P) && !gguf)
        throw InvalidArgument("tensor '" + name + "' is a vector: it cannot be " + dtype_name(src));
    if (target == DType::BF16P || target == DType::F16)
        throw InvalidArgument(std::string("a matrix is not held as ") + dtype_name(target));
    const size_t count = m ? size_t(rows) * size_t(cols) : size_t(len);
    // A GGUF matrix is read a chunk of rows at a time: its rows must be whole blocks (this checks
    // the type too, and says what is wrong).
    const size_t gguf_row = gguf ? gguf_dequant_src_bytes(gguf_type, m ? cols : len) : 0;
    const size_t need = gguf ? checked_mul(gguf_row, m ? size_t(rows) : 1)
                        : m  ? source_bytes(src, rows, cols)
                             : checked_mul(size_t(len), dtype_size(src));
    if (!data || nbytes != need)
        throw InvalidArgument("tensor '" + name + "' holds " + std::to_string(nbytes) + " bytes, its shape as " +
                              (gguf ? "ggml type " + std::to_string(gguf_type) : std::string(dtype_name(src))) +
                              " needs " + std::to_string(need));
    // A NaN or Inf is refused at load rather than turned into NaN logits later. `bad` counts values
    // of a float source (from element `first`), or packed blocks.
    auto refuse_non_finite = [&](int64_t bad, size_t first, bool blocks) {
        std::string where;
        if (src == DType::BF16P) {  // packed value -> its row and column (quant.h)
            const int64_t per_group = int64_t(bf16_group_values(cols)), in_group = bad % per_group;
            const int64_t row = bad / per_group * kBf16Rows + in_group / 2 % kBf16Rows;
            const int64_t col = in_group / (2 * kBf16Rows) * 2 + in_group % 2;
            where = "row " + std::to_string(row) + ", column " + std::to_string(col);
        } else if (blocks) {
            const int64_t B = q_blocks(cols);
            where = "a scale of rows " + std::to_string(bad / B * kQRows) + ".." +
                    std::to_string(std::min<int64_t>(rows, bad / B * kQRows + kQRows) - 1);
        } else if (m) {
            const size_t i = first + size_t(bad);
            where = "row " + std::to_string(i / size_t(cols)) + ", column " + std::to_string(i % size_t(cols));
        } else {
            where = "element " + std::to_string(first + size_t(bad));
        }
        throw InvalidArgument("tensor '" + name + "' holds NaN or Inf (first at " + where + ")");
    };

    if (v) {
        v->assign(size_t(len), 0.f);
        if (gguf) dequantize_gguf(gguf_type, static_cast<const uint8_t*>(data), nbytes, v->data(), len, 1);
        else convert(data, src, v->data(), DType::F32, size_t(len), threads_);
        if (const int64_t bad = first_non_finite(v->data(), DType::F32, size_t(len) * 4, 1); bad >= 0)
            refuse_non_finite(bad, 0, false);
        return false;
    }
    if (!gguf && (is_quantized(src) || src == DType::BF16P) && !same_layout(src, target))
        throw InvalidArgument("tensor '" + name + "' is " + dtype_name(src) + "; it cannot be converted to " +
                              dtype_name(target));
    // Rows are made float32 a chunk at a time where the source is GGUF blocks or the target is packed:
    // no float32 copy of a whole matrix (the 545 MB embedding of a 0.5B model) is ever held.
    const bool by_rows = gguf || (is_packed(target) && !same_layout(src, target));
    if (!by_rows) {
        if (const int64_t bad = first_non_finite(data, src == DType::BF16P ? DType::BF16 : src, need, threads_); bad >= 0)
            refuse_non_finite(bad, 0, is_quantized(src));
    }
    // An untied embedding is only read a row per token: one in GGUF blocks stays in the caller's
    // mapped file (its pages leave RSS but for the rows of the tokens seen), checked whole here.
    const bool borrow_gguf = gguf && may_borrow && m == &embed_tokens_ && !cfg_.tie_word_embeddings;
    m->rows = rows;
    m->cols = cols;
    m->dtype = borrow_gguf ? DType::F32 : target;  // what embed() makes of a row
    m->gguf_type = -1;
    const size_t align = is_quantized(target) ? 1 : dtype_size(target);
    if (!gguf && may_borrow && same_layout(src, target) && reinterpret_cast<uintptr_t>(data) % align == 0) {
        m->owned = AlignedBuffer();  // points into the caller's (mapped) memory: no copy
        m->data = data;
        return true;
    }
    uint8_t* dst = nullptr;  // where the matrix is made
    if (!borrow_gguf) {
        const size_t bytes = matrix_bytes(target, rows, cols);
        m->owned = AlignedBuffer();
        if (bytes >= WeightArena::kBlock / 2) {
            m->owned = AlignedBuffer(bytes, /*huge_pages=*/true);
            dst = m->owned.as<uint8_t>();
        } else {
            if (m->room_bytes < bytes) m->room = arena_.take(bytes), m->room_bytes = bytes;
            dst = m->room;
        }
        m->data = dst;
    }
    if (!by_rows) {
        if (same_layout(src, target)) std::memcpy(dst, data, need);  // packed ones included: bytes, not elements
        else convert(data, src, dst, target, count, threads_);
        return false;
    }
    constexpr int kChunkRows = 256;  // a multiple of kQRows and kBf16Rows: chunks start on a packed row group
    const size_t src_row = gguf ? gguf_row : size_t(cols) * dtype_size(src);
    AlignedBuffer tmp;
    if (gguf || src != DType::F32) tmp = AlignedBuffer(checked_mul(checked_mul(size_t(kChunkRows), size_t(cols)), 4));
    struct Unset {  // a matrix refused half way (a NaN in a later chunk) is left missing, not half made
        Matrix* m;
        ~Unset() {
            if (!m) return;
            uint8_t* room = m->room;
            const size_t room_bytes = m->room_bytes;
            *m = Matrix();
            m->room = room, m->room_bytes = room_bytes;
        }
    } unset{m};
    for (int r0 = 0; r0 < rows; r0 += kChunkRows) {
        const int n = std::min(kChunkRows, rows - r0);
        const size_t values = size_t(n) * size_t(cols);
        const auto* in = static_cast<const uint8_t*>(data) + size_t(r0) * src_row;
        const float* f = reinterpret_cast<const float*>(in);
        if (gguf) dequantize_gguf(gguf_type, in, size_t(n) * src_row, tmp.as<float>(), int64_t(values), threads_);
        else if (src != DType::F32) convert(in, src, tmp.data(), DType::F32, values, threads_);
        if (tmp.data()) f = tmp.as<float>();
        if (const int64_t bad = first_non_finite(f, DType::F32, values * 4, threads_); bad >= 0)
            refuse_non_finite(bad, size_t(r0) * size_t(cols), false);
        if (borrow_gguf) continue;  // checked only
        uint8_t* out = dst;
        if (is_quantized(target))
            quantize_q(target, f, n, cols, size_t(cols), out + matrix_bytes(target, r0, cols), threads_);
        else if (target == DType::BF16)
            pack_bf16(f, n, cols, size_t(cols), reinterpret_cast<uint16_t*>(out + matrix_bytes(target, r0, cols)), threads_);
        else
            convert(f, DType::F32, out + size_t(r0) * size_t(cols) * dtype_size(target), target, values, threads_);
    }
    unset.m = nullptr;
    if (borrow_gguf) {
        m->owned = AlignedBuffer();
        m->data = data;
        m->gguf_type = gguf_type;
        return true;
    }
    return false;
}

Qwen2Model::TensorView Qwen2Model::tensor_view(const std::string& name) {
    int rows = 0, cols = 0, len = 0;
    if (name == "lm_head.weight" && cfg_.tie_word_embeddings) return {DType::F32, nullptr, 0, 0, 0};
    if (Matrix* m = find_matrix(name, rows, cols)) {
        if (!m->data) return {m->dtype, nullptr, 0, rows, cols};
        return {m->dtype, m->data, stored_bytes(*m), rows, cols, m->gguf_type};
    }
    if (std::vector<float>* v = find_vector(name, len))
        return {DType::F32, v->empty() ? nullptr : v->data(), v->size() * 4, len, 0};
    return {DType::F32, nullptr, 0, 0, 0};
}

std::vector<std::string> Qwen2Model::missing_tensors() const {
    std::vector<std::string> out;
    if (!embed_tokens_.data) out.push_back("model.embed_tokens.weight");
    for (int l = 0; l < cfg_.num_layers; l++) {
        const LayerWeights& L = layers_[l];
        const std::string p = "model.layers." + std::to_string(l) + ".";
        if (L.input_layernorm.empty()) out.push_back(p + "input_layernorm.weight");
        if (!L.q_proj.data) out.push_back(p + "self_attn.q_proj.weight");
        if (!L.k_proj.data) out.push_back(p + "self_attn.k_proj.weight");
        if (!L.v_proj.data) out.push_back(p + "self_attn.v_proj.weight");
        if (L.q_bias.empty()) out.push_back(p + "self_attn.q_proj.bias");
        if (L.k_bias.empty()) out.push_back(p + "self_attn.k_proj.bias");
        if (L.v_bias.empty()) out.push_back(p + "self_attn.v_proj.bias");
        if (!L.o_proj.data) out.push_back(p + "self_attn.o_proj.weight");
        if (L.post_attention_layernorm.empty()) out.push_back(p + "post_attention_layernorm.weight");
        if (!L.gate_proj.data) out.push_back(p + "mlp.gate_proj.weight");
        if (!L.up_proj.data) out.push_back(p + "mlp.up_proj.weight");
        if (!L.down_proj.data) out.push_back(p + "mlp.down_proj.weight");
    }
    if (norm_.empty()) out.push_back("model.norm.weight");
    if (!cfg_.tie_word_embeddings && !lm_head_.data) out.push_back("lm_head.weight");
    return out;
}

size_t Qwen2Model::weight_bytes() const {
    auto mb = [](const Matrix& m) { return m.data ? stored_bytes(m) : size_t(0); };
    size_t total = mb(embed_tokens_) + mb(lm_head_) + norm_.size() * 4;
    for (const LayerWeights& L : layers_)
        total += mb(L.q_proj) + mb(L.k_proj) + mb(L.v_proj) + mb(L.o_proj) + mb(L.gate_proj) + mb(L.up_proj) +
                 mb(L.down_proj) +
                 4 * (L.input_layernorm.size() + L.post_attention_layernorm.size() + L.q_bias.size() +
                      L.k_bias.size() + L.v_bias.size());
    return total;
}

void Qwen2Model::store_kv(int seq, int layer, int head, int pos, const float* k, const float* v) {
    const int D = cfg_.head_dim;
    KVCache& cache = caches_[size_t(seq)];
    // keys go into their key block (kernels.h), values are rows (f32, f16) or row pairs (bf16)
    if (cache.dtype() == DType::BF16) {
        uint16_t* kc = cache.keys<uint16_t>(layer, head);
        uint16_t* vc = cache.values<uint16_t>(layer, head);
        for (int i = 0; i < D; i++)
            kc[key_offset_bf16(pos, i, D)] = f32_to_bf16(k[i]), vc[value_offset_bf16(pos, i, D)] = f32_to_bf16(v[i]);
    } else if (cache.dtype() == DType::F16) {
        uint16_t* kc = cache.keys<uint16_t>(layer, head);
        uint16_t* vc = cache.values<uint16_t>(layer, head) + size_t(pos) * D;
        for (int i = 0; i < D; i++) kc[key_offset(pos, i, D)] = f32_to_f16(k[i]), vc[i] = f32_to_f16(v[i]);
    } else {
        float* kc = cache.keys<float>(layer, head);
        for (int i = 0; i < D; i++) kc[key_offset(pos, i, D)] = k[i];
        std::memcpy(cache.values<float>(layer, head) + size_t(pos) * D, v, D * sizeof(float));
    }
}

void Qwen2Model::embedding_span(int token, size_t& begin, size_t& bytes, int& row) const {
    const Matrix& E = embed_tokens_;
    size_t group_rows = 1;
    if (E.gguf_type >= 0) bytes = gguf_dequant_src_bytes(E.gguf_type, E.cols);  // whole blocks
    else if (E.dtype == DType::F32) bytes = size_t(E.cols) * 4;
    else if (E.dtype == DType::BF16) group_rows = kBf16Rows, bytes = bf16_group_values(E.cols) * 2;
    else group_rows = kQRows, bytes = size_t(q_blocks(E.cols)) * q_block_bytes(E.dtype);
    begin = size_t(token) / group_rows * bytes;
    row = int(size_t(token) % group_rows);
}

void Qwen2Model::read_embedding_from_file(int fd, uint64_t offset) {
    OwnedFd file(fd);
    const Matrix& E = embed_tokens_;
    if (!E.data || E.owned.data() || E.room)
        throw InvalidArgument("read_embedding_from_file: the embedding is not borrowed from a file");
    size_t begin, bytes;
    int row;
    embedding_span(cfg_.vocab_size - 1, begin, bytes, row);  // the table's last span
    uint8_t last;
    if (!read_at(file.get(), &last, 1, offset + begin + bytes - 1))
        throw InvalidArgument("read_embedding_from_file: the file ends before the embedding table does");
    embed_file_ = std::move(file);
    embed_offset_ = offset;
    embed_rows_.resize(size_t(kChunk) * bytes);  // a chunk's rows, allocated once
}

const uint8_t* Qwen2Model::read_embedding_rows(const int32_t* tokens, int n) {
    if (embed_file_.get() < 0) return nullptr;
    size_t begin, bytes;
    int row;
    embedding_span(0, begin, bytes, row);
    if (embed_rows_.size() < size_t(n) * bytes) embed_rows_.resize(size_t(n) * bytes);  // n <= kChunk: never
    for (int t = 0; t < n; t++) {
        embedding_span(tokens[t], begin, bytes, row);
        if (!read_at(embed_file_.get(), embed_rows_.data() + size_t(t) * bytes, bytes, embed_offset_ + begin))
            throw InvalidArgument("the embedding table could not be read from its file (changed since loading?)");
    }
    return embed_rows_.data();
}

void Qwen2Model::embed(int token, float* out, const uint8_t* rows, int t) const {
    const Matrix& E = embed_tokens_;
    size_t begin, bytes;
    int row;
    embedding_span(token, begin, bytes, row);
    // the span holding the row: read from the file, or in the table; the row is `row` of it
    const uint8_t* span = rows ? rows + size_t(t) * bytes : static_cast<const uint8_t*>(E.data) + begin;
    if (E.gguf_type >= 0) {  // GGUF blocks: the row is whole blocks (set_tensor checked the format)
        dequantize_gguf(E.gguf_type, span, bytes, out, E.cols, 1);
        return;
    }
    switch (E.dtype) {
        case DType::F32: std::memcpy(out, span, bytes); break;
        case DType::Q8:
        case DType::Q6:
        case DType::Q4: dequantize_row_q(E.dtype, span, E.cols, row, out); break;
        default: unpack_row_bf16(reinterpret_cast<const uint16_t*>(span), E.cols, row, out);
    }
}

// ---------------------------------------------------------------------------------------------
// Forward

void Qwen2Model::check_tokens(const int32_t* tokens, int n) const {
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= cfg_.vocab_size)
            throw InvalidArgument("token id " + std::to_string(tokens[i]) + " at index " + std::to_string(i) +
                                  " is outside the vocabulary (0.." + std::to_string(cfg_.vocab_size - 1) + ")");
}

void Qwen2Model::check_ready() {
    if (ready_) return;  // checked once: the decode loop allocates nothing
    const std::vector<std::string> missing = missing_tensors();
    if (!missing.empty()) throw InvalidArgument("weights missing: " + missing.front());
    ready_ = true;
}

void Qwen2Model::forward(const int32_t* tokens, int n, int start_pos, bool all_logits, float* logits,
                         const std::function<bool()>& interrupted, int seq) {
    if (n < 1) throw InvalidArgument("forward needs at least one token");
    if (seq < 0 || seq >= sequences())
        throw InvalidArgument("sequence " + std::to_string(seq) + " does not exist (0.." + std::to_string(sequences() - 1) + ")");
    if (start_pos < 0 || start_pos > cache_len(seq))
        throw InvalidArgument("start_pos " + std::to_string(start_pos) + " is past the " + std::to_string(cache_len(seq)) +
                              " cached positions; it must be in 0.." + std::to_string(cache_len(seq)));
    if (int64_t(start_pos) + n > max_context_)
        throw ContextOverflow("positions " + std::to_string(start_pos) + ".." + std::to_string(int64_t(start_pos) + n - 1) +
                              " do not fit max_context=" + std::to_string(max_context_));
    check_tokens(tokens, n);
    check_ready();

    // Positions from start_pos on are about to be overwritten; a chunk counts once it is done, so
    // after an interruption the cache holds exactly the chunks that finished.
    std::vector<int32_t>& cached = tokens_[size_t(seq)];
    cached.resize(size_t(start_pos));
    for (int c0 = 0; c0 < n; c0 += kChunk) {
        const int nc = std::min(kChunk, n - c0);
        const bool last_chunk = c0 + nc == n;
        float* out = all_logits ? logits + size_t(c0) * cfg_.vocab_size : (last_chunk ? logits : nullptr);
        for (int t = 0; t < nc; t++) row_seq_[t] = seq, row_pos_[t] = start_pos + c0 + t;
        forward_chunk(tokens + c0, row_seq_.data(), row_pos_.data(), nc, out, all_logits, interrupted);
        cached.insert(cached.end(), tokens + c0, tokens + c0 + nc);
    }
    caches_[size_t(seq)].settle(cache_len(seq));
}

void Qwen2Model::decode_batch(const int32_t* tokens, const int32_t* seqs, int n, float* logits,
                              const std::function<bool()>& interrupted) {
    if (n < 1 || n > sequences()) throw InvalidArgument("decode_batch needs 1.." + std::to_string(sequences()) + " tokens");
    std::vector<bool> seen(size_t(sequences()), false);
    for (int i = 0; i < n; i++) {
        const int s = seqs[i];
        if (s < 0 || s >= sequences() || seen[size_t(s)])
            throw InvalidArgument("decode_batch: sequence " + std::to_string(s) + " is out of range or repeated");
        seen[size_t(s)] = true;
        if (cache_len(s) + 1 > max_context_)
            throw ContextOverflow("sequence " + std::to_string(s) + " is full: max_context=" + std::to_string(max_context_));
    }
    check_tokens(tokens, n);
    check_ready();
    for (int i = 0; i < n; i++) row_seq_[i] = seqs[i], row_pos_[i] = cache_len(seqs[i]);
    forward_chunk(tokens, row_seq_.data(), row_pos_.data(), n, logits, /*all_logits=*/true, interrupted);
    for (int i = 0; i < n; i++) {
        tokens_[size_t(seqs[i])].push_back(tokens[i]);
        caches_[size_t(seqs[i])].settle(cache_len(seqs[i]));
    }
}

// Split-KV: how many key ranges each (KV head, row) item of an attention step is cut into. Only a
// step with fewer items than threads (decode, on more threads than KV heads) and a long row is cut,
// into ranges of at least kMinSplitKeys (fewer, shorter ones cost more to merge than they save).
constexpr int kMinSplitKeys = 256;
constexpr int kMaxKvSplits = 64;
static int kv_splits(int items, int threads, const int32_t* pos, int n) {
    if (items >= threads) return 1;
    int longest = 0;
    for (int t = 0; t < n; t++) longest = std::max(longest, int(pos[t]) + 1);
    if (longest < 2 * kMinSplitKeys) return 1;
    return std::min(kMaxKvSplits, (threads + items - 1) / items);
}
// The keys in one range of a row of nk keys cut `splits` ways: whole attention blocks (key_offset
// needs a range to start a key block), and at least kMinSplitKeys.
static int split_keys(int nk, int splits) {
    const int len = (nk + splits - 1) / splits;
    return std::max(kMinSplitKeys, (len + kAttnBlock - 1) / kAttnBlock * kAttnBlock);
}

void Qwen2Model::forward_chunk(const int32_t* tokens, const int32_t* seq, const int32_t* pos, int n, float* logits,
                               bool all_logits, const std::function<bool()>& interrupted) {
    const Kernels& K = active_kernels();
    const Qwen2Config& c = cfg_;
    const int H = c.hidden_size, I = c.intermediate_size, D = c.head_dim, half = D / 2;
    const int QD = c.num_heads * D, KVD = c.num_kv_heads * D, G = c.num_heads / c.num_kv_heads;
    const float eps = c.rms_norm_eps;
    const float scale = float(1.0 / std::sqrt(double(D)));
    const uint8_t* embed_rows = read_embedding_rows(tokens, n);  // nullptr: read from the table
    // q/k/v rows are split in whole heads (a thread ropes its own heads) and whole 16-row groups
    // (the packed q8/q4 layouts start a thread's share on a group boundary).
    const int heads_align = std::lcm(D, kQRows);
    float *x = f32(s_.x), *q = f32(s_.q), *k = f32(s_.k), *v = f32(s_.v);
    float *att = f32(s_.att), *proj = f32(s_.proj), *gate = f32(s_.gate), *up = f32(s_.up), *rope = f32(s_.rope);
    // Inputs of the matmuls: the normed rows (xn) and, for q8 / q4 matrices, their int8 form; the
    // attention output and the MLP's hidden rows share the other int8 buffers (act_*).
    int8_t* aq = s_.act_q.as<int8_t>();
    float* ad = s_.act_d.as<float>();
    int32_t* as = s_.act_s.as<int32_t>();
    // A tile backend (AMX) multiplies a prompt chunk's bf16, q8 and q4 matrices on token tiles of
    // their inputs, made once by the threads that write the rows (kernels.h: tile_tokens): the
    // int8 forms are not needed then, and o_proj and down_proj add into x as they store.
    const bool tiles = K.matmul_tiles && K.tile_tokens && n >= kMinTileTokens;
    auto tiles_of = [&](const AlignedBuffer& b) { return tiles ? b.as<uint16_t>() : nullptr; };
    const MatmulInput in_att{att, QD, aq, ad, as, tiles_of(s_.att_tiles)}, in_h{gate, I, aq, ad, as, tiles_of(s_.h_tiles)};
    auto quantized = [](const Matrix& m) { return is_quantized(m.dtype); };
    auto needs_int8 = [&](const Matrix& m) { return quantized(m) && !tiles; };  // its input's int8 form
    // The matrices whose rows a prompt's threads claim in units (below): q8 / q4, and any on tiles
    auto claimable = [&](const Matrix& m) { return quantized(m) || (tiles && m.dtype == DType::BF16); };
    // The thread that computes a head of the attention output quantizes it (for a q8 / q4 o_proj)
    // when a head group is whole blocks of kQBlock; otherwise the team does it as a step of its own.
    const bool att_blocks = (G * D) % kQBlock == 0;
    // A prompt chunk's q8 / q4 matmuls (kClaimRows) go to the threads in units claimed as they get to
    // them: q/k/v in whole heads, the others in units of 32 rows (whole q8 / q4 row groups, and whole
    // kQBlock columns of the MLP's hidden rows). In fixed shares the barriers after them waited 3-7%
    // of a prompt's time (two Zen 4 cores under a shared host run at unequal speeds); claimed, 512
    // tokens of Qwen2.5-0.5B ran 2-4% (q4) and 4-7% (q8) faster (one process, alternating). Not for
    // the AVX-512 bf16 / f32 panel products; on token tiles (made once per input, so a unit costs no
    // rearranging of the tokens) the bf16 matrices are claimed too.
    const bool claiming = n >= kClaimRows;
    static_assert(kClaimRows >= kMinTileTokens, "a tile table's prompt that claims has its token tiles");
    constexpr int kClaimUnit = 32;
    std::atomic<int>* next_unit = s_.next_unit.get();
    if (claiming)
        for (int i = 0; i < c.num_layers * kClaimSteps; i++) next_unit[i].store(0, std::memory_order_relaxed);
    bool stop = false;

#pragma omp parallel num_threads(threads_)
    {
        const Team team;
        const FlushSubnormals ftz;
        int a, b;

        // The input of each block is x normed. A chunk of many rows is normed by the team, a share of
        // rows each, into the shared buffers, and the team meets before the matmuls. A chunk of fewer
        // rows than threads (a decode step) would leave threads idle and then waiting: every thread
        // norms every row into buffers of its own, and goes on to its matmul rows at once.
        const bool own_norm = n < team.nth && n <= kOwnNormRows;
        const size_t first = own_norm ? size_t(team.tid) * kOwnNormRows : 0;  // this thread's rows
        const size_t HB = size_t(q_blocks(H));
        float* xn = f32(s_.xn) + first * H;
        const MatmulInput in_x{xn, H, s_.xn_q.as<int8_t>() + first * HB * kQBlock, s_.xn_d.as<float>() + first * HB,
                               s_.xn_s.as<int32_t>() + first * HB, tiles_of(s_.xn_tiles)};
        // The residual x += proj after o_proj and down_proj: with own_norm, each thread adds the
        // columns it computed as soon as it has them; otherwise the norm step that follows adds each
        // row as it norms it (add_proj), while the row is in L1.
        auto add_residual_columns = [&](int c0, int c1) {
            if (own_norm && c0 < c1)
                for (int t = 0; t < n; t++) K.add(x + size_t(t) * H + c0, proj + size_t(t) * H + c0, c1 - c0);
        };
        // fn(a, b) on the rows [a, b) of `rows` that this thread takes at step `step` of a layer:
        // claimed units of unit_rows rows as it gets to them, or its fixed share cut at `align`.
        auto share_rows = [&](bool claim_units, int layer, int step, int rows, int unit_rows, int align, auto&& fn) {
            int a, b;
            if (!claim_units) {
                team.split(rows, align, a, b);
                fn(a, b);
                return;
            }
            const int units = (rows + unit_rows - 1) / unit_rows;
            while (claim(next_unit[layer * kClaimSteps + step], units, team.nth, a, b))
                fn(a * unit_rows, std::min(rows, b * unit_rows));
        };
        // A bf16 prompt adds o_proj's and down_proj's products into the residual stream x as their
        // tiles are stored (kernels.h: matmul_bf16_add, matmul_bf16_panels), so the norm step after
        // them reads x alone, with the same sums: 0.3-0.8% faster (one process, alternating, 16-24
        // rounds), the `add` pass's share of a profile. proj_pending: the last product is in proj.
        auto adds_into_x = [&](const Matrix& m) {
            return !own_norm && n > 1 && m.dtype == DType::BF16 && K.matmul_bf16_add;
        };
        bool proj_pending = false;
        auto norm_input = [&](const float* w, int r0, bool quantize, bool add_proj, bool make_tiles) {
            const int step = own_norm ? 1 : team.nth;
            for (int t = r0 + (own_norm ? 0 : team.tid); t < n; t += step) {
                if (add_proj && !own_norm) K.add(x + size_t(t) * H, proj + size_t(t) * H, H);
                K.rmsnorm(x + size_t(t) * H, w, eps, H, xn + size_t(t) * H);
                if (quantize) in_x.quantize_row(K, t);
                if (make_tiles && in_x.tiles) in_x.tile_cols(K, t, 0, H);
            }
            if (!own_norm) team.sync();
        };

        // Token embeddings, and cos|sin of each position as transformers computes them in float32:
        // inv_freq = 1 / theta^(2i/D), angle = position * inv_freq.
        for (int t = team.tid; t < n; t += team.nth) {
            embed(tokens[t], x + size_t(t) * H, embed_rows, t);
            float* cs = rope + size_t(t) * D;
            for (int i = 0; i < half; i++) {
                const float inv_freq = 1.0f / std::pow(float(c.rope_theta), float(2 * i) / float(D));
                const float angle = float(pos[t]) * inv_freq;
                cs[i] = float(std::cos(double(angle)));
                cs[half + i] = float(std::sin(double(angle)));
            }
        }
        team.sync();

        for (int l = 0; l < c.num_layers; l++) {
            const LayerWeights& w = layers_[l];

            // --- self-attention ---
            norm_input(w.input_layernorm.data(), 0, needs_int8(w.q_proj) || needs_int8(w.k_proj) || needs_int8(w.v_proj),
                       proj_pending, true);

            // q, k, v projections with their biases; a thread owns whole heads, so it applies RoPE
            // to its own heads and writes its k and v heads into the cache without waiting.
            // Claimed, a unit is a head: the q heads first, then the k/v heads.
            auto q_heads = [&](int a, int b) {
                matmul_rows(K, in_x, n, w.q_proj, w.q_bias.data(), q, QD, a, b);
                for (int t = 0; t < n; t++)
                    for (int h = a / D; h < b / D; h++) K.rope(q + size_t(t) * QD + h * D, rope + size_t(t) * D, rope + size_t(t) * D + half, half);
            };
            auto kv_heads = [&](int a, int b) {
                matmul_rows(K, in_x, n, w.k_proj, w.k_bias.data(), k, KVD, a, b);
                matmul_rows(K, in_x, n, w.v_proj, w.v_bias.data(), v, KVD, a, b);
                for (int h = a / D; h < b / D; h++)
                    for (int t = 0; t < n; t++) {
                        float* kt = k + size_t(t) * KVD + h * D;
                        K.rope(kt, rope + size_t(t) * D, rope + size_t(t) * D + half, half);
                        store_kv(seq[t], l, h, pos[t], kt, v + size_t(t) * KVD + h * D);
                    }
            };
            if (claiming && heads_align == D && claimable(w.q_proj) && claimable(w.k_proj) && claimable(w.v_proj)) {
                share_rows(true, l, 0, QD + KVD, D, D, [&](int a, int b) {
                    if (a < QD) q_heads(a, std::min(b, QD));
                    if (b > QD) kv_heads(std::max(a, QD) - QD, b - QD);
                });
            } else {
                team.split(QD, heads_align, a, b);
                q_heads(a, b);
                team.split(KVD, heads_align, a, b);
                kv_heads(a, b);
            }
            team.sync();

            // Causal grouped-query attention: row t sees positions 0..pos[t] of its sequence. One
            // work item is a (KV head, row) pair and covers the G query heads that share the KV head;
            // with split-KV, a range of that row's keys.
            // the attention output's int8 form or tiles, columns [c0, c0 + len) of row t
            const bool q_att = needs_int8(w.o_proj);
            auto att_ready = [&](int t, int c0, int len) {
                if (q_att) in_att.quantize_cols(K, t, c0, len);
                if (in_att.tiles) in_att.tile_cols(K, t, c0, len);
            };
            float* scratch = f32(s_.scores) + size_t(team.tid) * attention_scratch_floats(G, max_context_, D);
            auto attend = [&](int h, int t, int k0, int k1, float* out, float* lse) {
                const float* qt = q + size_t(t) * QD + size_t(h) * G * D;
                KVCache& cache = caches_[size_t(seq[t])];
                if (cache.dtype() == DType::BF16)
                    K.attention_bf16(qt, G, D, cache.keys<uint16_t>(l, h) + size_t(k0) * D,
                                     cache.values<uint16_t>(l, h) + size_t(k0) * D, k1 - k0, scale, scratch, out, lse);
                else if (cache.dtype() == DType::F16)
                    K.attention_f16(qt, G, D, cache.keys<uint16_t>(l, h) + key_offset(k0, 0, D),
                                    cache.values<uint16_t>(l, h) + size_t(k0) * D, k1 - k0, scale, scratch, out, lse);
                else
                    K.attention_f32(qt, G, D, cache.keys<float>(l, h) + key_offset(k0, 0, D),
                                    cache.values<float>(l, h) + size_t(k0) * D, k1 - k0, scale, scratch, out, lse);
            };
            const int items = c.num_kv_heads * n, splits = kv_splits(items, team.nth, pos, n);
            if (splits == 1) {
                for (int item = team.tid; item < items; item += team.nth) {
                    const int h = item % c.num_kv_heads, t = item / c.num_kv_heads;
                    attend(h, t, 0, pos[t] + 1, att + size_t(t) * QD + size_t(h) * G * D, nullptr);
                    if (att_blocks) att_ready(t, h * G * D, G * D);
                }
            } else {
                // Split-KV (a decode step on more threads than KV heads): item (h, t) becomes `splits`
                // ranges of its keys, each range's output and log-sum-exp go to att_part, and then
                // each (h, t) merges its ranges: out = sum_r exp(lse_r - lse) out_r.
                float* part = f32(s_.att_part);
                const size_t part_floats = size_t(G) * (D + 1);
                for (int item = team.tid; item < items * splits; item += team.nth) {
                    const int r = item % splits, h = item / splits % c.num_kv_heads, t = item / splits / c.num_kv_heads;
                    const int nk = pos[t] + 1, len = split_keys(nk, splits), k0 = r * len;
                    float* o = part + size_t(item) * part_floats;
                    if (k0 < nk) attend(h, t, k0, std::min(nk, k0 + len), o, o + G * D);
                }
                team.sync();
                for (int item = team.tid; item < items; item += team.nth) {
                    const int h = item % c.num_kv_heads, t = item / c.num_kv_heads;
                    const int nk = pos[t] + 1, len = split_keys(nk, splits), used = (nk + len - 1) / len;
                    const float* p0 = part + size_t(item) * splits * part_floats;
                    float* out = att + size_t(t) * QD + size_t(h) * G * D;
                    for (int g = 0; g < G; g++) {
                        float mx = -INFINITY, wsum = 0.f, wt[kMaxKvSplits];
                        for (int r = 0; r < used; r++) mx = std::max(mx, p0[r * part_floats + G * D + g]);
                        for (int r = 0; r < used; r++) wsum += wt[r] = std::exp(p0[r * part_floats + G * D + g] - mx);
                        for (int d = 0; d < D; d++) {
                            float acc = 0.f;
                            for (int r = 0; r < used; r++) acc += wt[r] * p0[r * part_floats + g * D + d];
                            out[g * D + d] = acc / wsum;
                        }
                    }
                    if (att_blocks) att_ready(t, h * G * D, G * D);
                }
            }
            team.sync();
            if ((q_att || in_att.tiles) && !att_blocks) {
                for (int t = team.tid; t < n; t += team.nth) att_ready(t, 0, QD);
                team.sync();
            }

            // o_proj, and the residual
            const bool o_tiles = on_tiles(in_att, w.o_proj), o_adds = o_tiles || adds_into_x(w.o_proj);
            share_rows(claiming && claimable(w.o_proj), l, 1, H, kClaimUnit, 16, [&](int a, int b) {
                if (o_tiles) return matmul_rows(K, in_att, n, w.o_proj, nullptr, x, H, a, b, true);
                if (o_adds) {
                    if (a < b) K.matmul_bf16_add(in_att.x, in_att.K, n, QD, static_cast<const uint16_t*>(w.o_proj.data), x, H, a, b);
                    return;
                }
                matmul_rows(K, in_att, n, w.o_proj, nullptr, proj, H, a, b);
                add_residual_columns(a, b);
            });
            team.sync();

            // --- MLP: down(silu(gate(x)) * up(x)); a thread's gate and up columns are its own, so
            // it applies silu * up to them at once, and quantizes them (whole blocks) for down_proj.
            norm_input(w.post_attention_layernorm.data(), 0, needs_int8(w.gate_proj) || needs_int8(w.up_proj), !o_adds,
                       true);
            const bool q_down = needs_int8(w.down_proj);
            const bool bf16_swiglu =  // (kernels.h: a table may have no such kernel)
                K.matmul_bf16_swiglu && w.gate_proj.dtype == DType::BF16 && w.up_proj.dtype == DType::BF16;
            // A bf16 prompt's hidden rows go from gate/up to down_proj as token panels (kernels.h),
            // each made once, by the thread that computed its columns, instead of by every thread
            // from f32 rows; the f32 rows are not stored. 1.2-1.6% faster at 512 tokens (one process,
            // alternating, 16-20 rounds), the same sums.
            uint32_t* const hp = bf16_swiglu && K.matmul_bf16_panels && w.down_proj.dtype == DType::BF16 && n > 1
                                     ? s_.h_panels.as<uint32_t>()
                                     : nullptr;
            // On token tiles, silu(gate) * up goes straight to the hidden rows' tiles (kernels.h).
            const bool swiglu_tiles = K.swiglu_tiles && on_tiles(in_x, w.gate_proj) &&
                                      w.up_proj.dtype == w.gate_proj.dtype && on_tiles(in_h, w.down_proj);
            static_assert(kClaimUnit % kQBlock == 0, "a claimed unit of the MLP's hidden rows is whole blocks");
            share_rows(claiming && claimable(w.gate_proj) && claimable(w.up_proj), l, 2, I, kClaimUnit, kQBlock,
                       [&](int a, int b) {
                           if (a >= b) return;
                           if (swiglu_tiles)
                               return K.swiglu_tiles(in_x.tiles, n, H, int(w.gate_proj.dtype), w.gate_proj.data,
                                                     w.up_proj.data, a, b, in_h.tiles, I);
                           if (bf16_swiglu) {  // silu(gate) * up comes out of the product
                               K.matmul_bf16_swiglu(in_x.x, in_x.K, n, H, static_cast<const uint16_t*>(w.gate_proj.data),
                                                    static_cast<const uint16_t*>(w.up_proj.data), hp ? nullptr : gate, I,
                                                    a, b, hp);
                           } else {
                               matmul_rows(K, in_x, n, w.gate_proj, nullptr, gate, I, a, b);
                               matmul_rows(K, in_x, n, w.up_proj, nullptr, up, I, a, b);
                           }
                           for (int t = 0; t < n; t++) {
                               float* h = gate + size_t(t) * I + a;
                               if (!bf16_swiglu) K.silu_mul(h, up + size_t(t) * I + a, b - a, h);
                               if (q_down) in_h.quantize_cols(K, t, a, b - a);
                               if (in_h.tiles) in_h.tile_cols(K, t, a, b - a);
                           }
                       });
            team.sync();

            // down_proj, and the residual (the next norm step adds it where own_norm does not)
            const bool down_tiles = on_tiles(in_h, w.down_proj), down_adds = down_tiles || (hp && adds_into_x(w.down_proj));
            share_rows(claiming && claimable(w.down_proj), l, 3, H, kClaimUnit, 16, [&](int a, int b) {
                if (down_tiles) return matmul_rows(K, in_h, n, w.down_proj, nullptr, x, H, a, b, true);
                if (hp && a < b)
                    K.matmul_bf16_panels(hp, n, I, static_cast<const uint16_t*>(w.down_proj.data), nullptr,
                                         down_adds ? x : proj, H, a, b, down_adds);
                else
                    matmul_rows(K, in_h, n, w.down_proj, nullptr, proj, H, a, b);
                add_residual_columns(a, b);
            });
            proj_pending = !down_adds;
            if (team.tid == 0 && interrupted && interrupted()) stop = true;
            team.sync();
            if (stop) break;
        }

        // --- final norm and lm_head, only for the rows whose logits were asked for ---
        if (!stop && logits) {
            const int r0 = all_logits ? 0 : n - 1;
            norm_input(norm_.data(), r0, quantized(lm_head()), proj_pending, false);
            team.split(c.vocab_size, 16, a, b);
            matmul_rows(K, in_x.from_row(r0), n - r0, lm_head(), nullptr, logits, c.vocab_size, a, b);
        }
    }
    if (stop) throw Interrupted();
}

}  // namespace qwen2rt
