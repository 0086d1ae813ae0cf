// The Qwen2 decoder: configuration, weights, KV cache and the forward pass.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace qwen2rt {

struct Qwen2Config {
    int vocab_size = 0;
    int hidden_size = 0;
    int intermediate_size = 0;
    int num_layers = 0;
    int num_heads = 0;
    int num_kv_heads = 0;
    int head_dim = 0;
    float rms_norm_eps = 1e-6f;
    double rope_theta = 10000.0;
    bool tie_word_embeddings = false;
};

// A [rows, cols] weight matrix (a torch Linear weight: one row per output): row-major f32, or packed
// bf16 / q8 / q4 (quant.h). `data` points into `owned`, into the model's weight arena, or into
// memory the caller keeps alive (a mapped file).
struct Matrix {
    DType dtype = DType::F32;
    int rows = 0, cols = 0;
    const void* data = nullptr;
    AlignedBuffer owned;
    // Room in the model's WeightArena, once the matrix was made there: set again, it is made there
    // again if it fits (borrowed in between, `data` points elsewhere).
    uint8_t* room = nullptr;
    size_t room_bytes = 0;
    // >= 0: the rows are GGUF blocks of this ggml type, borrowed from the mapped file. Only an untied
    // embedding is held so: it is read a row per token, never multiplied (embed()).
    int gguf_type = -1;
};

// Weight matrices made at load (converted or copied, not borrowed) that are smaller than kBlock / 2,
// packed one after another into blocks of 2 MiB pages. A buffer of their own was in 4 KiB pages
// (huge pages are only asked for from 4 MiB, lest a small buffer round up to 2 MiB): every q4 matrix
// of a 0.5B model, and its q4 decode ran at 110 tok/s against 136 from 2 MiB pages (a TLB miss each
// 4 KiB, and the hardware prefetcher stops at every page). A block's unused tail is never resident.
class WeightArena {
  public:
    static constexpr size_t kBlock = size_t(32) << 20;
    // 64-byte aligned room for `bytes` (< kBlock / 2); its contents are zero.
    uint8_t* take(size_t bytes);

  private:
    std::vector<AlignedBuffer> blocks_;
    size_t used_ = 0;  // of the last block
};

struct LayerWeights {
    std::vector<float> input_layernorm;
    Matrix q_proj, k_proj, v_proj;
    std::vector<float> q_bias, k_bias, v_bias;
    Matrix o_proj;
    std::vector<float> post_attention_layernorm;
    Matrix gate_proj, up_proj, down_proj;
};

// Keys and values of every layer for max_context positions, allocated once (pages are only made
// resident as positions are written). Layout [layer][kv_head][positions], so that the attention for
// one KV head reads one contiguous block: values as rows [position][head_dim], keys in key blocks
// (kernels.h), the positions rounded up to whole blocks. Elements are f32, IEEE f16 or bf16: 16 bits
// halve what a long-context decode step reads (the keys and values themselves are computed in f32),
// and a bf16 cache, laid out for bf16 dot products (kernels.h), halves the attention's arithmetic.
class KVCache {
  public:
    KVCache() = default;
    KVCache(int layers, int kv_heads, int head_dim, int max_context, DType dtype);
    template <class T>
    T* keys(int layer, int head) { return k_.as<T>() + offset(layer, head); }
    template <class T>
    T* values(int layer, int head) { return v_.as<T>() + offset(layer, head); }
    static size_t bytes_needed(int layers, int kv_heads, int head_dim, int max_context, DType dtype);
    size_t bytes() const { return k_.size() + v_.size(); }
    int max_context() const { return max_context_; }
    DType dtype() const { return dtype_; }
    // Called once positions [0, n) of every (layer, head) are written: the 2 MiB pages those
    // positions fill at least half of become huge pages (collapse_huge_page). A decode step at 8k
    // positions of Qwen2.5-0.5B ran 8% faster with its cache in 2 MiB pages than in 4 KiB ones (2
    // Xeon cores, f16 cache, alternating processes): the attention reads each (layer, KV head) as
    // 1 MB of K and of V, 512 pages of 4 KiB. A cache allocated whole (AlignedBuffer(huge_pages))
    // would be resident as soon as its rows were begun; this way a mostly unwritten one stays mostly
    // unresident. Cheap unless n grew by kSettleStep positions since the last look.
    void settle(int n);

  private:
    static constexpr int kSettleStep = 256;
    size_t offset(int layer, int head) const {
        return (size_t(layer) * kv_heads_ + head) * key_positions(max_context_) * head_dim_;
    }
    int kv_heads_ = 0, head_dim_ = 0, max_context_ = 0;
    DType dtype_ = DType::F32;
    AlignedBuffer k_, v_;
    int settled_ = 0;            // n at the last look
    bool collapsing_ = true;     // false once a collapse failed: this OS or kernel cannot
    std::vector<bool> huge_[2];  // per 2 MiB page of k_ and v_: judged (collapsed) already
};

class Qwen2Model {
  public:
    // Checks the configuration (throws InvalidArgument) and allocates the KV cache (f32, f16 or
    // bf16) and scratch.
    Qwen2Model(const Qwen2Config& cfg, DType weight_dtype, int threads, int max_context, DType kv_dtype);

    // Hands over one tensor under its Hugging Face name ("model.layers.3.self_attn.q_proj.weight").
    // The shape must be the one the config implies and `nbytes` exactly its size in `src` (a packed
    // size for q8 / q4). A matrix is stored as `target` (norms and biases always as f32). When
    // `may_borrow` and src == target, the model keeps pointing at `data` (the caller keeps it alive)
    // and returns true; otherwise it converts or quantizes into memory of its own and returns false.
    // With gguf_type >= 0, `data` holds GGUF blocks of that ggml type (src is then ignored), made
    // float32 a chunk of rows at a time; an untied embedding in GGUF blocks is borrowed as it is
    // when `may_borrow` (checked whole first), as llama.cpp reads its token rows from the file.
    bool set_tensor(const std::string& name, const void* data, DType src, const std::vector<int64_t>& shape,
                    size_t nbytes, bool may_borrow, DType target, int gguf_type = -1);
    // The stored bytes of a tensor (a matrix in its dtype, a norm or bias as f32), to write a
    // converted model; data is nullptr for an unknown or missing name, or the tied lm_head.
    struct TensorView {
        DType dtype;
        const void* data;
        size_t nbytes;
        int rows, cols;  // cols = 0 for a vector
        int gguf_type = -1;  // >= 0: GGUF blocks of this ggml type (Matrix::gguf_type)
    };
    TensorView tensor_view(const std::string& name);
    // From now on the embedding's rows are read with pread from `fd` (which the model then owns and
    // closes), where the borrowed table starts at `offset`, not through the caller's mapping: reading
    // a row through a file mapping makes the cached pages around it resident too (the kernel maps up
    // to 64 KiB around a fault), so a long prompt made tens of MB of an untied table resident. Throws
    // InvalidArgument if the embedding is not borrowed or the file is shorter than the table.
    void read_embedding_from_file(int fd, uint64_t offset);
    // Names of the tensors still missing (empty when the model is ready).
    std::vector<std::string> missing_tensors() const;

    // The model holds one KV cache per sequence slot: slot 0 always, more after set_sequences(n)
    // (each max_context long; pages become resident only as positions are written).
    void set_sequences(int n);
    int sequences() const { return int(caches_.size()); }

    // Runs `n` tokens of sequence `seq` at positions start_pos.. through the decoder; they attend to
    // every cached position of that sequence before them. Writes float32 logits for every token
    // (all_logits, n rows) or for the last one (one row) to `logits`, each row vocab_size long.
    // `interrupted`, if set, is polled between layers; when it returns true the pass stops and
    // Interrupted is thrown.
    void forward(const int32_t* tokens, int n, int start_pos, bool all_logits, float* logits,
                 const std::function<bool()>& interrupted = {}, int seq = 0);
    // One decode step for n distinct sequences at once: token i is appended to sequence seqs[i]
    // (at position cache_len(seqs[i])). Every weight is read once for all of them. Writes n rows
    // of logits.
    void decode_batch(const int32_t* tokens, const int32_t* seqs, int n, float* logits,
                      const std::function<bool()>& interrupted = {});

    void reset(int seq = 0) { tokens_.at(size_t(seq)).clear(); }
    // How many positions of a sequence's cache hold valid keys and values, and the token at each.
    int cache_len(int seq = 0) const { return int(tokens_.at(size_t(seq)).size()); }
    const std::vector<int32_t>& cached_tokens(int seq = 0) const { return tokens_.at(size_t(seq)); }
    int max_context() const { return max_context_; }
    int threads() const { return threads_; }
    DType dtype() const { return dtype_; }
    const Qwen2Config& config() const { return cfg_; }
    size_t weight_bytes() const;
    size_t kv_cache_bytes() const;  // all slots
    DType kv_dtype() const { return kv_dtype_; }

    // Tokens a single pass processes at once; longer prompts go through in chunks of this size. Each
    // weight matrix is read (and for q8 / q6 / q4 on AMX, dequantized to bf16) once per chunk: a
    // 512-token prompt in one chunk instead of two of 256 ran 7% (bf16), 6% (q8) and 2% (q4) faster
    // on 2 Xeon cores with AMX (alternating processes), for 15 MB more activations.
    static constexpr int kChunk = 512;
    // A chunk of at most this many rows, and fewer than threads (a decode step), is normed by every
    // thread for itself (forward_chunk).
    static constexpr int kOwnNormRows = 4;
    // A chunk of at least this many rows (a prompt: compute-bound) shares the rows of its q8 / q4
    // matrices out as the threads claim them; a smaller one keeps one contiguous share per thread.
    static constexpr int kClaimRows = 16;

  private:
    // n rows (n <= kChunk): row t is token tokens[t] of sequence seq[t] at position pos[t].
    void forward_chunk(const int32_t* tokens, const int32_t* seq, const int32_t* pos, int n, float* logits,
                       bool all_logits, const std::function<bool()>& interrupted);
    void check_tokens(const int32_t* tokens, int n) const;
    void check_ready();
    // Token t's embedding row into out; rows != nullptr: the bytes read from the file for token t
    // (read_embedding_rows), else the table itself.
    void embed(int token, float* out, const uint8_t* rows, int t) const;
    // The bytes of the embedding that hold a token's row: [begin, begin + bytes) of the table, where
    // it is row `row` (a packed table is read a group of rows at a time).
    void embedding_span(int token, size_t& begin, size_t& bytes, int& row) const;
    // With the embedding read from its file: each token's span, read into embed_rows_ (throws
    // InvalidArgument if the file has become shorter). nullptr otherwise.
    const uint8_t* read_embedding_rows(const int32_t* tokens, int n);
    // Writes one position's key (after RoPE) and value of one KV head into a sequence's cache.
    void store_kv(int seq, int layer, int head, int pos, const float* k, const float* v);
    Matrix* find_matrix(const std::string& name, int& rows, int& cols);
    std::vector<float>* find_vector(const std::string& name, int& len);
    const Matrix& lm_head() const { return cfg_.tie_word_embeddings ? embed_tokens_ : lm_head_; }

    Qwen2Config cfg_;
    DType dtype_;
    int threads_;
    int max_context_;
    DType kv_dtype_;
    std::vector<std::vector<int32_t>> tokens_;  // per sequence; capacity max_context, reserved once
    bool ready_ = false;           // every weight present (checked at the first forward)

    Matrix embed_tokens_;
    OwnedFd embed_file_;               // read_embedding_from_file
    uint64_t embed_offset_ = 0;
    std::vector<uint8_t> embed_rows_;  // [chunk, span]: rows read from it for one chunk
    std::vector<LayerWeights> layers_;
    WeightArena arena_;  // the small matrices made at load
    std::vector<float> norm_;
    Matrix lm_head_;

    std::vector<KVCache> caches_;  // per sequence
    std::vector<int32_t> row_seq_, row_pos_;  // [kChunk]: the rows of a chunk

    // Activations for one chunk, allocated once: the forward pass allocates nothing.
    struct Scratch {
        AlignedBuffer x;        // residual stream        [chunk, hidden]
        AlignedBuffer xn;       // normed input of a block [max(chunk, threads x kOwnNormRows), hidden]
        AlignedBuffer xn_q, xn_d, xn_s;     // xn as int8 blocks (quant.h), for q8 / q4 matrices
        AlignedBuffer q, k, v;  // projections            [chunk, heads * head_dim]
        AlignedBuffer att;      // attention output       [chunk, heads * head_dim]
        AlignedBuffer proj;     // o_proj / down_proj out [chunk, hidden]
        AlignedBuffer gate, up; // MLP                    [chunk, intermediate]
        AlignedBuffer h_panels; // MLP hidden rows as bf16 token panels (kernels.h), for down_proj
        // xn, att and the MLP's hidden rows as token tiles (kernels.h), for a tile backend's prompt
        // products; pages never written (no tile backend) cost no memory
        AlignedBuffer xn_tiles, att_tiles, h_tiles;
        AlignedBuffer rope;     // cos | sin per position [chunk, head_dim]
        AlignedBuffer act_q, act_d, act_s;  // attention or MLP output as int8 blocks [chunk, ...]
        AlignedBuffer scores;   // attention scratch      [threads, attention_scratch_floats]
        AlignedBuffer att_part; // split-KV outputs and log-sum-exps of key ranges
        // [layers x kClaimSteps]: the next unclaimed unit of each step's rows (forward_chunk)
        std::unique_ptr<std::atomic<int>[]> next_unit;
    } s_;
    static constexpr int kClaimSteps = 4;  // q/k/v, o_proj, gate/up, down_proj
};

}  // namespace qwen2rt
