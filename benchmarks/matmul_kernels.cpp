// The prefill matmul kernels alone, on Qwen2.5-0.5B's matrix shapes, against one core's instruction
// peak: what benchmarks/bench.py cannot separate from the rest of a forward pass. From the project
// root (the ISA units with their own flags, as CMakeLists.txt builds them; x86-64 with AVX-512):
//
//   F="-mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni -mavx512bf16"
//   C="g++ -O3 -std=c++17 -fopenmp -DQWEN2RT_X86=1 -Icsrc"
//   $C -c csrc/kernels_avx512.cpp $F -o /tmp/k512.o && $C -c csrc/kernels_amx.cpp $F -o /tmp/kamx.o &&
//   $C -c csrc/kernels_avx2.cpp -mavx2 -mfma -mf16c -o /tmp/k2.o &&
//   $C benchmarks/matmul_kernels.cpp csrc/common.cpp csrc/cpu_features.cpp csrc/quant.cpp \
//      csrc/kernels_generic.cpp /tmp/k512.o /tmp/kamx.o /tmp/k2.o -o /tmp/matmul_kernels
//   /tmp/matmul_kernels avx512 bf16 512     # ISA, f32|bf16|q8|q4, tokens
//
// Each matrix is timed 5 times on 1 thread and on 2 (rows split as the model splits them); the
// best time counts. The peaks are register-only loops of one instruction (avx512::multiply_add_loop).
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels.h"
#include "quant.h"

using namespace qwen2rt;

static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// Multiply-adds x 2 a second (an op is a multiply or an add) of the instruction the format's
// prefill runs on, on one core (kernels.h).
static double peak(const std::string& fmt) {
    using avx512::MultiplyAdd;
    const MultiplyAdd op = fmt == "f32" ? MultiplyAdd::F32 : fmt == "bf16" ? MultiplyAdd::Bf16 : MultiplyAdd::Int8;
    const long iters = 50000000;
    const double t = now();
    avx512::multiply_add_loop(op, iters);
    return iters * 12.0 * avx512::multiply_adds_per_instruction(op) * 2 / (now() - t) * 1e-9;
}

int main(int argc, char** argv) {
    const char* isa = argc > 1 ? argv[1] : "avx512";
    const std::string fmt = argc > 2 ? argv[2] : "bf16";
    const int M = argc > 3 ? atoi(argv[3]) : 512;
    const Kernels* Kn = find_kernels(isa);
    if (!Kn) return fprintf(stderr, "no ISA %s here\n", isa), 1;
    peak(fmt);  // once to raise the clock
    const double top = peak(fmt);
    printf("%s %s, %d tokens; one core's peak %.0f G/s\n", isa, fmt.c_str(), M, top);
    // K, N and how many of each a layer has: q and o, k and v, gate and up, down
    const int shapes[][3] = {{896, 896, 2}, {896, 128, 2}, {896, 4864, 2}, {4864, 896, 1}};
    std::mt19937 g(1);
    std::normal_distribution<float> nd;
    double ops = 0, t1 = 0, t2 = 0;
    for (const auto& s : shapes) {
        const int K = s[0], N = s[1], Kp = (K + 31) / 32 * 32;
        std::vector<float> W(size_t(N) * K), X(size_t(M) * K), Y(size_t(M) * N);
        for (auto& v : W) v = 0.05f * nd(g);
        for (auto& v : X) v = nd(g);
        std::vector<uint8_t> P;
        if (fmt == "bf16") P.resize(bf16_bytes(N, K)), pack_bf16(W.data(), N, K, K, reinterpret_cast<uint16_t*>(P.data()), 2);
        if (fmt == "q8") P.resize(q8_bytes(N, K)), quantize_q8(W.data(), N, K, K, P.data(), 2);
        if (fmt == "q4") P.resize(q4_bytes(N, K)), quantize_q4(W.data(), N, K, K, P.data(), 2);
        std::vector<int8_t> xq(size_t(M) * Kp);
        std::vector<float> xd(size_t(M) * Kp / 32);
        std::vector<int32_t> xs(size_t(M) * Kp / 32);
        Kn->quantize_acts(X.data(), K, M, K, xq.data(), xd.data(), xs.data());
        double best[3] = {1e9, 1e9, 1e9};
        for (int nth = 1; nth <= 2; nth++)
            for (int r = 0; r < 5; r++) {
                const double t = now();
#pragma omp parallel num_threads(nth)
                {
                    const int units = (N + 15) / 16, tid = omp_get_thread_num(), nt = omp_get_num_threads();
                    const int a = std::min(N, units * tid / nt * 16), b = std::min(N, units * (tid + 1) / nt * 16);
                    if (a < b) {
                        if (fmt == "f32")
                            Kn->matmul_f32(X.data(), K, M, K, W.data(), nullptr, Y.data(), N, a, b);
                        else if (fmt == "bf16")
                            Kn->matmul_bf16(X.data(), K, M, K, reinterpret_cast<const uint16_t*>(P.data()), nullptr,
                                            Y.data(), N, a, b);
                        else
                            (fmt == "q8" ? Kn->matmul_q8 : Kn->matmul_q4)(X.data(), K, xq.data(), xd.data(), xs.data(),
                                                                         M, K, P.data(), nullptr, Y.data(), N, a, b);
                    }
                }
                best[nth] = std::min(best[nth], now() - t);
            }
        const double o = 2.0 * M * K * N;
        printf("  K %4d N %4d: 1 thread %6.1f G/s (%2.0f%% of peak), 2 threads %6.1f\n", K, N, o / best[1] * 1e-9,
               100 * o / best[1] * 1e-9 / top, o / best[2] * 1e-9);
        ops += s[2] * o, t1 += s[2] * best[1], t2 += s[2] * best[2];
    }
    printf("a layer's matrices: 1 thread %.1f G/s (%.0f%% of peak), 2 threads %.1f\n", ops / t1 * 1e-9,
           100 * ops / t1 * 1e-9 / top, ops / t2 * 1e-9);
}
