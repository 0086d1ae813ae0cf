"""The qwen2rt command line: run, chat, generate, serve, pull, info, perplexity."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .errors import Qwen2rtError


def _add_model_args(p: argparse.ArgumentParser, positional: bool = True) -> None:
    if positional:
        p.add_argument("model", help="a Hugging Face model folder, a GGUF file, or a registry name")
    else:
        from .registry import DEFAULT_MODEL

        p.add_argument("-m", "--model", default=DEFAULT_MODEL,
                       help=f"model folder, GGUF file or name (default {DEFAULT_MODEL})")
    p.add_argument("--dtype", default=None, choices=["bf16", "f32", "q8", "q6", "q4"],
                   help="weight type in memory (default: bf16, or a converted model's own)")
    p.add_argument("--threads", type=int, default=None, help="threads (default: the cores available)")
    p.add_argument("--max-context", type=int, default=None, help="KV cache positions (default: the model's)")
    p.add_argument("--kv-dtype", default=None, choices=["f16", "bf16", "f32"],
                   help="KV cache element type (default: f16; f32 for f32 weights; bf16 for q4 on AVX-512 but Intel's)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=None, help="0 for greedy (default: generation_config)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _sampling_kwargs(a: argparse.Namespace) -> dict:
    return dict(
        max_new_tokens=a.max_new_tokens,
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        min_p=a.min_p,
        repetition_penalty=a.repetition_penalty,
        seed=a.seed,
        stop=a.stop,
    )


def _load(a: argparse.Namespace):
    import os

    from . import registry
    from .model import Model

    if not os.path.exists(a.model):
        registry.resolve(a.model)  # pull a registry model first, with a progress bar
    return Model(a.model, dtype=a.dtype, threads=a.threads, max_context=a.max_context, kv_dtype=a.kv_dtype)


def _stream(model, prompt, a: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    stream = model.generate(prompt, stream=True, **_sampling_kwargs(a))
    try:
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        stream.close()
        sys.stdout.write("\n")
        return 130
    sys.stdout.write("\n")
    r = stream.result
    dt = time.perf_counter() - t0
    if a.verbose and r is not None:
        print(
            f"[{r.prompt_tokens} prompt tokens, {r.completion_tokens} generated in {dt:.2f} s, "
            f"finish: {r.finish_reason}]",
            file=sys.stderr,
        )
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    model = _load(a)
    prompt = a.prompt
    if a.chat:
        messages = []
        if a.system:
            messages.append({"role": "system", "content": a.system})
        messages.append({"role": "user", "content": a.prompt})
        prompt = messages
    return _stream(model, prompt, a)


def _chat_messages(a: argparse.Namespace, prompt: str) -> list[dict]:
    messages = [{"role": "system", "content": a.system}] if a.system else []
    return messages + [{"role": "user", "content": prompt}]


def cmd_run(a: argparse.Namespace) -> int:
    model = _load(a)
    return _stream(model, _chat_messages(a, a.prompt), a)


def cmd_chat(a: argparse.Namespace) -> int:
    """An interactive multi-turn chat. Each turn re-renders the whole conversation; generate() finds
    the cached prefix, so only the new tokens are prefilled."""
    model = _load(a)
    messages = [{"role": "system", "content": a.system}] if a.system else []
    print(f"qwen2rt chat with {a.model} — /reset clears the conversation, /exit or Ctrl-D leaves.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if a.system else []
            continue
        messages.append({"role": "user", "content": line})
        stream = model.generate(messages, stream=True, **_sampling_kwargs(a))
        reply = []
        try:
            for piece in stream:
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            stream.close()  # stop this answer, keep the conversation
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_serve(a: argparse.Namespace) -> int:
    import os

    from .server import serve

    model = _load(a)
    name = a.model_name or os.path.basename(os.path.normpath(a.model))
    return serve(model, host=a.host, port=a.port, model_name=name, verbose=a.verbose, max_batch=a.max_batch)


def cmd_pull(a: argparse.Namespace) -> int:
    from . import registry

    names = a.names or [registry.DEFAULT_MODEL]
    for name in names:
        path = registry.pull(name, force=a.force)
        print(path)
    return 0


def cmd_list(a: argparse.Namespace) -> int:
    from . import registry

    for name, m in registry.MODELS.items():
        state = "pulled" if registry.is_pulled(name) else "not pulled"
        print(f"{name:<32} {state:<11} {m.description}")
    return 0


def cmd_perplexity(a: argparse.Namespace) -> int:
    from . import perplexity as ppl
    from .model import Model

    if a.max_context is None:
        a.max_context = a.ctx  # one window at a time: no need for the model's full context
    model = _load(a)
    text = "".join(open(f, encoding="utf-8", errors="replace").read() for f in a.files)
    ids = model.tokenize(text, add_special_tokens=False)
    reference = None
    if a.kl_divergence:
        if a.kl_divergence.endswith(".npz"):
            reference = ppl.saved_reference(a.kl_divergence)
        else:
            ref_model = Model(a.kl_divergence, dtype=a.ref_dtype, threads=a.threads, max_context=a.ctx)
            reference = ppl.model_reference(ref_model)
    kept: list | None = [] if a.save_logprobs else None

    def progress(done: int, total: int) -> None:
        if not a.json:
            print(f"\rwindow {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    score = ppl.evaluate(model, ids, ctx=a.ctx, max_windows=a.windows, reference=reference,
                         on_window=progress, keep_logprobs=kept)
    if a.save_logprobs:
        ppl.save_logprobs(a.save_logprobs, ids, a.ctx, kept)
    if a.json:
        print(json.dumps({"model": a.model, "dtype": a.dtype, **score.as_dict()}))
        return 0
    print(f"perplexity {score.perplexity:.4f} ± {score.perplexity_stderr:.4f} over {score.tokens} tokens "
          f"({score.windows} windows of {score.ctx})")
    if score.mean_kl is not None:
        print(f"KL divergence vs {a.kl_divergence}: mean {score.mean_kl:.6f}, 99th percentile "
              f"{score.p99_kl:.6f}, max {score.max_kl:.6f}; top-1 agreement {100 * score.top1_agreement:.2f}%")
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    from .converted import convert

    overrides = dict(kv.split("=", 1) for kv in a.override) if a.override else None
    out = convert(a.src, a.dst, dtype=a.dtype, threads=a.threads, progress=not a.quiet, dtype_overrides=overrides)
    print(out)
    return 0


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def cmd_info(a: argparse.Namespace) -> int:
    import os

    from . import registry, system_info
    from .checkpoint import GGUFCheckpoint
    from .config import Qwen2Config

    path = registry.resolve(a.model, pull_if_missing=False)
    if os.path.isdir(path):
        cfg = Qwen2Config.from_file(os.path.join(path, "config.json"))
    else:
        cfg = GGUFCheckpoint(path).config
    ctx = a.max_context or cfg.max_position_embeddings
    weights = cfg.weight_count()
    from .model import BITS_PER_WEIGHT, KV_DTYPES

    rows = {
        "model": a.model,
        "config": cfg.core_dict(),
        "parameters": weights,
        "weights_bytes": {d: int(weights * bits / 8) for d, bits in BITS_PER_WEIGHT.items()},
        "kv_cache_bytes": {
            "max_context": ctx,
            **{d: {"bytes": cfg.kv_cache_bytes(ctx, n), "per_token": cfg.kv_cache_bytes(1, n)}
               for d, n in KV_DTYPES.items()},
        },
        "system": system_info(),
    }
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"model        {a.model}")
    for k, v in cfg.core_dict().items():
        print(f"  {k:<24} {v}")
    print(f"parameters   {weights / 1e6:.1f} M")
    print("weights      " + ", ".join(f"{_human(n)} as {d}" for d, n in rows["weights_bytes"].items()))
    for d, n in KV_DTYPES.items():
        print(
            f"KV cache     {_human(cfg.kv_cache_bytes(ctx, n))} for {ctx} positions as {d} "
            f"({_human(cfg.kv_cache_bytes(1, n))} per token, per sequence)"
        )
    print("             (f16 is the default cache for bf16/q8/q4 weights, f32 for f32 weights)")
    s = rows["system"]
    print(f"system       isa={s['isa']} (available: {', '.join(s['available_isas'])}), threads={s['threads']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen2rt", description="Run Qwen2-architecture models on the CPU.")
    sub = parser.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="answer one chat message with the default (or given) model, streaming")
    r.add_argument("prompt")
    _add_model_args(r, positional=False)
    r.add_argument("--system", default=None, help="system message")
    r.add_argument("-v", "--verbose", action="store_true")
    _add_sampling_args(r)
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("chat", help="interactive multi-turn chat")
    _add_model_args(c, positional=False)
    c.add_argument("--system", default=None, help="system message")
    _add_sampling_args(c)
    c.set_defaults(func=cmd_chat)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    _add_model_args(sv)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000, help="0 for any free port (default 8000)")
    sv.add_argument("--model-name", default=None, help="the model's id in the API (default: the file or folder name)")
    sv.add_argument("--max-batch", type=int, default=4, metavar="N",
                    help="requests decoded together, each with its own KV cache of --max-context (default 4)")
    sv.add_argument("-v", "--verbose", action="store_true", help="log every request to stderr")
    sv.set_defaults(func=cmd_serve)

    pl = sub.add_parser("pull", help="download a registry model into the cache (checked by sha256)")
    pl.add_argument("names", nargs="*", help="model names (default: the default model)")
    pl.add_argument("--force", action="store_true", help="download again even if present")
    pl.set_defaults(func=cmd_pull)

    ls = sub.add_parser("list", help="the registry's models and whether they are pulled")
    ls.set_defaults(func=cmd_list)

    cv = sub.add_parser("convert", help="quantize a model into a folder that loads by mmap")
    cv.add_argument("src", help="a Hugging Face folder, a GGUF file or a registry name")
    cv.add_argument("dst", help="output folder")
    cv.add_argument("--dtype", default="q4", choices=["q4", "q6", "q8", "bf16", "f32"])
    cv.add_argument("--override", action="append", metavar="PART=DTYPE",
                    help="store matrices whose name contains PART as DTYPE (e.g. lm_head=q8); repeatable")
    cv.add_argument("--threads", type=int, default=None)
    cv.add_argument("-q", "--quiet", action="store_true")
    cv.set_defaults(func=cmd_convert)

    pp = sub.add_parser("perplexity", help="perplexity (and KL divergence against a reference) over text files")
    _add_model_args(pp)
    pp.add_argument("files", nargs="+", help="text files (concatenated)")
    pp.add_argument("--ctx", type=int, default=512, help="window length; the second half of each is scored")
    pp.add_argument("--windows", type=int, default=None, help="at most this many windows")
    pp.add_argument("--kl-divergence", metavar="REF", default=None,
                    help="reference: a model (path or name, run with --ref-dtype) or an .npz of saved log-probs")
    pp.add_argument("--ref-dtype", default="f32", choices=["bf16", "f32", "q8", "q6", "q4"])
    pp.add_argument("--save-logprobs", metavar="NPZ", default=None, help="save this model's log-probs as a reference")
    pp.add_argument("--json", action="store_true")
    pp.set_defaults(func=cmd_perplexity)

    g = sub.add_parser("generate", help="continue a prompt and stream the text")
    _add_model_args(g)
    g.add_argument("prompt")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    g.add_argument("--system", default=None, help="system message (with --chat)")
    g.add_argument("-v", "--verbose", action="store_true", help="print token counts and timing to stderr")
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="print the config and the memory a model needs")
    i.add_argument("model")
    i.add_argument("--max-context", type=int, default=None)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    a = parser.parse_args(argv)
    try:
        return a.func(a)
    except Qwen2rtError as e:
        print(f"qwen2rt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
