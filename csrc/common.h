// Small shared pieces: element types, bf16/f16 conversion, an aligned buffer, error types.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace qwen2rt {

// Element type of a weight matrix (or of a source tensor handed over by the loader).
enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

inline const char* dtype_name(DType t) {
    switch (t) {
        case DType::F32: return "f32";
        case DType::BF16: return "bf16";
        case DType::F16: return "f16";
    }
    return "?";
}

inline size_t dtype_size(DType t) { return t == DType::F32 ? 4 : 2; }

// Raised for bad input the caller can fix (mapped to ValueError-like Python exceptions).
struct InvalidArgument : std::invalid_argument {
    using std::invalid_argument::invalid_argument;
};
// Raised when a request is larger than the context the model was created with.
struct ContextOverflow : std::length_error {
    using std::length_error::length_error;
};
// Raised when a forward pass was stopped by a pending KeyboardInterrupt (the Python error is already set).
struct Interrupted : std::exception {
    const char* what() const noexcept override { return "interrupted"; }
};

inline float bf16_to_f32(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// Round to nearest even, as torch's .to(torch.bfloat16) does; NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
}

// IEEE half to float, exact for every input (subnormals, inf, nan included).
inline float f16_to_f32(uint16_t h) {
    uint32_t sign = uint32_t(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else {  // subnormal: normalise
            int e = -1;
            do {
                e++;
                man <<= 1;
            } while ((man & 0x400u) == 0);
            u = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3ffu) << 13;
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | man << 13;
    } else {
        u = sign | (exp + 127 - 15) << 23 | man << 13;
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// 64-byte aligned, zero-filled memory. Large blocks come straight from mmap, so pages that are
// never written (the unused tail of a KV cache) cost no resident memory.
class AlignedBuffer {
  public:
    AlignedBuffer() = default;
    explicit AlignedBuffer(size_t bytes);
    ~AlignedBuffer();
    AlignedBuffer(AlignedBuffer&& o) noexcept { swap(o); }
    AlignedBuffer& operator=(AlignedBuffer&& o) noexcept {
        AlignedBuffer tmp(std::move(o));
        swap(tmp);
        return *this;
    }
    AlignedBuffer(const AlignedBuffer&) = delete;
    AlignedBuffer& operator=(const AlignedBuffer&) = delete;

    void* data() const { return ptr_; }
    size_t size() const { return size_; }
    template <class T> T* as() const { return static_cast<T*>(ptr_); }

  private:
    void swap(AlignedBuffer& o) noexcept {
        std::swap(ptr_, o.ptr_);
        std::swap(size_, o.size_);
        std::swap(mapped_, o.mapped_);
    }
    void* ptr_ = nullptr;
    size_t size_ = 0;
    bool mapped_ = false;
};

// a*b for sizes, throwing instead of wrapping around.
inline size_t checked_mul(size_t a, size_t b) {
    if (a != 0 && b > SIZE_MAX / a) throw InvalidArgument("size overflow");
    return a * b;
}

}  // namespace qwen2rt
