"""qwen2rt serve: the OpenAI-compatible server, driven end to end by the official openai client."""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import openai
import pytest
import qwen2rt
from qwen2rt.server import Server
from tiny_model import make_checkpoint

NAME = "tiny"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    f = tmp_path_factory.mktemp("serve")
    make_checkpoint(f, shape="gqa", seed=3)
    return f


@pytest.fixture(scope="module")
def ref(folder):
    """A second model on the same weights: the expected outputs, computed beside the server's."""
    return qwen2rt.Model(folder, dtype="f32")


@pytest.fixture(scope="module")
def server(folder):
    s = Server(qwen2rt.Model(folder, dtype="f32"), port=0, model_name=NAME)
    t = threading.Thread(target=s.serve_forever, daemon=True)
    t.start()
    yield s
    s.close()
    t.join(timeout=5)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=30)


class CoreLog:
    """Stands in for the served model's C++ core: records the tokens of each prefill (forward) and
    the rows of each batched decode step (decode_batch), both optionally slowed down; everything
    else goes to the real core."""

    def __init__(self, core, delay: float = 0.0):
        self.prefills: list[int] = []
        self.steps: list[int] = []
        self._core = core
        self._delay = delay

    def forward(self, ids, *args):
        self.prefills.append(len(ids))
        if self._delay:
            time.sleep(self._delay)
        return self._core.forward(ids, *args)

    def decode_batch(self, tokens, seqs):
        self.steps.append(len(tokens))
        if self._delay:
            time.sleep(self._delay)
        return self._core.decode_batch(tokens, seqs)

    def __getattr__(self, name):
        return getattr(self._core, name)


@pytest.fixture
def core_log(server, monkeypatch):
    def install(delay: float = 0.0) -> CoreLog:
        model = server.engine.model
        log = CoreLog(model._core, delay)
        monkeypatch.setattr(model, "_core", log)
        return log

    return install


def raw(server, method: str, path: str, body=None):
    """(status, parsed JSON) of one plain HTTP request; body is a dict or raw bytes."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    out = r.status, json.loads(r.read())
    conn.close()
    return out


def test_models_list(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    assert client.models.retrieve(NAME).owned_by == "qwen2rt"
    assert raw(server, "GET", "/v1/models/other")[0] == 404


def test_completion_equals_generate(client, ref):
    want = ref.generate("def add(a, b):", max_new_tokens=20, temperature=0)
    r = client.completions.create(model=NAME, prompt="def add(a, b):", max_tokens=20, temperature=0)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == NAME
    assert len(r.choices) == 1
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, want.completion_tokens)
    assert r.usage.total_tokens == want.prompt_tokens + want.completion_tokens
    # token ids as the prompt, and OpenAI's default of 16 tokens
    ids = ref.tokenize("def add(a, b):")
    r = client.completions.create(model=NAME, prompt=ids, temperature=0)
    assert r.usage.completion_tokens == 16 and r.choices[0].text == ref.detokenize(want.token_ids[:16], True)


def test_completion_stream(client, ref):
    want = ref.generate("import os\n", max_new_tokens=25, temperature=0)
    chunks = list(client.completions.create(model=NAME, prompt="import os\n", max_tokens=25, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want.text
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # streamed in pieces
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [want.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.completion_tokens
    assert chunks[-1].usage.prompt_tokens == want.prompt_tokens
    # without stream_options, no usage chunk
    chunks = list(client.completions.create(model=NAME, prompt="import os\n", max_tokens=5, stream=True))
    assert all(c.usage is None and c.choices for c in chunks)


def test_chat(client, ref):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime."}]
    want = ref.generate(msgs, max_new_tokens=12, temperature=0)
    assert want.finish_reason == "length"  # a random model: no eos in 12 tokens
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=12, temperature=0)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, 12)
    # max_completion_tokens wins over max_tokens; OpenAI's list-of-text-parts content is the same chat
    parts = [msgs[0], {"role": "user", "content": [{"type": "text", "text": "Name a "},
                                                   {"type": "text", "text": "prime."}]}]
    r = client.chat.completions.create(model=NAME, messages=parts, max_tokens=50, max_completion_tokens=12,
                                       temperature=0)
    assert r.choices[0].message.content == want.text and r.usage.completion_tokens == 12


def test_chat_stream(client, ref):
    msgs = [{"role": "user", "content": "Count to three."}]
    want = ref.generate(msgs, max_new_tokens=15, temperature=0)
    chunks = list(client.chat.completions.create(model=NAME, messages=msgs, max_tokens=15, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].usage.completion_tokens == want.completion_tokens
    assert chunks[-1].usage.total_tokens == want.prompt_tokens + want.completion_tokens


def test_stop_strings(client, ref):
    full = ref.generate("import os\n", max_new_tokens=40, temperature=0)
    assert len(full.text) > 12, full.text
    stop = full.text[5:9]
    cut = full.text[: full.text.index(stop)]
    r = client.completions.create(model=NAME, prompt="import os\n", max_tokens=40, temperature=0,
                                  stop=[stop, "\x00never"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=NAME, prompt="import os\n", max_tokens=40, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"
    # the same in a chat
    msgs = [{"role": "user", "content": "Tell me a story."}]
    full = ref.generate(msgs, max_new_tokens=40, temperature=0)
    stop = full.text[6:9]
    cut = full.text[: full.text.index(stop)]
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=40, temperature=0, stop=stop)
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 40
    chunks = list(client.chat.completions.create(model=NAME, messages=msgs, max_tokens=40, temperature=0,
                                                 stop=[stop], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_is_reproducible(client, ref):
    kw = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20, "temperature": 1.0,
          "top_p": 0.9}
    a = client.chat.completions.create(seed=42, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=42, **kw).choices[0].message.content
    assert a == b == ref.generate(kw["messages"], max_new_tokens=20, temperature=1.0, top_p=0.9, seed=42).text
    others = {client.chat.completions.create(seed=s, **kw).choices[0].message.content for s in range(4)}
    assert len(others) > 1


def send(client, req: dict) -> str:
    """The text one request gets through the openai client, streamed or not."""
    chat = "messages" in req
    r = (client.chat.completions if chat else client.completions).create(model=NAME, **req)
    if not req.get("stream"):
        return r.choices[0].message.content if chat else r.choices[0].text
    return "".join((c.choices[0].delta.content or "") if chat else c.choices[0].text for c in r if c.choices)


def alone(ref, req: dict) -> str:
    """What Model.generate gives for that request by itself."""
    return ref.generate(req.get("messages") or req["prompt"], max_new_tokens=req["max_tokens"],
                        temperature=req.get("temperature"), top_p=req.get("top_p"), seed=req.get("seed"),
                        stop=req.get("stop")).text


def send_together(client, reqs: list[dict]) -> list[str]:
    """Sends every request at once, each from its own thread; their texts in order."""
    got: dict[int, str | Exception] = {}
    start = threading.Barrier(len(reqs))

    def ask(i):
        start.wait()
        try:
            got[i] = send(client, reqs[i])
        except Exception as e:  # noqa: BLE001 - shown by the assert below
            got[i] = e

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    return [got.get(i) for i in range(len(reqs))]


def wait_idle(server, timeout: float) -> bool:
    """Whether the engine runs nothing within `timeout` seconds."""
    end = time.perf_counter() + timeout
    while server.engine.running:
        if time.perf_counter() > end:
            return False
        time.sleep(0.01)
    return True


def test_concurrent_requests_are_batched(client, ref, core_log):
    """Streamed and not, completion and chat, greedy and seeded, different lengths, one cut by a stop
    string: each gets what it would alone, and they were decoded together."""
    story = [{"role": "user", "content": "Tell me a story."}]
    stop = ref.generate(story, max_new_tokens=40, temperature=0).text[6:9]
    reqs = [
        {"prompt": "def fib(n):", "max_tokens": 30, "temperature": 0},
        {"prompt": "class Stack:", "max_tokens": 12, "temperature": 0, "stream": True},
        {"messages": story, "max_tokens": 40, "temperature": 0, "stop": stop, "stream": True},
        {"prompt": "hello", "max_tokens": 25, "temperature": 1.0, "top_p": 0.9, "seed": 11},
    ]
    want = [alone(ref, r) for r in reqs]
    assert len(want[2]) < 10  # the stop string cut it
    log = core_log(delay=0.003)  # ~0.1 s a request: they surely overlap
    assert send_together(client, reqs) == want
    assert max(log.steps) > 1, log.steps  # decode steps that ran several requests at once
    assert max(log.steps) <= 4 and len(log.prefills) == 4


def test_a_new_request_joins_the_running_batch(client, ref, core_log):
    long = {"prompt": "x", "max_tokens": 120, "temperature": 1.0, "seed": 7, "stream": True}
    short = {"prompt": "import os\n", "max_tokens": 10, "temperature": 0, "stream": True}
    want_long, want_short = alone(ref, long), alone(ref, short)
    log = core_log(delay=0.005)  # the long one takes > 0.6 s
    times: dict[str, float] = {}
    got: dict[str, str] = {}

    def ask_short():
        pieces = []
        for c in client.completions.create(model=NAME, **short):
            if c.choices[0].text and not pieces:
                times["short_first"] = time.perf_counter()
            pieces.append(c.choices[0].text)
        times["short_done"] = time.perf_counter()
        got["short"] = "".join(pieces)

    pieces, t = [], None
    for i, c in enumerate(client.completions.create(model=NAME, **long)):
        pieces.append(c.choices[0].text)
        if i == 3:  # the long one is decoding: send the short one
            t = threading.Thread(target=ask_short)
            t.start()
    times["long_done"] = time.perf_counter()
    t.join(timeout=10)
    assert "".join(pieces) == want_long and got["short"] == want_short
    assert times["short_first"] < times["short_done"] < times["long_done"]  # joined, did not wait its turn
    assert log.steps.count(2) >= 9  # the short one's tokens came in steps shared with the long one


def test_stream_disconnect_frees_its_slot_while_another_runs(server, client, ref, core_log):
    gone = {"prompt": "x", "max_tokens": 480, "temperature": 1.0, "seed": 7, "stream": True}
    other = {"prompt": "y", "max_tokens": 80, "temperature": 1.0, "seed": 8}
    want = alone(ref, other)
    log = core_log(delay=0.005)
    stream = client.completions.create(model=NAME, **gone)
    next(iter(stream))
    got = {}
    t = threading.Thread(target=lambda: got.update(text=send(client, other)))
    t.start()
    deadline = time.perf_counter() + 5
    while 2 not in log.steps and time.perf_counter() < deadline:  # until both decode together
        time.sleep(0.002)
    stream.close()
    closed_at = len(log.steps)
    t.join(timeout=10)
    assert got["text"] == want  # the one left is not disturbed
    after = log.steps[closed_at:]
    # the slot was freed within a few tokens; the rest of `other` ran alone
    assert after.count(2) < 20 and after.count(1) > 40, after
    assert wait_idle(server, timeout=1) and server.engine.batch.active == 0


def test_more_requests_than_slots_wait_their_turn(server, client, ref, core_log):
    prompts = ["def fib(n):", "class Stack:", "import os\n", "def add(a, b):", "for i in range(",
               "while True:", "print("]
    reqs = [{"prompt": p, "max_tokens": 8 + 2 * i, "temperature": 0, "stream": i % 2 == 1}
            for i, p in enumerate(prompts)]
    want = [alone(ref, r) for r in reqs]
    log = core_log(delay=0.005)
    assert send_together(client, reqs) == want
    assert max(log.steps) == server.engine.max_batch == 4  # a full batch, never more
    assert len(log.prefills) == len(reqs)
    assert wait_idle(server, timeout=1)


def test_the_server_holds_its_model_until_closed(folder):
    model = qwen2rt.Model(folder, dtype="f32")
    with pytest.raises(qwen2rt.InvalidInputError, match="max_batch"):
        Server(model, port=0, max_batch=0)
    s = Server(model, port=0, max_batch=2)  # the refused one did not keep the model
    t = threading.Thread(target=s.serve_forever, daemon=True)
    t.start()
    with pytest.raises(qwen2rt.ModelBusyError):
        model.generate("x", max_new_tokens=1)
    s.close()  # wakes the idle engine, which lets go of the model
    t.join(timeout=5)
    assert not s.engine.thread.is_alive()
    assert model.generate("x", max_new_tokens=2).completion_tokens == 2


def test_second_chat_turn_prefills_only_new_tokens(client, ref, core_log):
    log = core_log()
    turn1 = [{"role": "system", "content": "You help."}, {"role": "user", "content": "Write a loop in C."}]
    reply = client.chat.completions.create(model=NAME, messages=turn1, max_tokens=10, temperature=0)
    turn2 = turn1 + [{"role": "assistant", "content": reply.choices[0].message.content},
                     {"role": "user", "content": "Now in Python."}]
    ids1, ids2 = ref.tokenizer.encode_chat(turn1), ref.tokenizer.encode_chat(turn2)
    common = next((i for i, (a, b) in enumerate(zip(ids1, ids2)) if a != b), len(ids1))
    assert common >= len(ids1) - 1  # the first turn's prompt starts the second's
    log.prefills.clear()
    r = client.chat.completions.create(model=NAME, messages=turn2, max_tokens=10, temperature=0)
    prefill = log.prefills[0]
    assert 0 < prefill <= len(ids2) - common < len(ids2) // 2, (prefill, len(ids1), len(ids2))
    assert r.usage.prompt_tokens == len(ids2)
    # reusing the cache changes nothing in the answer
    assert r.choices[0].message.content == ref.generate(turn2, max_new_tokens=10, temperature=0).text


ERRORS = [
    # (method, path, body, status, param)
    ("POST", "/v1/chat/completions", b"{not json", 400, None),
    ("POST", "/v1/chat/completions", b"[1, 2]", 400, None),
    ("POST", "/v1/chat/completions", {"model": NAME}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"model": NAME, "messages": []}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": "10"}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "hi", "temperature": 5}, 400, "temperature"),
    ("POST", "/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("POST", "/v1/completions", {"prompt": "hi", "stop": [1, 2]}, 400, "stop"),
    ("POST", "/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("POST", "/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("POST", "/v1/completions", {"prompt": "hi", "logprobs": 3}, 400, "logprobs"),
    ("POST", "/v1/completions", {"prompt": ["one", "two"]}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": [1, 10**9]}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("POST", "/v1/completions", {}, 400, "prompt"),
    ("POST", "/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ("GET", "/v1/chat/completions", None, 405, None),
    ("POST", "/v1/models", {}, 405, None),
    ("GET", "/v1/nothing", None, 404, None),
    ("POST", "/v2/completions", {}, 404, None),
]


@pytest.mark.parametrize("method, path, body, status, param", ERRORS)
def test_bad_requests_get_openai_errors(server, method, path, body, status, param):
    code, err = raw(server, method, path, body)
    assert code == status, err
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["type"] == "invalid_request_error"
    assert err["error"]["param"] == param
    assert err["error"]["message"]
    if status == 404 and param == "model":
        assert err["error"]["code"] == "model_not_found" and "gpt-4" in err["error"]["message"]


def test_keep_alive_survives_errors(server):
    """Requests on one connection: an error (body read or not) never leaves bytes that pass for a request."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    for path, body, status in [("/v1/completions", {"prompt": "hi", "max_tokens": 2}, 200),
                               ("/v1/completions", {"prompt": "hi", "n": 3}, 400),
                               ("/v1/nothing", {"prompt": "GET /v1/models HTTP/1.1"}, 404),
                               ("/v1/completions?x=1", {"prompt": "hi", "max_tokens": 2}, 200)]:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        data = json.loads(r.read())
        assert r.status == status, data
        assert ("error" in data) == (status != 200)
        if r.getheader("Connection") == "close":  # after an error whose body was not read
            conn.close()
    conn.close()


def test_too_long_prompt_is_rejected_with_the_numbers(server, client):
    code, err = raw(server, "POST", "/v1/completions", {"prompt": [5] * 500, "max_tokens": 100})
    assert code == 400 and err["error"]["code"] == "context_length_exceeded"
    msg = err["error"]["message"]
    assert all(str(n) in msg for n in (512, 600, 500, 100)), msg
    # a chat with no max_tokens gets what the context leaves, unless the messages fill it already
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "word " * 600}])
    with pytest.raises(openai.BadRequestError, match="n=2"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], n=2)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hi")
    assert e.value.code == "model_not_found"


def test_stream_disconnect_frees_the_server(server, client, ref, core_log):
    kw = {"max_tokens": 480, "temperature": 1.0, "seed": 7}
    assert ref.generate("x", max_new_tokens=480, temperature=1.0, seed=7).completion_tokens == 480  # no early eos
    log = core_log(delay=0.01)  # 480 tokens would take ~5 s
    stream = client.completions.create(model=NAME, prompt="x", stream=True, **kw)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    r = client.completions.create(model=NAME, prompt="y", max_tokens=5, temperature=0)
    assert r.usage.completion_tokens == 5
    assert wait_idle(server, timeout=2)  # the abandoned generation (~5 s) stopped early
    assert len(log.steps) < 100


def test_non_stream_disconnect_frees_the_server(server, client, core_log):
    log = core_log(delay=0.01)
    host, port = server.server_address[:2]
    body = json.dumps({"model": NAME, "prompt": "x", "max_tokens": 480, "temperature": 1.0, "seed": 7}).encode()
    with socket.create_connection((host, port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.1)  # the generation has started
    r = client.completions.create(model=NAME, prompt="y", max_tokens=5, temperature=0)
    assert r.usage.completion_tokens == 5
    assert wait_idle(server, timeout=2)
    assert len(log.steps) < 100


def test_cli_serve_logs_one_line_and_stops_on_ctrl_c(folder):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(
        [sys.executable, "-m", "qwen2rt", "serve", str(folder), "--dtype", "f32", "--threads", "1",
         "--max-context", "256", "--max-batch", "2", "--port", "0", "--model-name", NAME],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )
    try:
        line = p.stderr.readline().strip()
        m = re.fullmatch(rf"qwen2rt serve: model {re.escape(str(folder))} dtype f32 isa [\w-]+ threads 1 "
                         r"max_context 256 max_batch 2 on (http://127\.0\.0\.1:\d+)", line)
        assert m, line
        with urllib.request.urlopen(m.group(1) + "/v1/models", timeout=10) as r:
            assert json.load(r)["data"][0]["id"] == NAME
        req = urllib.request.Request(m.group(1) + "/v1/completions", method="POST",
                                     data=json.dumps({"prompt": "hi", "max_tokens": 3}).encode())
        with urllib.request.urlopen(req, timeout=10) as r:
            assert json.load(r)["usage"]["completion_tokens"] <= 3
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0
    assert err == "" and out == ""  # nothing per request by default
