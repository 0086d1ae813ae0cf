// The portable kernel table: plain C++ that any compiler and CPU runs. The reference that the SIMD
// tables must agree with, and the path QWEN2RT_ISA=generic forces.
#include <math.h>
#include <cstdlib>
#include <atomic>
#include <mutex>

#include "common.h"
#include "cpu_features.h"
#include "kernels.h"
#include "quant.h"

namespace qwen2rt {
namespace generic {

#include "kernels_portable.inc"

// Four rows of W against one token at a time: each W row is streamed once per token, which is fine
// for a reference; the SIMD versions block over tokens as well.
template <class WT, class Load>
static void matmul_rows(const float* X, int ldx, int M, int K, const WT* W, const float* bias, float* Y, int ldy,
                        int n0, int n1, Load load) {
    for (int m = 0; m < M; m++) {
        const float* x = X + size_t(m) * ldx;
        float* y = Y + size_t(m) * ldy;
        for (int n = n0; n < n1; n++) {
            const WT* w = W + size_t(n) * K;
            float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
            int k = 0;
            for (; k + 4 <= K; k += 4) {
                s0 += x[k] * load(w[k]);
                s1 += x[k + 1] * load(w[k + 1]);
                s2 += x[k + 2] * load(w[k + 2]);
                s3 += x[k + 3] * load(w[k + 3]);
            }
            for (; k < K; k++) s0 += x[k] * load(w[k]);
            y[n] = (s0 + s1) + (s2 + s3) + (bias ? bias[n] : 0.f);
        }
    }
}

static void matmul_f32(const float* X, int ldx, int M, int K, const float* W, const float* bias, float* Y, int ldy,
                       int n0, int n1) {
    matmul_rows(X, ldx, M, K, W, bias, Y, ldy, n0, n1, [](float v) { return v; });
}

// bf16: W packed (quant.h); the same sums in the same order as matmul_rows.
static void matmul_bf16(const float* X, int ldx, int M, int K, const uint16_t* W, const float* bias, float* Y,
                        int ldy, int n0, int n1) {
    for (int m = 0; m < M; m++) {
        const float* x = X + size_t(m) * ldx;
        float* y = Y + size_t(m) * ldy;
        for (int n = n0; n < n1; n++) {
            float s[4] = {0.f, 0.f, 0.f, 0.f};
            for (int k = 0; k < K; k++) s[k < K / 4 * 4 ? k % 4 : 0] += x[k] * bf16_to_f32(W[bf16_index(K, n, k)]);
            y[n] = (s[0] + s[1]) + (s[2] + s[3]) + (bias ? bias[n] : 0.f);
        }
    }
}

static const Kernels table = {
    "generic",          matmul_f32,         matmul_bf16,       rmsnorm_portable, rope_portable, silu_mul_portable,
    attention_f32_portable, attention_f16_portable, attention_bf16_portable, add_portable,       quantize_acts_portable,
    matmul_q_portable<DType::Q8>, matmul_q_portable<DType::Q4>, matmul_q_portable<DType::Q6>,
};

}  // namespace generic

const Kernels* kernels_generic() { return &generic::table; }

const Kernels* find_kernels(const std::string& isa) {
    std::vector<std::string> isas = available_isas();
    for (const std::string& e : emulated_isas()) isas.push_back(e);
    for (const std::string& have : isas) {
        if (have != isa) continue;
        if (isa == "generic") return kernels_generic();
#if defined(QWEN2RT_X86)
        if (isa == "avx2") return kernels_avx2();
        if (isa == "avx512") return kernels_avx512();
        if (isa == "amx") return kernels_amx();
        if (isa == "amx-emulated") return kernels_amx_emulated();
#endif
    }
    return nullptr;
}

static std::atomic<const Kernels*> g_active{nullptr};
static std::once_flag g_active_once;

static void pick_default() {
    const char* env = std::getenv("QWEN2RT_ISA");
    if (env && *env) {
        // An unknown or unavailable name is reported by the Python layer at import; here we fall back.
        if (const Kernels* k = find_kernels(env)) {
            g_active = k;
            return;
        }
    }
    g_active = find_kernels(available_isas().back());
}

const Kernels& active_kernels() {
    std::call_once(g_active_once, pick_default);
    return *g_active.load();
}

void set_active_isa(const std::string& isa) {
    std::call_once(g_active_once, pick_default);
    const Kernels* k = find_kernels(isa);
    if (!k) {
        std::string have;
        for (const std::string& s : available_isas()) have += (have.empty() ? "" : ", ") + s;
        throw InvalidArgument("ISA '" + isa + "' is not available on this CPU/build (available: " + have + ")");
    }
    g_active = k;
}

}  // namespace qwen2rt
