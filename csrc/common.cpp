#include "common.h"

#include <cstdlib>
#include <new>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#include <unistd.h>
#define QWEN2RT_HAVE_MMAP 1
#endif
#include <cerrno>

namespace qwen2rt {

AlignedBuffer::AlignedBuffer(size_t bytes, bool huge_pages) {
    if (bytes == 0) return;
#if QWEN2RT_HAVE_MMAP
    if (bytes >= (size_t(1) << 20)) {
        // Anonymous pages are zero and become resident only when first written.
        void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) throw AllocationFailed(bytes);
#ifdef MADV_HUGEPAGE
        // Weights are read in long sweeps: 2 MiB pages spare the TLB (advice only).
        if (huge_pages && bytes >= (size_t(4) << 20)) madvise(p, bytes, MADV_HUGEPAGE);
#endif
        ptr_ = p;
        size_ = bytes;
        mapped_ = true;
        return;
    }
#endif
    const size_t rounded = (bytes + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, rounded);
    if (!p) throw AllocationFailed(bytes);
    std::memset(p, 0, rounded);
    ptr_ = p;
    size_ = bytes;
}

bool collapse_huge_page(void* page) {
#if defined(__linux__)
    constexpr int kMadvCollapse = 25;  // MADV_COLLAPSE, which headers older than the kernel lack
    return madvise(page, kHugePageBytes, kMadvCollapse) == 0;
#else
    (void)page;
    return false;
#endif
}

AlignedBuffer::~AlignedBuffer() {
    if (!ptr_) return;
#if QWEN2RT_HAVE_MMAP
    if (mapped_) {
        munmap(ptr_, size_);
        return;
    }
#endif
    std::free(ptr_);
}

void OwnedFd::reset() {
#if QWEN2RT_HAVE_MMAP
    if (fd_ >= 0) close(fd_);
#endif
    fd_ = -1;
}

bool read_at(int fd, void* buf, size_t bytes, uint64_t offset) {
#if QWEN2RT_HAVE_MMAP
    auto* p = static_cast<char*>(buf);
    while (bytes > 0) {
        const ssize_t got = pread(fd, p, bytes, off_t(offset));
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) return false;
        p += got, bytes -= size_t(got), offset += uint64_t(got);
    }
    return true;
#else
    (void)fd, (void)buf, (void)bytes, (void)offset;
    return false;
#endif
}

}  // namespace qwen2rt
