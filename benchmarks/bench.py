"""qwen2rt against llama.cpp (llama-cpp-python) and PyTorch on the same model, prompt and threads.

    python benchmarks/bench.py                       # default model, every engine installed, 2k and 8k contexts
    python benchmarks/bench.py --contexts ''         # the same without the long contexts (shorter)
    python benchmarks/bench.py --engines qwen2rt-bf16,torch-bf16 --rounds 3 --json out.json
    python benchmarks/bench.py --engines qwen2rt-q4c,qwen2rt-q4c/bf16 --contexts 8192   # KV cache dtypes

Each engine runs in its own subprocess (so load time and peak RSS are its own), in alternation over
several rounds, every other one in reverse (A B C C B A ...); the table shows medians. first_s is
the first forward pass after loading (8 tokens), timed apart: it is where a model mapped from its
file (a converted one, or llama.cpp's GGUF) reads its weights in, so load_s + first_s is a cold
start, and the prefill and decode figures after it are all measured warm. Decode is memory-bound, so
its roofline is the bytes of weights read per token times tokens/s against the read bandwidth:
roofline_pct against the bandwidth sampled in the same process just before and just after that
decode (the host's bandwidth moves over tens of seconds), roofline_best_pct against the best sample
of the whole run; prefill is compute-bound, so its column is GFLOP/s (2 * weights read * tokens / s),
and prefill_peak_pct sets that against the peak of the instruction a prefill of those weights
multiplies with on this CPU (vfmadd231ps for f32, vdpbf16ps for bf16, vpdpbusd for 8 and 4 bits;
measured here on the same threads, AVX-512 only). Attention and the rest of a layer are in the time
but not in the FLOPs, so no engine reaches 100%; AMX tiles, where they run, can pass it.

After the rounds, each qwen2rt engine that has a llama.cpp engine of the same bits per weight in the
run (bf16 / BF16, q8 / Q8_0, q4 and q4c / Q4_0) decodes and prefills against it once more, both loaded
in one process, alternating blocks of 16 decode steps and one prefill of the longest prompt
(--paired-blocks, 16 by default; 0 skips it): both see the same fast and slow periods of the host, so
those ratios move less than the ones across processes. With --contexts, each qwen2rt engine also decodes
after 128 tokens of context and after each long one in one process, alternating blocks of 16 steps
(--context-blocks, 12 by default): the long-context share of decode speed without the host's periods in it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# --------------------------------------------------------------------------------------------------
# Engines. Each runs in a child process: load, prefill P tokens for each P, decode D tokens greedily
# (ignoring eos), report times.


def _prompt_ids(tokenize, n: int) -> list[int]:
    """n tokens of Python standard-library source: the same text for every engine."""
    import inspect
    import json.decoder
    import textwrap

    text = inspect.getsource(json.decoder) + inspect.getsource(textwrap) + inspect.getsource(inspect)
    ids = tokenize(text)
    if len(ids) < n:
        raise SystemExit(f"benchmark text has only {len(ids)} tokens, {n} asked")
    return ids[:n]


# The host's read bandwidth comes and goes with its other tenants, over tens of seconds, and a
# decode's tok/s with it: so each child samples the bandwidth just before and just after its decode,
# and that decode's roofline is the mean of the two (the best sample of the whole run would set a slow
# period's decode against a fast period's bandwidth). A sample's 256 MiB buffer would count in the
# child's peak RSS: the peak so far is kept before each sample and Linux's high-water mark is reset
# after it (/proc/self/clear_refs, "5"); where that cannot be done no sample is taken.
_peak_rss_outside_samples = 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def bandwidth_now(threads: int) -> float | None:
    """Bytes/s of reading a 256 MiB buffer now, from inside a child, or None."""
    global _peak_rss_outside_samples
    from qwen2rt import _core

    _peak_rss_outside_samples = max(_peak_rss_outside_samples, peak_rss_bytes())
    if not _reset_peak_rss():
        return None
    bw = _core.read_bandwidth(256 << 20, threads, 3)
    _reset_peak_rss()  # the buffer is unmapped: the high-water mark drops back to what is resident
    return bw


def _timed_decode(out: dict, threads: int, decode) -> None:
    """out["decode_s"] = decode(), with the read bandwidth sampled right before and right after it."""
    out["decode_bw_before"] = bandwidth_now(threads)
    out["decode_s"] = decode()
    out["decode_bw_after"] = bandwidth_now(threads)


def _qwen2rt_greedy(m, logits, steps: int):
    """`steps` greedy decode steps of qwen2rt after `logits`: (seconds, the last logits)."""
    import numpy as np

    t = time.perf_counter()
    for _ in range(steps):
        logits = m.forward([int(np.argmax(logits))], start_pos=m.cache_len)
    return time.perf_counter() - t, logits


def _open_qwen2rt(spec: dict):
    import qwen2rt

    path, dtype = spec["model"], spec["dtype"]
    dtype, _, kv_dtype = dtype.partition("/")  # "q4c/bf16": a bf16 KV cache instead of the default
    if dtype.endswith("c"):  # "q4c": a model converted once by `qwen2rt convert`, loaded by mmap
        dtype = dtype[:-1]
        path = _converted(spec["gguf"], dtype)
    return qwen2rt.Model(path, dtype=dtype, threads=spec["threads"], max_context=spec["max_context"],
                         kv_dtype=kv_dtype or None)


def _run_qwen2rt(spec: dict) -> dict:
    import numpy as np

    import qwen2rt

    t0 = time.perf_counter()
    m = _open_qwen2rt(spec)
    c = m.config
    out = {"load_s": time.perf_counter() - t0, "weight_bytes": m._core.weight_bytes,
           "isa": qwen2rt.system_info()["isa"],
           "kv_bytes": qwen2rt._core.kv_cache_bytes(c.num_hidden_layers, c.num_key_value_heads, c.head_dim,
                                                    spec["max_context"], m._core.kv_dtype)}
    # bytes a decode step reads: every matrix but the embedding table (unless it is the tied lm_head)
    embed = m._core.tensor_bytes("model.embed_tokens.weight")[1].nbytes
    out["read_bytes_per_token"] = m._core.weight_bytes - (0 if m.config.tie_word_embeddings else embed)
    ids = _prompt_ids(m.tokenize, max(spec["prompts"] + spec["contexts"] + [8]))

    def prefill(prefix: list[int]):
        """(seconds, logits) of a prompt from an empty cache, up to its first token's argmax"""
        m.reset()
        t = time.perf_counter()
        logits = m.forward(prefix)
        int(np.argmax(logits))
        return time.perf_counter() - t, logits

    out["first_s"] = prefill(ids[:8])[0]  # a mapped (converted) model reads its weights in here
    for p in spec["prompts"]:
        out[f"prefill_{p}_s"] = prefill(ids[:p])[0]

    # decode D tokens after a prompt: (prefill seconds, decode seconds)
    def decode(prefix: list[int], steps: int) -> tuple[float, float]:
        seconds, logits = prefill(prefix)
        return seconds, _qwen2rt_greedy(m, logits, steps)[0]

    _timed_decode(out, spec["threads"], lambda: decode(ids[:8], spec["decode"])[1])
    for c in spec["contexts"]:
        out[f"prefill_at_{c}_s"], d = decode(ids[:c], 32)
        out[f"decode_at_{c}_s"] = d / 32 * spec["decode"]
    for b in spec.get("batches", []):  # aggregate decode tokens/s of b sequences decoded together
        prompts = [ids[i * 8 : i * 8 + 8 + i] for i in range(b)]  # different lengths
        m.reset()
        m.generate(prompts, max_new_tokens=2, temperature=0)  # prefills (the timed run reuses them)
        t = time.perf_counter()
        res = m.generate(prompts, max_new_tokens=spec["decode"] // 2, temperature=0)
        out[f"batch_{b}_tok_s"] = sum(r.completion_tokens for r in res) / (time.perf_counter() - t)
    return out


def _converted(gguf_path: str, dtype: str) -> str:
    """The GGUF converted to a qwen2rt folder of `dtype` (cached)."""
    from qwen2rt.converted import convert

    folder = os.path.join(os.path.expanduser("~/.cache/qwen2rt-bench"),
                          os.path.basename(gguf_path).replace(".gguf", f".qwen2rt-{dtype}"))
    st = os.path.join(folder, "model.safetensors")
    if not os.path.exists(st) or _made_by_another_policy(st, dtype):
        convert(gguf_path, folder, dtype=dtype, progress=False)
    return folder


def _made_by_another_policy(st: str, dtype: str) -> bool:
    """Whether a cached conversion holds a matrix in another dtype than converting now would (an older
    qwen2rt's mixed formats: q4's lm_head was q8 before it was q6)."""
    from qwen2rt.model import matrix_dtype_policy
    from qwen2rt.safetensors_io import SafetensorsFile

    stored = json.loads(SafetensorsFile(st).metadata["qwen2rt_tensor_dtypes"])
    with open(os.path.join(os.path.dirname(st), "config.json")) as f:
        policy = matrix_dtype_policy(dtype, None, json.load(f).get("tie_word_embeddings", False))
    for name, kind in stored.items():
        if name.endswith("_proj.weight") or name in ("lm_head.weight", "model.embed_tokens.weight"):
            want = "bf16p32" if policy(name) == "bf16" else policy(name)  # bf16 is stored packed
            if kind != want and not kind.startswith("gguf:"):  # an untied GGUF embedding stays as it is
                return True
    return False


def _hf_folder(gguf_path: str) -> str:
    """A float32 Hugging Face folder of the GGUF's weights, made once with transformers (cached)."""
    import hashlib

    key = hashlib.sha256(f"{gguf_path}:{os.path.getsize(gguf_path)}".encode()).hexdigest()[:12]
    folder = os.path.join(os.path.expanduser("~/.cache/qwen2rt-bench"), f"hf-{key}")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, name = os.path.split(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = folder + ".tmp"
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(d, gguf_file=name).save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def _run_torch(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(spec["threads"])
    folder = _hf_folder(spec["gguf"])
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    out = {"load_s": time.perf_counter() - t0,
           "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    ids = _prompt_ids(lambda s: tok.encode(s), max(spec["prompts"] + spec["contexts"] + [8]))
    with torch.inference_mode():

        def prefill(prefix: list[int]):
            """(seconds, the cache, the first token) of a prompt, up to its first token's argmax"""
            t = time.perf_counter()
            r = model(torch.tensor([prefix]), use_cache=True)
            nxt = r.logits[0, -1].argmax().view(1, 1)
            return time.perf_counter() - t, r.past_key_values, nxt

        out["first_s"] = prefill(ids[:8])[0]
        for p in spec["prompts"]:
            out[f"prefill_{p}_s"] = prefill(ids[:p])[0]

        def decode(prefix: list[int], steps: int) -> tuple[float, float]:
            seconds, past, nxt = prefill(prefix)
            t = time.perf_counter()
            for _ in range(steps):
                r = model(nxt, past_key_values=past, use_cache=True)
                past, nxt = r.past_key_values, r.logits[0, -1].argmax().view(1, 1)
            return seconds, time.perf_counter() - t

        _timed_decode(out, spec["threads"], lambda: decode(ids[:8], spec["decode"])[1])
        for c in spec["contexts"]:
            out[f"prefill_at_{c}_s"], d = decode(ids[:c], 32)
            out[f"decode_at_{c}_s"] = d / 32 * spec["decode"]
    return out


def _llama_file(gguf_path: str, ftype: str) -> str:
    """The source GGUF requantized to `ftype` (F16, BF16, Q8_0, Q4_0) with llama.cpp (cached)."""
    import llama_cpp

    if ftype == "source":
        return gguf_path
    folder = os.path.expanduser("~/.cache/qwen2rt-bench")
    os.makedirs(folder, exist_ok=True)
    out = os.path.join(folder, os.path.basename(gguf_path).replace(".gguf", f".{ftype}.gguf"))
    if os.path.exists(out):
        return out
    code = {"F16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16, "BF16": llama_cpp.LLAMA_FTYPE_MOSTLY_BF16,
            "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[ftype]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = code
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    tmp = out + ".tmp"
    rc = llama_cpp.llama_model_quantize(gguf_path.encode(), tmp.encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize to {ftype} failed ({rc})")
    os.replace(tmp, out)
    return out


def _llama_greedy(llm, steps: int) -> float:
    """Seconds of `steps` greedy decode steps of llama.cpp after what it last evaluated."""
    t = time.perf_counter()
    for _ in range(steps):
        llm.eval([_llama_argmax(llm)])
    return time.perf_counter() - t


def _llama_argmax(llm) -> int:
    """The argmax of the last evaluated token's logits (llama-cpp-python keeps no copy of them)."""
    import numpy as np

    return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))


def _run_llama(spec: dict) -> dict:
    import llama_cpp

    path = _llama_file(spec["gguf"], spec["dtype"])
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_ctx=spec["max_context"], n_threads=spec["threads"],
                          n_threads_batch=spec["threads"], n_batch=512, verbose=False)
    out = {"load_s": time.perf_counter() - t0, "weight_bytes": os.path.getsize(path)}
    from qwen2rt import _core
    from qwen2rt.checkpoint import GGUFCheckpoint
    from qwen2rt.gguf_io import GGUFFile

    c = GGUFCheckpoint(path).config  # llama.cpp's cache is f16 unless told otherwise
    out["kv_bytes"] = _core.kv_cache_bytes(c.num_hidden_layers, c.num_key_value_heads, c.head_dim,
                                           spec["max_context"], "f16")

    g = GGUFFile(path)  # bytes a decode step reads: every tensor but the embedding table
    out["read_bytes_per_token"] = sum(t.nbytes for n, t in g.tensors.items() if n != "token_embd.weight")
    ids = _prompt_ids(lambda s: llm.tokenize(s.encode(), add_bos=False, special=False),
                      max(spec["prompts"] + spec["contexts"] + [8]))

    def prefill(prefix: list[int]) -> float:
        """seconds of a prompt from an empty cache, up to its first token's argmax"""
        llm.reset()
        t = time.perf_counter()
        llm.eval(prefix)
        _llama_argmax(llm)
        return time.perf_counter() - t

    out["first_s"] = prefill(ids[:8])
    for p in spec["prompts"]:
        out[f"prefill_{p}_s"] = prefill(ids[:p])

    def decode(prefix: list[int], steps: int) -> tuple[float, float]:
        return prefill(prefix), _llama_greedy(llm, steps)

    _timed_decode(out, spec["threads"], lambda: decode(ids[:8], spec["decode"])[1])
    for c in spec["contexts"]:
        out[f"prefill_at_{c}_s"], d = decode(ids[:c], 32)
        out[f"decode_at_{c}_s"] = d / 32 * spec["decode"]
    return out


def _run_paired_decode(spec: dict) -> dict:
    """qwen2rt (spec["dtype"]) and llama.cpp (spec["llama_dtype"]) loaded in one process, decoding in
    alternating blocks of spec["block"] greedy steps and one prefill of spec["prefill"] tokens (qwen2rt
    first in even blocks, llama.cpp in odd ones): both see the same mix of the host's fast and slow
    periods, which separate processes, run tens of seconds apart, do not. Each continues its own
    sequence, restarted after a prefill and before the context fills."""
    import llama_cpp
    import numpy as np

    m = _open_qwen2rt(spec)
    llm = llama_cpp.Llama(model_path=_llama_file(spec["gguf"], spec["llama_dtype"]), n_ctx=spec["max_context"],
                          n_threads=spec["threads"], n_threads_batch=spec["threads"], n_batch=512, verbose=False)
    prompt = _prompt_ids(m.tokenize, 8)  # the same vocabulary: one tokenization for both
    steps, room = spec["block"], spec["max_context"] - 8

    state = {"logits": m.forward(prompt)}
    llm.eval(prompt)

    def ours() -> float:
        if m.cache_len + steps > room:
            m.reset()
            state["logits"] = m.forward(prompt)
        elapsed, state["logits"] = _qwen2rt_greedy(m, state["logits"], steps)
        return elapsed

    def theirs() -> float:
        if llm.n_tokens + steps > room:
            llm.reset()
            llm.eval(prompt)
        return _llama_greedy(llm, steps)

    long_prompt = _prompt_ids(m.tokenize, spec["prefill"])

    def ours_prefill() -> float:
        m.reset()
        t = time.perf_counter()
        int(np.argmax(m.forward(long_prompt)))
        elapsed = time.perf_counter() - t
        m.reset()
        state["logits"] = m.forward(prompt)
        return elapsed

    def theirs_prefill() -> float:
        llm.reset()
        t = time.perf_counter()
        llm.eval(long_prompt)
        _llama_argmax(llm)
        elapsed = time.perf_counter() - t
        llm.reset()
        llm.eval(prompt)
        return elapsed

    out = {"qwen2rt_s": [], "llama_s": [], "qwen2rt_prefill_s": [], "llama_prefill_s": []}
    for b in range(spec["blocks"]):
        for who in ("qwen2rt", "llama") if b % 2 == 0 else ("llama", "qwen2rt"):
            out[f"{who}_s"].append(ours() if who == "qwen2rt" else theirs())
            out[f"{who}_prefill_s"].append(ours_prefill() if who == "qwen2rt" else theirs_prefill())
    return out


def _run_paired_contexts(spec: dict) -> dict:
    """qwen2rt decoding at a short context and at each long one, in one process: one model per context
    (a converted model's weights are mapped once and shared), alternating blocks of spec["block"]
    greedy steps (in reverse order every other block), so that the ratio of long to short sees the same
    host periods. The short model restarts from its spec["short"]-token prompt before every block (its
    prefill is not timed); each long one prefills once and goes on from there."""
    ctxs, short = spec["contexts"], spec["short"]
    order = [short] + ctxs
    models = {c: _open_qwen2rt(spec) for c in order}
    ids = _prompt_ids(models[short].tokenize, max(ctxs))
    state = {c: models[c].forward(ids[:c]) for c in ctxs}
    steps = spec["block"]

    def block(c: int) -> float:
        m = models[c]
        if c == short:
            m.reset()
            state[c] = m.forward(ids[:short])
        elapsed, state[c] = _qwen2rt_greedy(m, state[c], steps)
        return elapsed

    out = {f"at_{c}_s": [] for c in order}
    for b in range(spec["blocks"]):
        for c in order if b % 2 == 0 else order[::-1]:
            out[f"at_{c}_s"].append(block(c))
    return out


# The context the long ones are set against in the one-process measure (_run_paired_contexts).
SHORT_CONTEXT = 128

RUNNERS = {"qwen2rt": _run_qwen2rt, "torch": _run_torch, "llama": _run_llama, "paired": _run_paired_decode,
           "contexts": _run_paired_contexts}


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux's ru_maxrss survives exec, so a child would report its
    parent's peak (the parent's 1 GiB bandwidth buffer) if it is larger: VmHWM is this program's own."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _run_child(spec: dict, what: str) -> dict | None:
    """One runner (RUNNERS[spec["engine"]]) in a child process of its own: its result, or None (said on
    stderr, with the child's last words) if it failed."""
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        print(f"{what}: failed\n{p.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(line[7:])


def child_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    out = RUNNERS[spec["engine"]](spec)
    out["peak_rss_bytes"] = max(peak_rss_bytes(), _peak_rss_outside_samples)
    print("RESULT " + json.dumps(out))


# --------------------------------------------------------------------------------------------------
# The parent: which engines exist, bandwidth, alternation, the table.


def available_engines() -> list[str]:
    out = ["qwen2rt-f32", "qwen2rt-bf16", "qwen2rt-q8", "qwen2rt-q4", "qwen2rt-q4c"]
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401

        out += ["torch-f32", "torch-bf16"]
    except ImportError:
        pass
    try:
        import llama_cpp  # noqa: F401

        out += ["llama-BF16", "llama-Q8_0", "llama-Q4_0"]
    except ImportError:
        pass
    return out


def engine_builds(engines: list[str]) -> dict[str, str]:
    """How each compared engine was built, as far as it says: how llama.cpp was built decides its
    speed (its CPU features, and the compiler of its CPU backend, from the library's .comment)."""
    from qwen2rt import system_info

    info = system_info()
    out = {"qwen2rt": f"{info['version']}, kernels {info['isa']}"}
    if any(e.startswith("llama-") for e in engines):
        import llama_cpp

        feats = llama_cpp.llama_print_system_info().decode(errors="replace")
        on = [kv.split("=")[0].split(":")[-1].strip() for kv in feats.split("|") if kv.strip().endswith("= 1")]
        compiler = "compiler not recorded in the library"
        lib = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
        for name in sorted(os.listdir(lib)) if os.path.isdir(lib) else []:
            if name.startswith("libggml-cpu") and name.endswith(".so"):
                with open(os.path.join(lib, name), "rb") as f:
                    blob = f.read()
                m = re.search(rb"(GCC: \([^)]*\) [0-9.]+|clang version [0-9.]+)", blob)
                compiler = m.group(1).decode() if m else compiler
                break
        out["llama.cpp"] = f"llama-cpp-python {llama_cpp.__version__}, {compiler}, CPU features {' '.join(on)}"
    if any(e.startswith("torch-") for e in engines):
        import torch

        out["torch"] = f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}"
    return out


def read_bandwidth(threads: int, gib: float = 1.0) -> float:
    """Bytes/s of reading a 1 GiB buffer with `threads` threads (qwen2rt's C++ helper)."""
    from qwen2rt import _core

    return _core.read_bandwidth(int(gib * (1 << 30)), threads, 5)


def multiply_add_peaks(threads: int) -> dict[str, float]:
    """Ops/s (a multiply or an add each) of `threads` cores issuing the f32, bf16 and int8 prefill
    instructions in registers alone; {} where qwen2rt has no AVX-512 kernels here."""
    from qwen2rt import _core

    try:
        return {op: _core.multiply_add_peak(op, threads) for op in ("f32", "bf16", "int8")}
    except ValueError:
        return {}


# the peak a prefill of weights of each dtype is held against: the instruction it multiplies with
PEAK_OP = {"f32": "f32", "bf16": "bf16", "BF16": "bf16", "q8": "int8", "q6": "int8", "q4": "int8", "q8c": "int8",
           "q6c": "int8", "q4c": "int8",
           "Q8_0": "int8", "Q4_0": "int8"}


def weights_read_per_token(cfg) -> int:
    """Weights a decode step reads: every layer matrix and the lm_head (the embedding table is only
    gathered one row at a time)."""
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    qd, kvd = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return L * (h * qd + 2 * h * kvd + qd * h + 3 * h * i) + cfg.vocab_size * h


BITS = {"f32": 32, "bf16": 16, "q8": 8.5, "q6": 6.5, "q4": 4.5, "q8c": 8.5, "q6c": 6.5, "q4c": 4.5,
        "F16": 16, "BF16": 16, "Q8_0": 8.5, "Q4_0": 4.5, "source": None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="registry name or GGUF path")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--engines", default=None, help="comma-separated (default: every one installed)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", default="128,512", help="prefill lengths")
    ap.add_argument("--decode", type=int, default=128, help="decoded tokens")
    ap.add_argument("--contexts", default="2048,8192", help="decode at these context lengths too ('': none)")
    ap.add_argument("--batches", default="", help="qwen2rt: aggregate decode tok/s at these batch sizes, e.g. 1,4,8")
    ap.add_argument("--paired-blocks", type=int, default=16,
                    help="decode and prefill ratios in one process: this many alternating blocks of 16 decode "
                         "steps and one prefill, each engine (0: none)")
    ap.add_argument("--context-blocks", type=int, default=12,
                    help="with --contexts: decode at 128 tokens of context against each of them in one process, "
                         "this many alternating blocks of 16 steps each (0: none)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--png", default=None, help="write a chart here (needs matplotlib)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child_main(a.child)

    from qwen2rt import registry, system_info
    from qwen2rt.checkpoint import GGUFCheckpoint

    gguf = registry.resolve(a.model)
    cfg = GGUFCheckpoint(gguf).config
    engines = a.engines.split(",") if a.engines else available_engines()
    prompts = [int(x) for x in a.prompts.split(",") if x]
    contexts = [int(x) for x in a.contexts.split(",") if x]
    batches = [int(x) for x in a.batches.split(",") if x]
    per_token = weights_read_per_token(cfg)
    # measured again after every engine: the host is shared, and its best figure is what the machine can do
    bws = [read_bandwidth(a.threads)]
    bw = bws[0]
    peaks = multiply_add_peaks(a.threads)  # also measured after every engine, as the bandwidth: the best counts
    print(f"model {gguf}\nthreads {a.threads}, {system_info()['isa']}; read bandwidth {bw / 1e9:.1f} GB/s; "
          f"{per_token / 1e6:.0f} M weights read per decoded token; multiply-add peaks "
          f"{', '.join(f'{k} {v / 1e9:.0f}' for k, v in peaks.items()) or '-'} GFLOP/s", file=sys.stderr)

    builds = engine_builds(engines)
    for k, v in builds.items():
        print(f"{k}: {v}", file=sys.stderr)

    for e in engines:  # converted models are made here, so that no child's load time or RSS includes it
        if e.startswith("qwen2rt-") and e.split("/")[0].endswith("c"):
            _converted(gguf, e.split("/")[0].split("-", 1)[1][:-1])
    results: dict[str, list[dict]] = {e: [] for e in engines}
    for r in range(a.rounds):
        # every other round in reverse (A B C, C B A, ...): the host's speed drifts over a run (tens of
        # seconds fast, then slow), and a fixed order would hand each engine the same share of it
        for e in engines if r % 2 == 0 else engines[::-1]:
            kind, dtype = e.split("-", 1)
            spec = dict(engine=kind, dtype=dtype, model=gguf, gguf=gguf, threads=a.threads, prompts=prompts,
                        decode=a.decode, contexts=contexts, batches=batches,
                        max_context=max(prompts + contexts + [64]) + a.decode + 64)
            res = _run_child(spec, f"round {r + 1} {e}")
            if res is None:
                continue
            results[e].append(res)
            # after every engine: the host's bandwidth comes and goes with its other tenants
            bws.append(read_bandwidth(a.threads))
            peaks = {k: max(v, peaks.get(k, 0.0)) for k, v in multiply_add_peaks(a.threads).items()}
            print(f"round {r + 1} {e}: done; read bandwidth {bws[-1] / 1e9:.1f} GB/s", file=sys.stderr)
    bw = max(bws)

    # Decode and prefill ratios from one process per pair (_run_paired_decode): each qwen2rt engine
    # against the llama.cpp engine of the same bits per weight, when both are in the run.
    paired = {}
    for e in engines if a.paired_blocks > 0 else []:
        kind, dtype = e.split("-", 1)
        bits = BITS.get(dtype)
        twin = next((x for x in engines if x.startswith("llama-") and BITS.get(x.split("-", 1)[1]) == bits), None)
        if kind != "qwen2rt" or "/" in dtype or twin is None:
            continue
        spec = dict(engine="paired", dtype=dtype, llama_dtype=twin.split("-", 1)[1], model=gguf, gguf=gguf,
                    threads=a.threads, blocks=a.paired_blocks, block=16, prefill=prompts[-1],
                    max_context=max(1024, prompts[-1] + 64))
        res = _run_child(spec, f"paired decode {e} / {twin}")
        if res is None:
            continue
        ours, theirs = res["qwen2rt_s"], res["llama_s"]
        blocks = sorted(t / o for o, t in zip(ours, theirs))
        prefills = sorted(t / o for o, t in zip(res["qwen2rt_prefill_s"], res["llama_prefill_s"]))
        paired[f"{e} / {twin}"] = {
            "qwen2rt_tok_s": 16 * len(ours) / sum(ours), "llama_tok_s": 16 * len(theirs) / sum(theirs),
            "ratio": sum(theirs) / sum(ours), "block_ratio_min": blocks[0],
            "block_ratio_median": statistics.median(blocks), "block_ratio_max": blocks[-1],
            "prefill": prompts[-1], "qwen2rt_prefill_tok_s": prompts[-1] / statistics.median(res["qwen2rt_prefill_s"]),
            "llama_prefill_tok_s": prompts[-1] / statistics.median(res["llama_prefill_s"]),
            "prefill_ratio_median": statistics.median(prefills), "prefill_ratio_min": prefills[0],
            "prefill_ratio_max": prefills[-1], "raw": res}
        print(f"paired decode {e} / {twin}: done", file=sys.stderr)

    # Decode at long contexts against decode at 128 tokens, in one process per qwen2rt engine
    # (_run_paired_contexts): the ratio the issue sets a bound on, without the host's periods in it.
    at_contexts = {}
    for e in engines if contexts and a.context_blocks > 0 else []:
        kind, dtype = e.split("-", 1)
        if kind != "qwen2rt":
            continue
        spec = dict(engine="contexts", dtype=dtype, model=gguf, gguf=gguf, threads=a.threads, short=SHORT_CONTEXT,
                    contexts=contexts, blocks=a.context_blocks, block=16,
                    max_context=max(contexts) + 16 * a.context_blocks + 64)
        res = _run_child(spec, f"contexts {e}")
        if res is None:
            continue
        short = res[f"at_{SHORT_CONTEXT}_s"]
        r = {"decode_short_tok_s": 16 * len(short) / sum(short), "raw": res}
        for c in contexts:
            long = res[f"at_{c}_s"]
            blocks = sorted(100 * a_s / a_l for a_s, a_l in zip(short, long))
            r[f"decode@{c}_tok_s"] = 16 * len(long) / sum(long)
            r[f"decode@{c}_pct"] = 100 * sum(short) / sum(long)
            r[f"decode@{c}_block_pct"] = (blocks[0], statistics.median(blocks), blocks[-1])
        at_contexts[e] = r
        print(f"contexts {e}: done", file=sys.stderr)

    rows = {}
    for e, runs in results.items():
        if not runs:
            continue
        med = {k: statistics.median(run[k] for run in runs) for k in runs[0]
               if all(isinstance(run.get(k), (int, float)) for run in runs)}
        kind, dtype = e.split("-", 1)
        bits = BITS.get(dtype)
        row = {"engine": e, "runs": len(runs), "load_s": med["load_s"], "first_s": med.get("first_s"),
               "peak_rss_gb": med["peak_rss_bytes"] / 1e9}
        for p in prompts:
            row[f"prefill{p}_tok_s"] = p / med[f"prefill_{p}_s"]
        row[f"ttft{prompts[0]}_s"] = med.get(f"prefill_{prompts[0]}_s")  # the prefill ends in the first token's argmax
        row["decode_tok_s"] = a.decode / med["decode_s"]
        for c in contexts:
            row[f"prefill@{c}_tok_s"] = c / med[f"prefill_at_{c}_s"]  # a long prompt, where attention weighs more
            row[f"decode@{c}_tok_s"] = a.decode / med[f"decode_at_{c}_s"]
            row[f"decode@{c}_pct"] = 100 * row[f"decode@{c}_tok_s"] / row["decode_tok_s"]
        for b in batches:
            row[f"batch{b}_tok_s"] = med.get(f"batch_{b}_tok_s")
        read = med.get("read_bytes_per_token") or (per_token * bits / 8 if bits else None)
        if read:
            row["decode_GB_s"] = row["decode_tok_s"] * read / 1e9
            # each run's decode against the bandwidth of its own moment (the child's samples around it)
            same_moment = [100 * read * a.decode / run["decode_s"] / ((bw0 + bw1) / 2) for run in runs
                           if (bw0 := run.get("decode_bw_before")) and (bw1 := run.get("decode_bw_after"))]
            row["roofline_pct"] = statistics.median(same_moment) if same_moment else None
            row["roofline_best_pct"] = 100 * row["decode_GB_s"] / (bw / 1e9)
        flops_per_token = 2 * (per_token - cfg.vocab_size * cfg.hidden_size)  # the lm_head runs once per prompt
        row["prefill_GFLOP_s"] = row[f"prefill{prompts[-1]}_tok_s"] * flops_per_token / 1e9
        peak = peaks.get(PEAK_OP.get(dtype.split("/")[0], ""))
        row["prefill_peak_pct"] = 100 * row["prefill_GFLOP_s"] * 1e9 / peak if peak else None
        if med.get("kv_bytes") is not None:  # the bound: peak RSS <= 1.15 x (weights + KV cache)
            row["rss_x_weights_kv"] = med["peak_rss_bytes"] / (med["weight_bytes"] + med["kv_bytes"])
        rows[e] = row

    def best(prefix: str, key: str) -> float | None:
        vals = [r[key] for e, r in rows.items() if e.startswith(prefix)]
        return max(vals) if vals else None

    cols = ["engine", "load_s", "first_s"] + [f"prefill{p}_tok_s" for p in dict.fromkeys([prompts[0], prompts[-1]])] + \
           [f"ttft{prompts[0]}_s", "decode_tok_s"] + \
           [x for c in contexts for x in (f"prefill@{c}_tok_s", f"decode@{c}_tok_s", f"decode@{c}_pct")] + \
           [f"batch{b}_tok_s" for b in batches] + \
           ["decode_GB_s", "roofline_pct", "roofline_best_pct", "prefill_GFLOP_s", "prefill_peak_pct", "peak_rss_gb",
            "rss_x_weights_kv", "vs_llama_decode", "vs_torch_decode", "vs_best_prefill"]
    longest = f"prefill{prompts[-1]}_tok_s"
    ref_prefill = max(filter(None, [best("llama", longest), best("torch", longest)]), default=None)
    for e, r in rows.items():
        lb, tb = best("llama", "decode_tok_s"), best("torch", "decode_tok_s")
        bits = BITS.get(e.split("-", 1)[1])
        same_bits = [x for x in rows if x.startswith("llama") and BITS.get(x.split("-", 1)[1]) == bits]
        if same_bits:
            lb = rows[same_bits[0]]["decode_tok_s"]
        r["vs_llama_decode"] = r["decode_tok_s"] / lb if lb else None
        r["vs_torch_decode"] = r["decode_tok_s"] / tb if tb else None
        r["vs_best_prefill"] = r[f"prefill{prompts[-1]}_tok_s"] / ref_prefill if ref_prefill else None

    def fmt(v):
        return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows.values():
        print("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    print(f"\nread bandwidth {bw / 1e9:.1f} GB/s with {a.threads} threads (the best of "
          f"{', '.join(f'{b / 1e9:.1f}' for b in bws)}, measured before the rounds and after each engine; "
          f"roofline_pct sets each decode against the bandwidth sampled just before and after it, "
          f"roofline_best_pct against the best sample); vs_llama_decode compares with llama.cpp "
          f"at the same bits per weight (else its fastest); vs_best_prefill with the fastest of llama.cpp and PyTorch."
          + (f" Multiply-add peaks on {a.threads} threads (the best of the measures before the rounds and after "
             f"each engine): "
             f"{', '.join(f'{k} {v / 1e9:.0f}' for k, v in peaks.items())} GFLOP/s." if peaks else ""))
    if paired:
        print(f"\nIn one process, {a.paired_blocks} alternating blocks of 16 decode steps and a {prompts[-1]}-token "
              f"prefill each (the same host periods for both engines; prefill tok/s are medians):\n")
        print("| pair | decode tok/s qwen2rt / llama.cpp | decode ratio | block ratios min / median / max "
              "| prefill tok/s qwen2rt / llama.cpp | prefill ratio median (min-max) |")
        print("|---|---|---|---|---|---|")
        for name, r in paired.items():
            print(f"| {name} | {r['qwen2rt_tok_s']:.1f} / {r['llama_tok_s']:.1f} | {r['ratio']:.2f} | "
                  f"{r['block_ratio_min']:.2f} / {r['block_ratio_median']:.2f} / {r['block_ratio_max']:.2f} | "
                  f"{r['qwen2rt_prefill_tok_s']:.0f} / {r['llama_prefill_tok_s']:.0f} | "
                  f"{r['prefill_ratio_median']:.2f} ({r['prefill_ratio_min']:.2f}-{r['prefill_ratio_max']:.2f}) |")
    if at_contexts:
        n = SHORT_CONTEXT
        print(f"\nIn one process, decode after {n} tokens of context and after {', '.join(map(str, contexts))}, "
              f"{a.context_blocks} alternating blocks of 16 steps each (block ratios: long / short, each block "
              f"against the short block beside it):\n")
        print(f"| engine | decode@{n} tok/s | " + " | ".join(
            f"decode@{c} tok/s | % of decode@{n} | block % min / median / max" for c in contexts) + " |")
        print("|---|---|" + "---|---|---|" * len(contexts))
        for e, r in at_contexts.items():
            print(f"| {e} | {r['decode_short_tok_s']:.1f} | " + " | ".join(
                f"{r[f'decode@{c}_tok_s']:.1f} | {r[f'decode@{c}_pct']:.0f}% | "
                + " / ".join(f"{x:.0f}" for x in r[f"decode@{c}_block_pct"]) for c in contexts) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": gguf, "threads": a.threads, "bandwidth_Bps": bw, "bandwidth_samples_Bps": bws,
                       "paired_decode": paired, "decode_at_contexts": at_contexts,
                       "multiply_add_peaks_flops": peaks,
                       "weights_per_token": per_token,
                       "system": system_info(), "builds": builds, "rows": rows, "raw": results}, f, indent=2)
    if a.png:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("no matplotlib: no chart", file=sys.stderr)
            return
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        names = list(rows)
        axes[0].barh(names, [rows[n]["decode_tok_s"] for n in names])
        axes[0].set_xlabel("decode tokens/s")
        axes[1].barh(names, [rows[n][f"prefill{prompts[-1]}_tok_s"] for n in names])
        axes[1].set_xlabel(f"prefill tokens/s ({prompts[-1]}-token prompt)")
        fig.suptitle(f"{os.path.basename(gguf)}, {a.threads} threads")
        fig.tight_layout()
        fig.savefig(a.png, dpi=100)


if __name__ == "__main__":
    main()
