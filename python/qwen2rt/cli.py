"""The qwen2rt command line: generate, info."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .errors import Qwen2rtError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a Hugging Face model folder")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f32"], help="weight type in memory (default bf16)")
    p.add_argument("--threads", type=int, default=None, help="threads (default: the cores available)")
    p.add_argument("--max-context", type=int, default=None, help="KV cache positions (default: the model's)")


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
    from .model import Model

    return Model(a.model, dtype=a.dtype, threads=a.threads, max_context=a.max_context)


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


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def cmd_info(a: argparse.Namespace) -> int:
    import os

    from . import system_info
    from .config import Qwen2Config

    cfg = Qwen2Config.from_file(os.path.join(a.model, "config.json"))
    ctx = a.max_context or cfg.max_position_embeddings
    weights = cfg.weight_count()
    rows = {
        "model": a.model,
        "config": cfg.core_dict(),
        "parameters": weights,
        "weights_bytes": {"f32": weights * 4, "bf16": weights * 2},
        "kv_cache_bytes": {"max_context": ctx, "bytes": cfg.kv_cache_bytes(ctx), "per_token": cfg.kv_cache_bytes(1)},
        "system": system_info(),
    }
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"model        {a.model}")
    for k, v in cfg.core_dict().items():
        print(f"  {k:<24} {v}")
    print(f"parameters   {weights / 1e6:.1f} M")
    print(f"weights      {_human(weights * 2)} as bf16, {_human(weights * 4)} as f32")
    print(
        f"KV cache     {_human(cfg.kv_cache_bytes(ctx))} for {ctx} positions "
        f"({_human(cfg.kv_cache_bytes(1))} per token, f32)"
    )
    s = rows["system"]
    print(f"system       isa={s['isa']} (available: {', '.join(s['available_isas'])}), threads={s['threads']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen2rt", description="Run Qwen2-architecture models on the CPU.")
    sub = parser.add_subparsers(dest="command", required=True)

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
