"""`qwen2rt serve`: an OpenAI-compatible HTTP server (/v1/models, /v1/completions, /v1/chat/completions).

Standard library only. Three parts:
  - HTTP handler threads parse and check a request, tokenize its prompt, and put a Job on the engine's queue;
  - one engine thread owns the Model through a BatchGenerator (continuous batching): it prefills waiting
    jobs into free KV-cache slots (up to max_batch), then decodes every running job in one step, reading
    each weight once per step for all of them; a job joins or leaves the batch between any two steps.
    It puts text pieces and the final Generation on each job's own queue;
  - the handler thread turns those events into a JSON response or server-sent events.
Each job's output is what Model.generate gives for that request alone (same seed, same greedy tokens).
A client that goes away sets its job's cancel flag; the engine drops that sequence before its next step.
A new request takes the free slot whose cached tokens share the longest prefix with its prompt, so the
next turn of a chat prefills only the new tokens.
"""

from __future__ import annotations

import json
import os
import queue
import select
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from . import _core
from .errors import InvalidInputError
from .generation import Generation
from .model import BatchGenerator

MAX_BODY = 16 << 20  # bytes of JSON a request may send
POLL_S = 0.05  # how often a waiting handler looks whether its client is still there

# Request fields whose OpenAI features qwen2rt does not have: allowed only at their "off" values.
UNSUPPORTED = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "tools": (None, []),
    "functions": (None, []),
    "response_format": (None, {"type": "text"}),
}


class RequestError(InvalidInputError):
    """A request the server refuses; becomes an OpenAI-shaped error response."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One generation request, as the engine sees it."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: dict  # temperature, top_p, top_k, min_p, repetition_penalty, seed, stop
    stream: bool  # whether the handler wants the text pieces as they come
    events: queue.Queue = field(default_factory=queue.Queue)  # ("text", str), ("end", Generation|None), ("error", e)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Engine:
    """Owns the model through one BatchGenerator: one thread admits queued jobs into free KV-cache
    slots and decodes every running job in one batched step, a token for each per step."""

    def __init__(self, model, max_batch: int = 4):
        self.model = model
        self.max_batch = max_batch
        # Held for the engine's lifetime (ModelBusyError for anyone else). Made here, not in the
        # thread, so that a bad max_batch or a KV cache that does not fit fails the server's start.
        self.batch = BatchGenerator(model, max_batch)
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.running: dict[int, Job] = {}  # BatchGenerator handle -> its job
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="qwen2rt-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Ends the running and waiting jobs (their clients get no answer) and the thread, which
        frees the model."""
        self.stopping.set()
        self.jobs.put(None)  # wakes a loop blocked on an empty queue
        if self.thread.is_alive():
            self.thread.join(timeout=5)
        elif not self.thread.ident:  # never started: nothing else will close it
            self._shut()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def _loop(self) -> None:
        try:
            while not self.stopping.is_set():
                self._admit()
                self._drop_cancelled()
                if self.running:
                    self._step()
        finally:
            self._shut()

    def _admit(self) -> None:
        """Prefills queued jobs while slots are free; blocks on the queue when nothing runs."""
        while len(self.running) < self.max_batch and not self.stopping.is_set():
            try:
                job = self.jobs.get(block=not self.running)
            except queue.Empty:
                return
            if job is None:
                continue  # stop()'s wake-up: the loop looks at `stopping`
            if job.cancelled.is_set():  # its client left while it waited
                job.events.put(("end", None))
                continue
            try:
                handle = self.batch.add(job.prompt_ids, job.max_tokens, **job.sampling)
            except Exception as e:  # noqa: BLE001 - reported to that client; the engine goes on
                job.events.put(("error", e))
                continue
            self.running[handle] = job

    def _drop_cancelled(self) -> None:
        """Frees the slots of jobs whose client went away; runs before every step, so a
        generation stops within a token of its cancel flag being set."""
        for handle, job in list(self.running.items()):
            if job.cancelled.is_set():
                self.batch.cancel(handle)
                del self.running[handle]
                job.events.put(("end", None))

    def _step(self) -> None:
        try:
            events = self.batch.step()
        except Exception as e:  # noqa: BLE001 - every running job shares the failed step
            for handle, job in self.running.items():
                self.batch.cancel(handle)
                job.events.put(("error", e))
            self.running.clear()
            return
        for handle, piece, done in events:
            job = self.running[handle]
            if piece and job.stream:
                job.events.put(("text", piece))
            if done is not None:
                del self.running[handle]
                job.events.put(("end", done))

    def _shut(self) -> None:
        """Ends whatever runs or waits, then frees the model."""
        for job in self.running.values():
            job.cancelled.set()
            job.events.put(("end", None))
        self.running.clear()
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancelled.set()
                job.events.put(("end", None))
        self.batch.close()


# -- request parsing ------------------------------------------------------------------------------------


def _int(body: dict, key: str, minimum: int | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(f"{key} must be an integer, got {v!r}", key)
    if minimum is not None and v < minimum:
        raise RequestError(f"{key} must be >= {minimum}, got {v}", key)
    return v


def _float(body: dict, key: str, lo: float, hi: float, lo_open: bool = False) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RequestError(f"{key} must be a number, got {v!r}", key)
    if not (lo < v <= hi if lo_open else lo <= v <= hi):
        raise RequestError(f"{key} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", key)
    return float(v)


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return v
    raise RequestError(f"stop must be a string or a list of strings, got {v!r}", "stop")


def _text_content(content: Any, i: int) -> str:
    """A message's content: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError(f"messages[{i}].content: only text parts are supported, got {part!r}",
                                   f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"messages[{i}].content must be a string or a list of text parts, got {content!r}",
                       f"messages[{i}].content")


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if msgs is None:
        raise RequestError("messages is required", "messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}] must be an object, got {m!r}", f"messages[{i}]")
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system message
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{i}].role must be system, developer, user or assistant, got {role!r}",
                               f"messages[{i}].role")
        out.append({"role": role, "content": _text_content(m.get("content"), i)})
    return out


def _prompt(body: dict, model) -> list[int]:
    """Token ids of a completion prompt: a string, or token ids, or a list holding one of either."""
    p = body.get("prompt")
    if p is None:
        raise RequestError("prompt is required", "prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    elif isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
        raise RequestError(f"prompt holds {len(p)} prompts; qwen2rt serve takes one per request", "prompt")
    if isinstance(p, str):
        ids = model.tokenize(p)
    elif isinstance(p, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
        vocab = model.config.vocab_size
        bad = [x for x in p if not 0 <= x < vocab]
        if bad:
            raise RequestError(f"prompt: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", "prompt")
        ids = list(p)
    else:
        raise RequestError("prompt must be a string, a list of token ids, or a list of one of either", "prompt")
    if not ids:
        raise RequestError("prompt is empty", "prompt")
    return ids


def parse_request(body: Any, chat: bool, model, model_name: str) -> tuple[Job, dict]:
    """Checks an OpenAI request body; returns the engine's Job and what the response needs."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    name = body.get("model")
    if name is not None and name not in (model_name, model.path):
        raise RequestError(f"the model {name!r} does not exist; this server has {model_name!r}", "model",
                           status=404, code="model_not_found")
    for key, off in UNSUPPORTED.items():
        if body.get(key) not in off:
            raise RequestError(f"{key}={body[key]!r} is not supported by qwen2rt serve", key)
    n = _int(body, "n")
    if n not in (None, 1):
        raise RequestError(f"n={n}: qwen2rt serve returns one choice per request (n=1)", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"stream must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise RequestError("stream_options must be an object, and only with stream=true", "stream_options")
    include_usage = bool((options or {}).get("include_usage", False))

    max_tokens = _int(body, "max_tokens", minimum=0)
    if chat:
        max_completion = _int(body, "max_completion_tokens", minimum=0)
        max_tokens = max_completion if max_completion is not None else max_tokens
        ids = model.tokenizer.encode_chat(_messages(body))
        what = "messages"
    else:
        ids = _prompt(body, model)
        what = "prompt"
        if max_tokens is None:
            max_tokens = 16  # OpenAI's default for completions
    ctx = model.max_context
    if max_tokens is None:  # chat: as many as the context leaves
        max_tokens = ctx - len(ids)
        if max_tokens < 1:
            raise RequestError(
                f"model {model_name!r} has a context of {ctx} tokens and the {what} already take {len(ids)}; "
                f"shorten the {what}", what, code="context_length_exceeded")
    elif len(ids) + max_tokens > ctx:
        raise RequestError(
            f"model {model_name!r} has a context of {ctx} tokens, but this request needs {len(ids) + max_tokens}: "
            f"{len(ids)} in the {what} + {max_tokens} max_tokens; shorten the {what} or lower max_tokens",
            what, code="context_length_exceeded")

    seed = _int(body, "seed")
    sampling = {
        "temperature": _float(body, "temperature", 0.0, 2.0),
        "top_p": _float(body, "top_p", 0.0, 1.0, lo_open=True),
        # beyond OpenAI, as vLLM and llama.cpp accept them
        "top_k": _int(body, "top_k", minimum=0),
        "min_p": _float(body, "min_p", 0.0, 1.0),
        "repetition_penalty": _float(body, "repetition_penalty", 0.0, 10.0, lo_open=True),
        "seed": None if seed is None else seed % 2**64,  # OpenAI takes any integer; numpy wants one >= 0
        "stop": _stop(body),
    }
    job = Job(prompt_ids=ids, max_tokens=max_tokens, sampling=sampling, stream=stream)
    return job, {"include_usage": include_usage}


# -- responses --------------------------------------------------------------------------------------------


def _usage(g: Generation) -> dict:
    return {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
            "total_tokens": g.prompt_tokens + g.completion_tokens}


def _as_request_error(e: Exception) -> RequestError:
    """A bad input found late is the client's (400); anything else is the server's (500)."""
    if isinstance(e, RequestError):
        return e
    if isinstance(e, InvalidInputError):
        return RequestError(str(e))
    return RequestError(f"internal error: {type(e).__name__}: {e}", status=500, kind="server_error")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for JSON replies; an event stream closes its connection
    disable_nagle_algorithm = True  # headers and body go out as two writes: don't hold the body for an ACK
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    # -- plumbing
    def _send_json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, e: RequestError) -> None:
        self._send_json(e.status, e.body())

    def _client_gone(self) -> bool:
        """Whether the client closed its end (readable with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _read_json(self) -> Any:
        keep_alive = not self.close_connection
        self.close_connection = True  # until the body is read: what is left of it must not pass for a request
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError("the request needs a Content-Length header and a JSON body", status=411)
        try:
            n = int(length)
        except ValueError:
            raise RequestError(f"bad Content-Length {length!r}") from None
        if not 0 <= n <= MAX_BODY:
            raise RequestError(f"the request body is {n} bytes; at most {MAX_BODY} are accepted", status=413)
        raw = self.rfile.read(n)
        self.close_connection = not keep_alive
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON: {e}") from None

    # -- routes
    @property
    def route(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/")

    def do_GET(self) -> None:
        name = self.server.model_name
        card = {"id": name, "object": "model", "created": self.server.created, "owned_by": "qwen2rt"}
        if self.route == "/v1/models":
            self._send_json(200, {"object": "list", "data": [card]})
        elif self.route.startswith("/v1/models/"):
            asked = self.route[len("/v1/models/"):]
            if asked == name:
                self._send_json(200, card)
            else:
                self._send_error(RequestError(f"the model {asked!r} does not exist; this server has {name!r}",
                                              "model", status=404, code="model_not_found"))
        elif self.route in ("/v1/completions", "/v1/chat/completions"):
            self._method_not_allowed()
        else:
            self._not_found()

    def do_POST(self) -> None:
        if self.route == "/v1/completions":
            self._generate(chat=False)
        elif self.route == "/v1/chat/completions":
            self._generate(chat=True)
        elif self.route.startswith("/v1/models"):
            self._method_not_allowed()
        else:
            self._not_found()

    def do_PUT(self) -> None:
        if self.route.startswith("/v1/"):
            self._method_not_allowed()
        else:
            self._not_found()

    do_DELETE = do_PATCH = do_PUT

    def _not_found(self) -> None:
        self.close_connection = True  # the body, if any, is not read
        self._send_error(RequestError(f"no route {self.path}; this server has /v1/models, /v1/completions and "
                                      f"/v1/chat/completions", status=404, code="not_found"))

    def _method_not_allowed(self) -> None:
        self.close_connection = True
        self._send_error(RequestError(f"{self.command} is not allowed on {self.path}", status=405,
                                      code="method_not_allowed"))

    def _generate(self, chat: bool) -> None:
        model = self.server.engine.model
        try:
            job, extra = parse_request(self._read_json(), chat, model, self.server.model_name)
        except RequestError as e:
            self._send_error(e)
            return
        except InvalidInputError as e:  # from the tokenizer: a chat its template refuses, say
            self._send_error(RequestError(str(e), "messages" if chat else "prompt"))
            return
        except Exception as e:  # noqa: BLE001 - a 500 for the client rather than a dropped connection
            self._send_internal_error(e)
            return
        self.server.engine.submit(job)
        head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.server.model_name,
        }
        if job.stream:
            self._stream(job, head, chat, extra["include_usage"])
        else:
            self._reply(job, head, chat)

    def _wait(self, job: Job):
        """The job's events; cancels it (and ends) if the client closes its connection meanwhile."""
        while True:
            try:
                kind, value = job.events.get(timeout=POLL_S)
            except queue.Empty:
                if self._client_gone():
                    job.cancelled.set()
                    return
                continue
            yield kind, value
            if kind != "text":
                return

    def _reply(self, job: Job, head: dict, chat: bool) -> None:
        for kind, value in self._wait(job):
            if kind == "error":
                self._send_internal_error(value)
            elif kind == "end" and value is not None:
                g: Generation = value
                if chat:
                    choice = {"index": 0, "message": {"role": "assistant", "content": g.text},
                              "logprobs": None, "finish_reason": g.finish_reason}
                else:
                    choice = {"index": 0, "text": g.text, "logprobs": None, "finish_reason": g.finish_reason}
                try:
                    self._send_json(200, {**head, "choices": [choice], "usage": _usage(g)})
                except OSError:
                    pass  # the client left just now

    def _send_internal_error(self, e: Exception) -> None:
        self._send_error(_as_request_error(e))

    def _stream(self, job: Job, head: dict, chat: bool, include_usage: bool) -> None:
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(text: str | None, finish: str | None, role: bool = False) -> dict:
            if chat:
                delta = {} if text is None else {"content": text}
                if role:
                    delta = {"role": "assistant", **delta}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {**head, "choices": [choice]}

        def send(obj: dict | str) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
            self.wfile.write(f"data: {data}\n\n".encode())

        self.close_connection = True
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            if chat:
                send(chunk("", None, role=True))
            for kind, value in self._wait(job):
                if kind == "text":
                    send(chunk(value, None))
                elif kind == "error":
                    send(_as_request_error(value).body())
                elif value is not None:
                    send(chunk(None, value.finish_reason))
                    if include_usage:
                        send({**head, "choices": [], "usage": _usage(value)})
                    send("[DONE]")
        except OSError:  # BrokenPipe, ConnectionReset: the client left; stop its generation
            job.cancelled.set()


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a handler thread stuck on a silent client must not hold up shutdown

    def __init__(self, model, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
                 verbose: bool = False, max_batch: int = 4):
        try:
            super().__init__((host, port), Handler)
        except OSError as e:
            raise InvalidInputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        try:
            self.engine = Engine(model, max_batch)
        except BaseException:  # a bad max_batch, or a KV cache that does not fit: free the port
            self.server_close()
            raise
        self.model_name = model_name or os.path.basename(os.path.normpath(model.path))
        self.verbose = verbose
        self.created = int(time.time())
        self.engine.start()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def startup_line(self) -> str:
        m = self.engine.model
        return (f"qwen2rt serve: model {m.path} dtype {m.dtype} isa {_core.active_isa()} threads {m.threads} "
                f"max_context {m.max_context} max_batch {self.engine.max_batch} on {self.url}")

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that left is no error
            super().handle_error(request, client_address)

    def close(self) -> None:
        """Stops a server running serve_forever in another thread."""
        self.shutdown()
        self.server_close()
        self.engine.stop()


def serve(model, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          verbose: bool = False, max_batch: int = 4) -> int:
    """Serves `model` until Ctrl-C, decoding up to `max_batch` requests at once."""
    server = Server(model, host, port, model_name, verbose, max_batch)
    print(server.startup_line(), file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.engine.stop()
    return 0
