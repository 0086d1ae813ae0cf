// Python bindings (module qwen2rt._core). Checks every buffer before C++ reads it, releases the GIL
// for long work, and turns C++ errors into the exceptions of qwen2rt.errors.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <limits>
#include <mutex>
#include <thread>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#endif

#include "common.h"
#include "cpu_features.h"
#include "gguf_dequant.h"
#include "kernels.h"
#include "numeric.h"
#include "quant.h"
#include "qwen2.h"
#include "sampling.h"

namespace py = pybind11;
using namespace qwen2rt;

namespace {

DType parse_dtype(const std::string& s) {
    if (s == "f32" || s == "float32") return DType::F32;
    if (s == "bf16" || s == "bfloat16") return DType::BF16;
    if (s == "f16" || s == "float16") return DType::F16;
    if (s == "q8") return DType::Q8;
    if (s == "q4") return DType::Q4;
    if (s == "q6") return DType::Q6;
    if (s == "bf16p") return DType::BF16P;
    throw InvalidArgument("unknown dtype '" + s + "' (expected f32, bf16, f16, q8, q6, q4 or bf16p)");
}

// A packed weight format's name (q8, q6, q4), for the kernel test bindings.
DType quantized_format(const std::string& fmt) {
    if (fmt == "q8") return DType::Q8;
    if (fmt == "q6") return DType::Q6;
    if (fmt == "q4") return DType::Q4;
    throw InvalidArgument("format must be q8, q6 or q4");
}

unsigned long g_main_thread = 0;

// A KeyboardInterrupt (or another error raised by a signal handler) caught while C++ was running.
struct PendingPyError {
    PyObject *type = nullptr, *value = nullptr, *tb = nullptr;
    bool set() const { return type != nullptr; }
    void restore() { PyErr_Restore(type, value, tb); type = value = tb = nullptr; }
};

// Takes the model's lock or refuses: one Model object runs one call at a time.
struct BusyGuard {
    std::unique_lock<std::mutex> lock;
    explicit BusyGuard(std::mutex& m) : lock(m, std::try_to_lock) {
        if (!lock.owns_lock())
            throw std::runtime_error(
                "this Model is already running a call in another thread; use one Model per thread or a lock");
    }
};

struct PyModel {
    std::unique_ptr<Qwen2Model> model;
    std::vector<py::object> borrowed;  // arrays whose memory the model points into
    std::mutex busy;

    PyModel(const py::dict& c, const std::string& dtype, int threads, int max_context, const std::string& kv_dtype) {
        Qwen2Config cfg;
        cfg.vocab_size = c["vocab_size"].cast<int>();
        cfg.hidden_size = c["hidden_size"].cast<int>();
        cfg.intermediate_size = c["intermediate_size"].cast<int>();
        cfg.num_layers = c["num_hidden_layers"].cast<int>();
        cfg.num_heads = c["num_attention_heads"].cast<int>();
        cfg.num_kv_heads = c["num_key_value_heads"].cast<int>();
        cfg.head_dim = c["head_dim"].cast<int>();
        cfg.rms_norm_eps = c["rms_norm_eps"].cast<float>();
        cfg.rope_theta = c["rope_theta"].cast<double>();
        cfg.tie_word_embeddings = c["tie_word_embeddings"].cast<bool>();
        const DType dt = parse_dtype(dtype), kv = parse_dtype(kv_dtype);
        py::gil_scoped_release nogil;
        model = std::make_unique<Qwen2Model>(cfg, dt, threads, max_context, kv);
    }

    bool set_tensor(const std::string& name, py::buffer arr, const std::string& src_dtype,
                    const std::vector<int64_t>& shape, bool may_borrow, py::object dtype) {
        BusyGuard g(busy);
        py::buffer_info info = arr.request();
        if (info.ndim > 0) {  // C-contiguous only: C++ reads the bytes in order
            py::ssize_t expect = info.itemsize;
            for (py::ssize_t d = info.ndim - 1; d >= 0; d--) {
                if (info.shape[d] > 1 && info.strides[d] != expect)
                    throw InvalidArgument("tensor '" + name + "' is not C-contiguous");
                expect *= info.shape[d];
            }
        }
        const size_t nbytes = size_t(info.size) * size_t(info.itemsize);
        // "gguf:N": bytes of GGUF blocks of ggml type N, made float32 in C++ a chunk of rows at a time
        int gguf_type = -1;
        if (src_dtype.rfind("gguf:", 0) == 0) {
            try {
                size_t used = 0;
                gguf_type = std::stoi(src_dtype.substr(5), &used);
                if (used != src_dtype.size() - 5 || gguf_type < 0) throw std::invalid_argument("");
            } catch (const std::exception&) {
                throw InvalidArgument("src_dtype '" + src_dtype + "' is not gguf:<ggml type id>");
            }
        }
        const DType src = gguf_type >= 0 ? DType::F32 : parse_dtype(src_dtype);
        const DType target = dtype.is_none() ? model->dtype() : parse_dtype(dtype.cast<std::string>());
        if (target == DType::F16) throw InvalidArgument("matrices are held as f32, bf16, q8 or q4");
        bool kept;
        {
            py::gil_scoped_release nogil;
            kept = model->set_tensor(name, info.ptr, src, shape, nbytes, may_borrow, target, gguf_type);
        }
        if (kept) borrowed.push_back(arr);
        return kept;
    }

    void check_seq(int seq) const {
        if (seq < 0 || seq >= model->sequences()) throw InvalidArgument("no sequence " + std::to_string(seq));
    }

    using IdArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

    // Runs `pass(poll)` without the GIL. Ctrl-C: during a multi-token pass on the main thread, look
    // for a pending signal between layers (a short GIL acquisition). A single decode step is short;
    // the caller's loop sees the signal.
    template <class Pass>
    static void run_interruptible(bool long_pass, Pass&& pass) {
        PendingPyError pending;
        std::function<bool()> poll;
        if (long_pass && PyThread_get_thread_ident() == g_main_thread) {
            poll = [&pending]() noexcept {
                py::gil_scoped_acquire gil;
                if (PyErr_CheckSignals() == 0) return false;
                PyErr_Fetch(&pending.type, &pending.value, &pending.tb);
                return true;
            };
        }
        try {
            py::gil_scoped_release nogil;
            pass(poll);
        } catch (const Interrupted&) {
            if (pending.set()) {
                pending.restore();
                throw py::error_already_set();
            }
            PyErr_SetNone(PyExc_KeyboardInterrupt);
            throw py::error_already_set();
        }
    }

    py::array_t<float> forward(IdArray tokens, int start_pos, bool all_logits, int seq) {
        BusyGuard g(busy);
        if (tokens.ndim() != 1) throw InvalidArgument("tokens must be a 1-D sequence of ids");
        const int n = int(tokens.shape(0));
        if (tokens.shape(0) > (1 << 24)) throw ContextOverflow("too many tokens");
        const int V = model->config().vocab_size;
        py::array_t<float> out = all_logits ? py::array_t<float>({py::ssize_t(n), py::ssize_t(V)})
                                            : py::array_t<float>({py::ssize_t(V)});
        float* outp = out.mutable_data();
        const int32_t* tp = tokens.data();
        run_interruptible(n > 1, [&](const std::function<bool()>& poll) {
            model->forward(tp, n, start_pos, all_logits, outp, poll, seq);
        });
        return out;
    }

    py::array_t<float> decode_batch(IdArray tokens, IdArray seqs) {
        BusyGuard g(busy);
        if (tokens.ndim() != 1 || seqs.ndim() != 1 || tokens.shape(0) != seqs.shape(0))
            throw InvalidArgument("decode_batch: tokens [n] and seqs [n]");
        const int n = int(std::min<py::ssize_t>(tokens.shape(0), 1 << 20));
        py::array_t<float> out({py::ssize_t(n), py::ssize_t(model->config().vocab_size)});
        float* outp = out.mutable_data();
        const int32_t *tp = tokens.data(), *sp = seqs.data();
        run_interruptible(n > 1, [&](const std::function<bool()>& poll) { model->decode_batch(tp, sp, n, outp, poll); });
        return out;
    }
};

// Rows [n0, n1) of N (n1 < 0: to N), by the kernels' rule: a thread's rows start on a multiple of 16.
void check_row_range(const std::string& what, int N, int n0, int& n1) {
    if (n1 < 0) n1 = N;
    if (n0 < 0 || n0 % 16 || n1 > N || n0 > n1)
        throw InvalidArgument(what + ": rows [n0, n1) must lie in [0, N) with n0 a multiple of 16");
}

// Share i of `shares` of n columns, cut at multiples of 32 (whole blocks), as the model's threads
// split an input's columns: [a, b), empty where there is none.
void column_share(int n, int shares, int i, int& a, int& b) {
    const int units = (n + 31) / 32;
    a = std::min(n, units * i / shares * 32);
    b = std::min(n, units * (i + 1) / shares * 32);
}

// The optional bias argument of a product with N rows, checked: empty where it is None.
std::vector<float> optional_bias(const std::string& what, py::object bias, int N) {
    std::vector<float> b;
    if (bias.is_none()) return b;
    auto ba = bias.cast<py::array_t<float, py::array::c_style | py::array::forcecast>>();
    if (ba.ndim() != 1 || ba.shape(0) != N) throw InvalidArgument(what + ": bias [N]");
    b.assign(ba.data(), ba.data() + N);
    return b;
}

// A [N, K] matrix of bf16 bit patterns, row-major, packed as the model packs its bf16 weights.
std::vector<uint16_t> packed_bf16(py::array W) {
    auto w = W.cast<py::array_t<uint16_t, py::array::c_style | py::array::forcecast>>();
    const int N = int(w.shape(0)), Kd = int(w.shape(1));
    std::vector<float> wf(size_t(N) * size_t(Kd));
    for (size_t i = 0; i < wf.size(); i++) wf[i] = bf16_to_f32(w.data()[i]);
    std::vector<uint16_t> packed(bf16_bytes(N, Kd) / 2);
    pack_bf16(wf.data(), N, Kd, size_t(Kd), packed.data(), 1);
    return packed;
}

py::array_t<float> kernel_matmul(const std::string& isa, py::array_t<float, py::array::c_style | py::array::forcecast> X,
                                 py::array W, py::object bias, int n0, int n1) {
    const Kernels* K = find_kernels(isa);
    if (!K) throw InvalidArgument("ISA '" + isa + "' is not available");
    if (X.ndim() != 2 || W.ndim() != 2 || X.shape(1) != W.shape(1)) throw InvalidArgument("matmul: X [M,K], W [N,K]");
    const int M = int(X.shape(0)), Kd = int(X.shape(1)), N = int(W.shape(0));
    check_row_range("matmul", N, n0, n1);
    const std::vector<float> b = optional_bias("matmul", bias, N);
    py::array_t<float> Y({py::ssize_t(M), py::ssize_t(N)});
    std::fill(Y.mutable_data(), Y.mutable_data() + size_t(M) * size_t(N), 0.f);  // the rows outside [n0, n1)
    if (py::isinstance<py::array_t<float>>(W)) {
        auto w = W.cast<py::array_t<float, py::array::c_style | py::array::forcecast>>();
        K->matmul_f32(X.data(), Kd, M, Kd, w.data(), b.empty() ? nullptr : b.data(), Y.mutable_data(), N, n0, n1);
    } else if (py::isinstance<py::array_t<uint16_t>>(W)) {  // bf16 bit patterns, row-major: packed first
        const std::vector<uint16_t> packed = packed_bf16(W);
        K->matmul_bf16(X.data(), Kd, M, Kd, packed.data(), b.empty() ? nullptr : b.data(), Y.mutable_data(), N, n0, n1);
    } else {
        throw InvalidArgument("matmul: W must be float32 or uint16 (bf16 bits)");
    }
    return Y;
}

using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;

const Kernels& kernels_or_throw(const std::string& isa) {
    const Kernels* K = find_kernels(isa);
    if (!K) throw InvalidArgument("ISA '" + isa + "' is not available");
    return *K;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "qwen2rt C++ core";
    g_main_thread = PyThread_get_thread_ident();
    m.attr("CHUNK_TOKENS") = Qwen2Model::kChunk;  // prompt rows a forward pass takes at once

    py::object errors = py::module_::import("qwen2rt.errors");
    static py::object invalid = errors.attr("InvalidInputError");
    static py::object overflow = errors.attr("ContextLengthError");
    static py::object oom = errors.attr("OutOfMemoryError");
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const ContextOverflow& e) {
            PyErr_SetString(overflow.ptr(), e.what());
        } catch (const InvalidArgument& e) {
            PyErr_SetString(invalid.ptr(), e.what());
        } catch (const std::bad_alloc& e) {
            PyErr_SetString(oom.ptr(), e.what());
        }
    });

    m.def("available_isas", &available_isas, "Instruction-set paths this build and CPU can run, worst to best.");
    m.def("emulated_isas", &emulated_isas,
          "Paths that emulate instructions this CPU lacks (amx-emulated): tests and QWEN2RT_ISA may name them.");
    m.def("active_isa", []() { return std::string(active_kernels().isa); });
    m.def("set_isa", &set_active_isa, py::arg("isa"), "Force a kernel path: generic, avx2, avx512, amx (or amx-emulated, for tests).");
    m.def("openmp_max_threads", []() {
#ifdef _OPENMP
        return omp_get_max_threads();
#else
        return 1;
#endif
    });
    m.def("cpu_flags", []() {
        const CpuFeatures& f = cpu_features();
        py::dict d;
        d["avx2"] = f.avx2 && f.os_avx;
        d["fma"] = f.fma;
        d["f16c"] = f.f16c;
        d["avx512f"] = f.avx512f && f.os_avx512;
        d["avx512bw"] = f.avx512bw && f.os_avx512;
        d["avx512vnni"] = f.avx512vnni && f.os_avx512;
        d["avx512bf16"] = f.avx512bf16 && f.os_avx512;
        d["avx_vnni"] = f.avx_vnni && f.os_avx;
        d["amx_int8"] = f.amx_int8 && f.os_amx;
        d["amx_bf16"] = f.amx_bf16 && f.os_amx;
        d["fast_bf16_dot"] = bf16_dot_beats_fma();  // a bf16 KV cache is the fast one
        return d;
    });
    m.def(
        "multiply_add_peak",
        [](const std::string& op, int threads) {
            // Ops a second (a multiply or an add each) of `threads` cores issuing, all at once, the
            // instruction a prefill of op's weights multiplies with (kernels.h MultiplyAdd): the
            // benchmark's prefill roofline. The best of 3 runs, the first of which also raises the clock.
#if defined(QWEN2RT_X86)
            using avx512::MultiplyAdd;
            if (!find_kernels("avx512"))
                throw InvalidArgument("multiply_add_peak needs the avx512 kernels (AVX-512 with VNNI and BF16)");
            const MultiplyAdd o = op == "f32"    ? MultiplyAdd::F32
                                  : op == "bf16" ? MultiplyAdd::Bf16
                                  : op == "int8" ? MultiplyAdd::Int8
                                                 : throw InvalidArgument("op must be f32, bf16 or int8");
            if (threads < 1) throw InvalidArgument("threads must be positive");
            constexpr long kIters = 20000000;  // 240 M instructions, ~0.07 s a core at one a cycle
            const double ops = double(kIters) * 12 * avx512::multiply_adds_per_instruction(o) * 2;
            double best = 0;
            py::gil_scoped_release nogil;
            for (int r = 0; r < 3; r++) {
                double total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
                {
                    const auto t0 = std::chrono::steady_clock::now();
                    avx512::multiply_add_loop(o, kIters);
                    total += ops / std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
                }
                best = std::max(best, total);
            }
            return best;
#else
            (void)op, (void)threads;
            throw InvalidArgument("multiply_add_peak needs the avx512 kernels (AVX-512 with VNNI and BF16)");
#endif
        },
        py::arg("op"), py::arg("threads") = 1);
    m.def(
        "read_bandwidth",
        [](size_t nbytes, int threads, int reps) {
            // Bytes per second of summing a buffer larger than the caches (the decode roofline).
            AlignedBuffer buf(nbytes, /*huge_pages=*/true);  // as the weights are held
            const size_t n = nbytes / 8;
            uint64_t* p = buf.as<uint64_t>();
            double best = 0;
            py::gil_scoped_release nogil;
#pragma omp parallel for num_threads(threads)
            for (int64_t i = 0; i < int64_t(n); i++) p[i] = uint64_t(i);
            // Two ways of reading, the best of both: each thread's share as one sequential stream, and
            // as 8 interleaved streams, the way a decode matmul reads 8 weight rows at once. Which is
            // faster depends on the machine (one stream left bandwidth unused on the first Zen 3;
            // on a Zen 4 one stream read as fast or faster).
            for (int r = 0; r < reps; r++) {
                for (int streams : {1, 8}) {
                    uint64_t total = 0;
                    const size_t len = n / size_t(streams);
                    const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel for num_threads(threads) reduction(+ : total) schedule(static)
                    for (int64_t i = 0; i < int64_t(len - len % 64); i += 64)
                        for (int s = 0; s < streams; s++) {
                            const uint64_t* q = p + size_t(s) * len + i;
                            uint64_t x = 0;
                            for (int j = 0; j < 64; j++) x ^= q[j];  // vectorises: 512 bytes a stream
                            total += x;
                        }
                    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
                    if (total == 42) best = -1;  // keep the sum alive
                    best = std::max(best, double(len - len % 64) * 8 * streams / dt);
                }
            }
            return best;
        },
        py::arg("nbytes") = size_t(1) << 30, py::arg("threads") = 1, py::arg("reps") = 5);
    m.def("release_free_memory", [] {
        // Parsing a tokenizer or a checkpoint's JSON leaves ~100 MB of freed heap scattered below live
        // blocks; glibc keeps it mapped (it only trims the top of the heap) until asked. Elsewhere a no-op.
#if defined(__GLIBC__)
        return malloc_trim(0) != 0;
#else
        return false;
#endif
    });
    m.def(
        "kv_cache_bytes",
        [](int layers, int kv_heads, int head_dim, int max_context, const std::string& kv_dtype) {
            return KVCache::bytes_needed(layers, kv_heads, head_dim, max_context, parse_dtype(kv_dtype));
        },
        py::arg("layers"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("max_context"), py::arg("kv_dtype"));

    py::class_<PyModel>(m, "Qwen2Model")
        .def(py::init<const py::dict&, const std::string&, int, int, const std::string&>(), py::arg("config"),
             py::arg("dtype"), py::arg("threads"), py::arg("max_context"), py::arg("kv_dtype"))
        .def("set_tensor", &PyModel::set_tensor, py::arg("name"), py::arg("array"), py::arg("src_dtype"),
             py::arg("shape"), py::arg("may_borrow") = true, py::arg("dtype") = py::none(),
             "Hand over a tensor; matrices are stored as `dtype` (default: the model's)")
        .def("missing_tensors", [](PyModel& s) { return s.model->missing_tensors(); })
        .def(
            "read_embedding_from_file",
            [](PyModel& s, int fd, uint64_t offset) { s.model->read_embedding_from_file(fd, offset); },
            py::arg("fd"), py::arg("offset"),
            "Read the borrowed embedding's rows from this file descriptor (now the model's), where the table "
            "starts at offset, instead of through the mapping")
        .def(
            "tensor_bytes",
            [](py::object self, const std::string& name) -> py::object {
                PyModel& s = self.cast<PyModel&>();
                const Qwen2Model::TensorView v = s.model->tensor_view(name);
                if (!v.data) return py::none();
                // a read-only view of the model's own memory; it keeps the model alive
                py::array_t<uint8_t> a({py::ssize_t(v.nbytes)}, {py::ssize_t(1)},
                                       static_cast<const uint8_t*>(v.data), self);
                py::detail::array_proxy(a.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
                const std::string dtype =
                    v.gguf_type >= 0 ? "gguf:" + std::to_string(v.gguf_type) : std::string(dtype_name(v.dtype));
                return py::make_tuple(dtype, a, v.rows, v.cols);
            },
            py::arg("name"), "(dtype, bytes, rows, cols) of a stored tensor, or None; dtype \"gguf:N\" for GGUF blocks")
        .def("forward", &PyModel::forward, py::arg("tokens"), py::arg("start_pos"), py::arg("all_logits") = false,
             py::arg("seq") = 0)
        .def("decode_batch", &PyModel::decode_batch, py::arg("tokens"), py::arg("seqs"),
             "One decode step for several sequences: logits [n, vocab]")
        .def(
            "set_sequences",
            [](PyModel& s, int n) {
                BusyGuard g(s.busy);
                s.model->set_sequences(n);
            },
            py::arg("n"))
        .def_property_readonly("sequences", [](PyModel& s) { return s.model->sequences(); })
        .def(
            "reset",
            [](PyModel& s, int seq) {
                BusyGuard g(s.busy);
                s.check_seq(seq);
                s.model->reset(seq);
            },
            py::arg("seq") = 0)
        .def_property_readonly("cache_len", [](PyModel& s) { return s.model->cache_len(); })
        .def(
            "seq_len",
            [](PyModel& s, int seq) {
                s.check_seq(seq);
                return s.model->cache_len(seq);
            },
            py::arg("seq"))
        .def_property_readonly("cached_tokens",
                               [](PyModel& s) {
                                   const std::vector<int32_t>& t = s.model->cached_tokens();
                                   return py::array_t<int32_t>(py::ssize_t(t.size()), t.data());
                               })
        .def(
            "seq_tokens",
            [](PyModel& s, int seq) {
                s.check_seq(seq);
                const std::vector<int32_t>& t = s.model->cached_tokens(seq);
                return py::array_t<int32_t>(py::ssize_t(t.size()), t.data());
            },
            py::arg("seq"))
        .def_property_readonly("max_context", [](PyModel& s) { return s.model->max_context(); })
        .def_property_readonly("threads", [](PyModel& s) { return s.model->threads(); })
        .def_property_readonly("dtype", [](PyModel& s) { return std::string(dtype_name(s.model->dtype())); })
        .def_property_readonly("weight_bytes", [](PyModel& s) { return s.model->weight_bytes(); })
        .def_property_readonly("kv_cache_bytes", [](PyModel& s) { return s.model->kv_cache_bytes(); })
        .def_property_readonly("kv_dtype", [](PyModel& s) { return std::string(dtype_name(s.model->kv_dtype())); });

    py::class_<Sampler>(m, "Sampler")
        .def(py::init<>())
        .def(
            "sample",
            [](Sampler& s, F32Array logits, float temperature, int top_k, float top_p, float min_p,
               float repetition_penalty, py::array_t<int32_t, py::array::c_style | py::array::forcecast> history,
               double u) {
                if (logits.ndim() != 1) throw InvalidArgument("logits must be 1-D");
                if (history.ndim() != 1) throw InvalidArgument("history must be 1-D");
                SamplingParams p;
                p.temperature = temperature;
                p.top_k = top_k;
                p.top_p = top_p;
                p.min_p = min_p;
                p.repetition_penalty = repetition_penalty;
                py::gil_scoped_release nogil;
                return s.sample(logits.data(), int(logits.shape(0)), p, history.data(), int(history.shape(0)), u);
            },
            py::arg("logits"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("min_p"),
            py::arg("repetition_penalty"), py::arg("history"), py::arg("u"));

    m.def(
        "dequantize_gguf",
        [](int ggml_type, py::array_t<uint8_t, py::array::c_style> raw, int64_t n_elements, int threads) {
            if (raw.ndim() != 1) throw InvalidArgument("dequantize_gguf: raw must be a 1-D uint8 array");
            const size_t need = gguf_dequant_src_bytes(ggml_type, n_elements);  // checks type and count
            if (size_t(raw.shape(0)) != need)
                throw InvalidArgument("dequantize_gguf: expected " + std::to_string(need) + " bytes, got " +
                                      std::to_string(raw.shape(0)));
            py::array_t<float> out(static_cast<py::ssize_t>(n_elements));
            const uint8_t* src = raw.data();
            float* dst = out.mutable_data();
            {
                py::gil_scoped_release nogil;
                dequantize_gguf(ggml_type, src, size_t(raw.shape(0)), dst, n_elements, threads);
            }
            return out;
        },
        py::arg("ggml_type"), py::arg("raw"), py::arg("n_elements"), py::arg("threads") = 1,
        "Dequantize GGUF tensor bytes (F16, BF16, Q4_0..Q8_0, Q2_K..Q6_K) to a new float32 1-D array.");

    // Single kernels, for the tests against numpy.
    py::module_ k = m.def_submodule("kernels", "Individual kernels of one ISA, for testing");
    k.def("matmul", &kernel_matmul, py::arg("isa"), py::arg("x"), py::arg("w"), py::arg("bias") = py::none(),
          py::arg("n0") = 0, py::arg("n1") = -1,
          "Y[:, n0:n1] = X @ W[n0:n1].T (+ bias), the other columns 0; W float32 or uint16 holding bf16 bits");
    k.def(
        "quantize_weights",
        [](const std::string& fmt, F32Array W, int threads) {
            if (W.ndim() != 2) throw InvalidArgument("quantize_weights: W [N, K]");
            const int N = int(W.shape(0)), K = int(W.shape(1));
            const DType t = quantized_format(fmt);
            py::array_t<uint8_t> out(py::ssize_t(q_bytes(t, N, K)));
            py::gil_scoped_release nogil;
            quantize_q(t, W.data(), N, K, size_t(K), out.mutable_data(), threads);
            return out;
        },
        py::arg("fmt"), py::arg("w"), py::arg("threads") = 1, "Pack a float32 [N, K] matrix as q8, q6 or q4 (quant.h)");
    k.def(
        "dequantize_weights",
        [](const std::string& fmt, py::array_t<uint8_t, py::array::c_style> packed, int N, int K) {
            const DType t = quantized_format(fmt);
            if (N < 1 || K < 1 || size_t(packed.size()) != q_bytes(t, N, K))
                throw InvalidArgument("dequantize_weights: packed size does not match N, K");
            py::array_t<float> out({N, K});
            for (int r = 0; r < N; r++) dequantize_row_q(t, packed.data(), K, r, out.mutable_data() + size_t(r) * K);
            return out;
        },
        py::arg("fmt"), py::arg("packed"), py::arg("n"), py::arg("k"));
    k.def("quantize_acts", [](const std::string& isa, F32Array X) {
        const Kernels& K = kernels_or_throw(isa);
        if (X.ndim() != 2) throw InvalidArgument("quantize_acts: X [M, K]");
        const int M = int(X.shape(0)), Kd = int(X.shape(1)), B = q_blocks(Kd);
        py::array_t<int8_t> q({M, B * kQBlock});
        py::array_t<float> d({M, B});
        py::array_t<int32_t> s({M, B});
        K.quantize_acts(X.data(), Kd, M, Kd, q.mutable_data(), d.mutable_data(), s.mutable_data());
        return py::make_tuple(q, d, s);
    });
    k.def(
        "matmul_q",
        [](const std::string& isa, const std::string& fmt, F32Array X, py::array_t<uint8_t, py::array::c_style> packed,
           int N, py::object bias) {
            // X is quantized by the same path's quantize_acts, as the model does
            const Kernels& K = kernels_or_throw(isa);
            const DType t = quantized_format(fmt);
            if (X.ndim() != 2) throw InvalidArgument("matmul_q: X [M, K]");
            const int M = int(X.shape(0)), Kd = int(X.shape(1)), B = q_blocks(Kd);
            if (size_t(packed.size()) != q_bytes(t, N, Kd))
                throw InvalidArgument("matmul_q: shapes do not match");
            const std::vector<float> b = optional_bias("matmul_q", bias, N);
            std::vector<int8_t> q(size_t(M) * B * kQBlock);
            std::vector<float> d(size_t(M) * B);
            std::vector<int32_t> s(size_t(M) * B);
            K.quantize_acts(X.data(), Kd, M, Kd, q.data(), d.data(), s.data());
            py::array_t<float> Y({M, N});
            const auto matmul = t == DType::Q8 ? K.matmul_q8 : t == DType::Q6 ? K.matmul_q6 : K.matmul_q4;
            matmul(X.data(), Kd, q.data(), d.data(), s.data(), M, Kd, packed.data(), b.empty() ? nullptr : b.data(),
                   Y.mutable_data(), N, 0, N);
            return Y;
        },
        py::arg("isa"), py::arg("fmt"), py::arg("x"), py::arg("packed"), py::arg("n"), py::arg("bias") = py::none());
    k.def("rmsnorm", [](const std::string& isa, F32Array x, F32Array w, float eps) {
        const Kernels& K = kernels_or_throw(isa);
        if (x.ndim() != 2 || w.ndim() != 1 || w.shape(0) != x.shape(1)) throw InvalidArgument("rmsnorm: x [M,n], w [n]");
        py::array_t<float> y({x.shape(0), x.shape(1)});
        for (py::ssize_t r = 0; r < x.shape(0); r++)
            K.rmsnorm(x.data() + r * x.shape(1), w.data(), eps, int(x.shape(1)), y.mutable_data() + r * x.shape(1));
        return y;
    });
    k.def("rope", [](const std::string& isa, F32Array x, F32Array cos, F32Array sin) {
        const Kernels& K = kernels_or_throw(isa);
        if (x.ndim() != 2 || cos.ndim() != 2 || sin.ndim() != 2 || x.shape(1) % 2 || cos.shape(1) * 2 != x.shape(1) ||
            cos.shape(0) != x.shape(0) || sin.shape(0) != x.shape(0) || sin.shape(1) != cos.shape(1))
            throw InvalidArgument("rope: x [M,2h], cos/sin [M,h]");
        py::array_t<float> y({x.shape(0), x.shape(1)});
        std::memcpy(y.mutable_data(), x.data(), size_t(x.size()) * 4);
        const int h = int(cos.shape(1));
        for (py::ssize_t r = 0; r < x.shape(0); r++)
            K.rope(y.mutable_data() + r * 2 * h, cos.data() + r * h, sin.data() + r * h, h);
        return y;
    });
    k.def("silu_mul", [](const std::string& isa, F32Array g, F32Array u) {
        const Kernels& K = kernels_or_throw(isa);
        if (g.ndim() != 1 || u.ndim() != 1 || g.shape(0) != u.shape(0)) throw InvalidArgument("silu_mul: g [n], u [n]");
        py::array_t<float> y(g.shape(0));
        K.silu_mul(g.data(), u.data(), int(g.shape(0)), y.mutable_data());
        return y;
    });
    k.def(
        "matmul_bf16_swiglu",
        [](const std::string& isa, F32Array X, py::array_t<uint16_t> gate, py::array_t<uint16_t> up, int n0, int n1) {
            const Kernels& K = kernels_or_throw(isa);
            if (!K.matmul_bf16_swiglu) throw InvalidArgument("ISA '" + isa + "' has no fused bf16 swiglu kernel");
            if (X.ndim() != 2 || gate.ndim() != 2 || up.ndim() != 2 || gate.shape(1) != X.shape(1) ||
                up.shape(0) != gate.shape(0) || up.shape(1) != X.shape(1))
                throw InvalidArgument("matmul_bf16_swiglu: X [M,K], gate and up [N,K]");
            const int M = int(X.shape(0)), Kd = int(X.shape(1)), N = int(gate.shape(0));
            check_row_range("matmul_bf16_swiglu", N, n0, n1);
            const std::vector<uint16_t> g = packed_bf16(gate), u = packed_bf16(up);
            py::array_t<float> Y({py::ssize_t(M), py::ssize_t(N)});
            std::fill(Y.mutable_data(), Y.mutable_data() + size_t(M) * size_t(N), 0.f);
            K.matmul_bf16_swiglu(X.data(), Kd, M, Kd, g.data(), u.data(), Y.mutable_data(), N, n0, n1, nullptr);
            return Y;
        },
        py::arg("isa"), py::arg("X"), py::arg("gate"), py::arg("up"), py::arg("n0") = 0, py::arg("n1") = -1);
    k.def(
        "bf16_mlp_on_panels",
        [](const std::string& isa, F32Array X, py::array_t<uint16_t> gate, py::array_t<uint16_t> up,
           py::array_t<uint16_t> down, int shares, py::object y0) {
            // The MLP of a bf16 prompt as the model runs it on threads: each of `shares` column ranges
            // of the hidden rows (multiples of 32) goes from matmul_bf16_swiglu straight into token
            // panels, and down_proj reads the panels.
            const Kernels& K = kernels_or_throw(isa);
            if (!K.matmul_bf16_swiglu || !K.matmul_bf16_panels)
                throw InvalidArgument("ISA '" + isa + "' has no bf16 token panels");
            if (X.ndim() != 2 || gate.ndim() != 2 || up.ndim() != 2 || down.ndim() != 2 || gate.shape(1) != X.shape(1) ||
                up.shape(0) != gate.shape(0) || up.shape(1) != X.shape(1) || down.shape(1) != gate.shape(0) || shares < 1)
                throw InvalidArgument("bf16_mlp_on_panels: X [M,K], gate and up [I,K], down [N,I], shares >= 1");
            const int M = int(X.shape(0)), Kd = int(X.shape(1)), I = int(gate.shape(0)), N = int(down.shape(0));
            const std::vector<uint16_t> g = packed_bf16(gate), u = packed_bf16(up), d = packed_bf16(down);
            std::vector<uint32_t> h(bf16_panels_size(M, I), 0xdeadbeef);  // every unit must be written
            for (int i = 0; i < shares; i++) {
                int a, b;
                column_share(I, shares, i, a, b);
                if (a < b) K.matmul_bf16_swiglu(X.data(), Kd, M, Kd, g.data(), u.data(), nullptr, I, a, b, h.data());
            }
            py::array_t<float> Y({py::ssize_t(M), py::ssize_t(N)});
            const bool add = !y0.is_none();  // down_proj's product added into y0, as into the residual stream
            if (add) {
                auto y = y0.cast<F32Array>();
                if (y.ndim() != 2 || y.shape(0) != M || y.shape(1) != N) throw InvalidArgument("bf16_mlp_on_panels: y0 [M,N]");
                std::memcpy(Y.mutable_data(), y.data(), size_t(M) * size_t(N) * 4);
            }
            K.matmul_bf16_panels(h.data(), M, I, d.data(), nullptr, Y.mutable_data(), N, 0, N, add);
            return Y;
        },
        py::arg("isa"), py::arg("X"), py::arg("gate"), py::arg("up"), py::arg("down"), py::arg("shares") = 2,
        py::arg("y0") = py::none());
    k.def(
        "matmul_bf16_add",
        [](const std::string& isa, F32Array X, py::array_t<uint16_t> W, F32Array Y0, int n0, int n1) {
            // Y0 with X W^T added into its columns [n0, n1), as o_proj adds into the residual stream
            const Kernels& K = kernels_or_throw(isa);
            if (!K.matmul_bf16_add) throw InvalidArgument("ISA '" + isa + "' has no bf16 product into Y");
            if (X.ndim() != 2 || W.ndim() != 2 || W.shape(1) != X.shape(1) || Y0.ndim() != 2 ||
                Y0.shape(0) != X.shape(0) || Y0.shape(1) != W.shape(0))
                throw InvalidArgument("matmul_bf16_add: X [M,K], W [N,K], Y0 [M,N]");
            const int M = int(X.shape(0)), Kd = int(X.shape(1)), N = int(W.shape(0));
            check_row_range("matmul_bf16_add", N, n0, n1);
            const std::vector<uint16_t> w = packed_bf16(W);
            py::array_t<float> Y({py::ssize_t(M), py::ssize_t(N)});
            std::memcpy(Y.mutable_data(), Y0.data(), size_t(M) * size_t(N) * 4);
            K.matmul_bf16_add(X.data(), Kd, M, Kd, w.data(), Y.mutable_data(), N, n0, n1);
            return Y;
        },
        py::arg("isa"), py::arg("X"), py::arg("W"), py::arg("Y0"), py::arg("n0") = 0, py::arg("n1") = -1);
    // Token tiles (a tile backend's prompt path, kernels.h): weights as matmul_on_tiles takes them
    struct TileWeights {
        DType dtype;
        std::vector<uint16_t> bf16;
        std::vector<uint8_t> q;
        const void* data() const { return dtype == DType::BF16 ? static_cast<const void*>(bf16.data()) : q.data(); }
    };
    auto tile_weights = [](const std::string& fmt, py::array W, int N, int Kd) {
        // fmt bf16: W uint16 [N, K] of bf16 bits; q8 / q6 / q4: W the bytes of quantize_weights
        TileWeights t{parse_dtype(fmt), {}, {}};
        if (t.dtype == DType::BF16) {
            if (!py::isinstance<py::array_t<uint16_t>>(W) || W.ndim() != 2 || W.shape(0) != N || W.shape(1) != Kd)
                throw InvalidArgument("tiles: bf16 W is uint16 [N, K]");
            t.bf16 = packed_bf16(W);
        } else if (is_quantized(t.dtype)) {
            auto b = W.cast<py::array_t<uint8_t, py::array::c_style>>();
            if (size_t(b.size()) != q_bytes(t.dtype, N, Kd))
                throw InvalidArgument("tiles: packed size does not match N, K");
            t.q.assign(b.data(), b.data() + b.size());
        } else {
            throw InvalidArgument("tiles: fmt is bf16, q8, q6 or q4");
        }
        return t;
    };
    auto nan_tiles = [](int M, int Kd) {  // 64-byte aligned, as the model's (kernels.h)
        AlignedBuffer b(tile_tokens_size(M, Kd) * 2);
        std::fill(b.as<uint16_t>(), b.as<uint16_t>() + tile_tokens_size(M, Kd), uint16_t(0x7fc0));
        return b;
    };
    // X's rows as token tiles, each row written in `shares` column ranges (multiples of 32), as the
    // threads that write an input's columns write them; rows past M hold NaN, which must not show.
    auto to_tiles = [=](const Kernels& K, const F32Array& X, int shares) {
        const int M = int(X.shape(0)), Kd = int(X.shape(1));
        AlignedBuffer tiles = nan_tiles(M, Kd);
        for (int t = 0; t < M; t++)
            for (int i = 0; i < shares; i++) {
                int a, b;
                column_share(Kd, shares, i, a, b);
                if (a < b) K.tile_tokens(X.data() + size_t(t) * Kd, Kd, t, a, b, tiles.as<uint16_t>());
            }
        return tiles;
    };
    auto tile_kernels = [](const std::string& isa) -> const Kernels& {
        const Kernels& K = kernels_or_throw(isa);
        if (!K.matmul_tiles) throw InvalidArgument("ISA '" + isa + "' has no token tiles");
        return K;
    };
    k.def(
        "matmul_on_tiles",
        [=](const std::string& isa, const std::string& fmt, F32Array X, py::array W, int N, py::object bias, int n0,
            int n1, py::object y0, int shares) {
            // Y[:, n0:n1] = X W[n0:n1]^T (+ bias), or with y0, y0 with that added; the other columns 0 / y0
            const Kernels& K = tile_kernels(isa);
            if (X.ndim() != 2 || X.shape(0) < kMinTileTokens || shares < 1)
                throw InvalidArgument("matmul_on_tiles: X [M >= 16, K], shares >= 1");
            const int M = int(X.shape(0)), Kd = int(X.shape(1));
            check_row_range("matmul_on_tiles", N, n0, n1);
            const TileWeights w = tile_weights(fmt, W, N, Kd);
            const std::vector<float> b = optional_bias("matmul_on_tiles", bias, N);
            py::array_t<float> Y({M, N});
            std::fill(Y.mutable_data(), Y.mutable_data() + size_t(M) * N, 0.f);
            const bool add = !y0.is_none();
            if (add) {
                auto y = y0.cast<F32Array>();
                if (y.ndim() != 2 || y.shape(0) != M || y.shape(1) != N) throw InvalidArgument("matmul_on_tiles: y0 [M,N]");
                std::memcpy(Y.mutable_data(), y.data(), size_t(M) * N * 4);
            }
            const AlignedBuffer tiles = to_tiles(K, X, shares);
            K.matmul_tiles(tiles.as<uint16_t>(), M, Kd, int(w.dtype), w.data(), b.empty() ? nullptr : b.data(), Y.mutable_data(),
                           N, n0, n1, add);
            return Y;
        },
        py::arg("isa"), py::arg("fmt"), py::arg("x"), py::arg("w"), py::arg("n"), py::arg("bias") = py::none(),
        py::arg("n0") = 0, py::arg("n1") = -1, py::arg("y0") = py::none(), py::arg("shares") = 1);
    k.def(
        "mlp_on_tiles",
        [=](const std::string& isa, const std::string& fmt, F32Array X, py::array gate, py::array up, py::array down,
            int I, int N, F32Array y0, int shares) {
            // y0 + down(silu(gate(X)) * up(X)) as a prompt's MLP runs on token tiles: the hidden rows'
            // columns in `shares` ranges (multiples of 32) from swiglu_tiles, down_proj added into y0
            const Kernels& K = tile_kernels(isa);
            if (X.ndim() != 2 || X.shape(0) < kMinTileTokens || shares < 1 || y0.ndim() != 2 ||
                y0.shape(0) != X.shape(0) || y0.shape(1) != N)
                throw InvalidArgument("mlp_on_tiles: X [M >= 16, K], y0 [M, N], shares >= 1");
            const int M = int(X.shape(0)), Kd = int(X.shape(1));
            const TileWeights g = tile_weights(fmt, gate, I, Kd), u = tile_weights(fmt, up, I, Kd), d = tile_weights(fmt, down, N, I);
            const AlignedBuffer tiles = to_tiles(K, X, 1), h = nan_tiles(M, I);
            for (int i = 0; i < shares; i++) {
                int a, b;
                column_share(I, shares, i, a, b);
                if (a < b)
                    K.swiglu_tiles(tiles.as<uint16_t>(), M, Kd, int(g.dtype), g.data(), u.data(), a, b, h.as<uint16_t>(), I);
            }
            py::array_t<float> Y({M, N});
            std::memcpy(Y.mutable_data(), y0.data(), size_t(M) * N * 4);
            K.matmul_tiles(h.as<uint16_t>(), M, I, int(d.dtype), d.data(), nullptr, Y.mutable_data(), N, 0, N, true);
            return Y;
        },
        py::arg("isa"), py::arg("fmt"), py::arg("x"), py::arg("gate"), py::arg("up"), py::arg("down"), py::arg("i"),
        py::arg("n"), py::arg("y0"), py::arg("shares") = 2);
    k.def("amx_keeps_tile_config", &amx_keeps_tile_config, py::arg("emulated"),
          "A tile product leaves the thread's own tile configuration in force after it");
    k.def("has_bf16_swiglu", [](const std::string& isa) { return kernels_or_throw(isa).matmul_bf16_swiglu != nullptr; });
    k.def(
        "attention_seconds",
        [](const std::string& isa, int G, int D, int T, const std::string& kv, int caches, int threads, int reps) {
            // Seconds per decode step of `caches` (layer, KV head) attentions over T keys each, split
            // over `threads` as the model splits KV heads, the caches (kv: f32, f16 or bf16) laid out
            // as the model's and filled with values in [-1, 1]: as many caches as a model has (layers x
            // KV heads) put them in DRAM, one keeps it in cache. Best of reps.
            const Kernels& K = kernels_or_throw(isa);
            if (G < 1 || D < 1 || T < 1 || caches < 1 || threads < 1 || reps < 1 || G > 64 || D > 1024 || D % 2)
                throw InvalidArgument(
                    "attention_seconds: G, D, T, caches, threads, reps >= 1 (G <= 64, D even and <= 1024)");
            const DType dt = parse_dtype(kv);
            if (dt != DType::F32 && dt != DType::F16 && dt != DType::BF16)
                throw InvalidArgument("attention_seconds: kv is f32, f16 or bf16");
            const size_t per = checked_mul(key_positions(T), size_t(D)), esz = dtype_size(dt);
            AlignedBuffer kc(checked_mul(checked_mul(per, size_t(caches)), esz));
            AlignedBuffer vc(checked_mul(checked_mul(per, size_t(caches)), esz));
            std::vector<float> q(size_t(G) * D);
            uint32_t x = 12345;
            auto next = [&x] { return (x = x * 1664525u + 1013904223u) / 2147483648.f - 1.f; };
            for (float& v : q) v = next();
            for (size_t i = 0; i < per * caches; i++) {
                if (dt == DType::F16) kc.as<uint16_t>()[i] = f32_to_f16(next()), vc.as<uint16_t>()[i] = f32_to_f16(next());
                else if (dt == DType::BF16) kc.as<uint16_t>()[i] = f32_to_bf16(next()), vc.as<uint16_t>()[i] = f32_to_bf16(next());
                else kc.as<float>()[i] = next(), vc.as<float>()[i] = next();
            }
            std::vector<std::vector<float>> scratch(size_t(threads), std::vector<float>(attention_scratch_floats(G, T, D)));
            std::vector<std::vector<float>> out(size_t(threads), std::vector<float>(size_t(G) * D));
            double best = 1e30;
            py::gil_scoped_release nogil;
            for (int r = 0; r < reps; r++) {
                const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(threads)
                {
                    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
                    for (int c = tid; c < caches; c += nth) {
                        const size_t o = size_t(c) * per;
                        float* sc = scratch[size_t(tid)].data();
                        float* ot = out[size_t(tid)].data();
                        if (dt == DType::F16)
                            K.attention_f16(q.data(), G, D, kc.as<uint16_t>() + o, vc.as<uint16_t>() + o, T, 0.125f, sc, ot,
                                            nullptr);
                        else if (dt == DType::BF16)
                            K.attention_bf16(q.data(), G, D, kc.as<uint16_t>() + o, vc.as<uint16_t>() + o, T, 0.125f, sc,
                                             ot, nullptr);
                        else
                            K.attention_f32(q.data(), G, D, kc.as<float>() + o, vc.as<float>() + o, T, 0.125f, sc, ot,
                                            nullptr);
                    }
                }
                best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
            }
            return best;
        },
        py::arg("isa"), py::arg("G"), py::arg("D"), py::arg("T"), py::arg("kv") = "f16", py::arg("caches") = 1,
        py::arg("threads") = 1, py::arg("reps") = 10);
    k.def(
        "attention",
        [](const std::string& isa, F32Array q, py::array keys, py::array values, float scale, bool return_lse,
           bool bf16) -> py::object {
        // keys and values: float32, or float16 (held as the cache holds them); or, with bf16, float32
        // that are rounded to bf16 and laid out as a bf16 cache; with return_lse, also each head's
        // log-sum-exp of its scores
        const Kernels& K = kernels_or_throw(isa);
        const bool f16 = keys.dtype().is(py::dtype("float16"));
        if (f16 != values.dtype().is(py::dtype("float16")) || (!f16 && !keys.dtype().is(py::dtype::of<float>())) ||
            (!f16 && !values.dtype().is(py::dtype::of<float>())))
            throw InvalidArgument("attention: K and V are both float32 or both float16");
        if (bf16 && f16) throw InvalidArgument("attention: bf16 takes K and V as float32");
        if (q.ndim() != 2 || keys.ndim() != 2 || values.ndim() != 2 || keys.shape(1) != q.shape(1) ||
            values.shape(0) != keys.shape(0) || values.shape(1) != q.shape(1) || keys.shape(0) < 1)
            throw InvalidArgument("attention: q [G,D], K [T,D], V [T,D], T >= 1");
        const int G = int(q.shape(0)), D = int(q.shape(1)), T = int(keys.shape(0));
        if (bf16 && D % 2) throw InvalidArgument("attention: a bf16 cache needs an even head size");
        const py::array kc = py::array::ensure(keys, py::array::c_style), vc = py::array::ensure(values, py::array::c_style);
        std::vector<float> scratch(attention_scratch_floats(G, T, D));
        py::array_t<float> out({G, D});
        py::array_t<float> lse(G);
        float* lse_p = return_lse ? lse.mutable_data() : nullptr;
        // K (and a bf16 V) as the cache lays them out; the unused positions of the last key block are
        // NaN, which must not reach the output
        auto blocked = [&](auto* src, auto fill, auto offset) {
            std::vector<std::remove_const_t<std::remove_pointer_t<decltype(src)>>> kb(key_positions(T) * D, fill);
            for (int t = 0; t < T; t++)
                for (int d = 0; d < D; d++) kb[offset(t, d, D)] = src[size_t(t) * D + d];
            return kb;
        };
        if (bf16) {
            auto rounded = [&](const py::array& a) {
                std::vector<uint16_t> r(size_t(T) * D);
                for (size_t i = 0; i < r.size(); i++) r[i] = f32_to_bf16(static_cast<const float*>(a.data())[i]);
                return r;
            };
            const auto kr = rounded(kc), vr = rounded(vc);
            const auto kb = blocked(kr.data(), uint16_t(0x7fc0), key_offset_bf16);
            const auto vb = blocked(vr.data(), uint16_t(0x7fc0), value_offset_bf16);
            K.attention_bf16(q.data(), G, D, kb.data(), vb.data(), T, scale, scratch.data(), out.mutable_data(), lse_p);
        } else if (f16) {
            const auto kb = blocked(static_cast<const uint16_t*>(kc.data()), uint16_t(0x7e00), key_offset);
            K.attention_f16(q.data(), G, D, kb.data(), static_cast<const uint16_t*>(vc.data()), T, scale,
                            scratch.data(), out.mutable_data(), lse_p);
        } else {
            const auto kb = blocked(static_cast<const float*>(kc.data()), std::numeric_limits<float>::quiet_NaN(), key_offset);
            K.attention_f32(q.data(), G, D, kb.data(), static_cast<const float*>(vc.data()), T, scale, scratch.data(),
                            out.mutable_data(), lse_p);
        }
        if (return_lse) return py::make_tuple(out, lse);
        return std::move(out);
    },
        py::arg("isa"), py::arg("q"), py::arg("keys"), py::arg("values"), py::arg("scale"),
        py::arg("return_lse") = false, py::arg("bf16") = false);
}
