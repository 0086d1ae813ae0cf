// Small shared pieces: element types, bf16/f16 conversion, an aligned buffer, error types.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "numeric.h"

#include <utility>

namespace qwen2rt {

// Element type of a weight matrix (or of a source tensor handed over by the loader). Q8, Q6 and Q4
// are the packed block formats of quant.h, and a bf16 matrix is held packed too (quant.h). A source
// tensor of BF16 is row-major (a checkpoint's); BF16P is one already packed (a converted model's).
enum class DType : int { F32 = 0, BF16 = 1, F16 = 2, Q8 = 3, Q4 = 4, BF16P = 5, Q6 = 6 };

inline const char* dtype_name(DType t) {
    switch (t) {
        case DType::F32: return "f32";
        case DType::BF16: return "bf16";
        case DType::F16: return "f16";
        case DType::Q8: return "q8";
        case DType::Q4: return "q4";
        case DType::Q6: return "q6";
        case DType::BF16P: return "bf16p";
    }
    return "?";
}

// Bytes per element of the plain types (f32, bf16, f16).
inline size_t dtype_size(DType t) { return t == DType::F32 ? 4 : 2; }
inline bool is_quantized(DType t) { return t == DType::Q8 || t == DType::Q6 || t == DType::Q4; }

// Raised for bad input the caller can fix (mapped to ValueError-like Python exceptions).
struct InvalidArgument : std::invalid_argument {
    using std::invalid_argument::invalid_argument;
};
// Raised when a request is larger than the context the model was created with.
struct ContextOverflow : std::length_error {
    using std::length_error::length_error;
};
// Raised when memory cannot be had (mapped to qwen2rt.OutOfMemoryError), with the size asked for.
struct AllocationFailed : std::bad_alloc {
    std::string message;
    explicit AllocationFailed(size_t bytes) : message("could not allocate " + std::to_string(bytes) + " bytes") {}
    const char* what() const noexcept override { return message.c_str(); }
};
// Raised when a forward pass was stopped by a pending KeyboardInterrupt (the Python error is already set).
struct Interrupted : std::exception {
    const char* what() const noexcept override { return "interrupted"; }
};

// 64-byte aligned, zero-filled memory. Large blocks come straight from mmap, so pages that are
// never written (the unused tail of a KV cache) cost no resident memory.
class AlignedBuffer {
  public:
    AlignedBuffer() = default;
    // huge_pages: ask for 2 MiB pages (weights, read in long sweeps). Not for buffers filled a
    // little at a time, like the KV cache: one touched byte would make 2 MiB resident.
    explicit AlignedBuffer(size_t bytes, bool huge_pages = false);
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

// Huge pages: 2 MiB on x86-64 (and on arm64 with 4 KiB base pages).
constexpr size_t kHugePageBytes = size_t(2) << 20;
// Makes the kHugePageBytes-aligned page at `page` of an anonymous mapping one huge page now
// (Linux 6.1's MADV_COLLAPSE; its parts not yet written become resident, zero). false where that
// cannot be done (another OS, an older kernel, no huge page free): the memory stays as it was.
bool collapse_huge_page(void* page);

// A file descriptor, closed with its owner.
class OwnedFd {
  public:
    OwnedFd() = default;
    explicit OwnedFd(int fd) : fd_(fd) {}
    ~OwnedFd() { reset(); }
    OwnedFd(OwnedFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
    OwnedFd& operator=(OwnedFd&& o) noexcept {
        if (this != &o) reset(), fd_ = std::exchange(o.fd_, -1);
        return *this;
    }
    OwnedFd(const OwnedFd&) = delete;
    OwnedFd& operator=(const OwnedFd&) = delete;
    int get() const { return fd_; }
    void reset();

  private:
    int fd_ = -1;
};
// Reads exactly `bytes` at `offset` of fd (retrying short reads); false at end of file or on error.
bool read_at(int fd, void* buf, size_t bytes, uint64_t offset);

// a*b for sizes, throwing instead of wrapping around.
inline size_t checked_mul(size_t a, size_t b) {
    if (a != 0 && b > SIZE_MAX / a) throw InvalidArgument("size overflow");
    return a * b;
}

}  // namespace qwen2rt
