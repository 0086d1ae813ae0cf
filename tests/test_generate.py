"""generate(): streaming, stop strings, eos lists, sampling, seeds, chat prompts."""

import json
import threading

import numpy as np
import pytest
import torch

import qwen2rt
from qwen2rt import _core
from qwen2rt.generation import IncrementalDetokenizer, StopStrings
from tiny_model import make_checkpoint


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    f = tmp_path_factory.mktemp("gen")
    make_checkpoint(f, shape="gqa", seed=3)
    return f


@pytest.fixture(scope="module")
def model(folder):
    return qwen2rt.Model(folder, dtype="f32")


def test_stream_equals_non_stream(model):
    full = model.generate("def add(a, b):", max_new_tokens=40, temperature=0)
    stream = model.generate("def add(a, b):", max_new_tokens=40, temperature=0, stream=True)
    pieces = list(stream)
    assert "".join(pieces) == full.text
    assert stream.result.token_ids == full.token_ids
    assert stream.result.text == full.text
    assert all(pieces)  # no empty pieces
    assert full.text == model.detokenize(full.token_ids, skip_special_tokens=True)
    assert full.prompt_tokens == len(model.tokenize("def add(a, b):"))
    assert full.completion_tokens == len(full.token_ids)


def test_result_is_a_str(model):
    r = model.generate("hello", max_new_tokens=5, temperature=0)
    assert isinstance(r, str)
    assert r == r.text
    assert r.finish_reason in ("stop", "length")


def test_max_new_tokens(model):
    r = model.generate("x = ", max_new_tokens=7, temperature=0)
    assert r.completion_tokens <= 7
    if r.finish_reason == "length":
        assert r.completion_tokens == 7
    assert model.generate("x = ", max_new_tokens=0).token_ids == []


def test_stop_string_cuts_the_text(model):
    full = model.generate("import os\n", max_new_tokens=40, temperature=0)
    assert len(full.text) > 12, full.text
    stop = full.text[5:9]
    first = full.text.index(stop)
    r = model.generate("import os\n", max_new_tokens=40, temperature=0, stop=[stop, "\x00never"])
    assert r.text == full.text[:first]
    assert r.finish_reason == "stop"
    streamed = "".join(model.generate("import os\n", max_new_tokens=40, temperature=0, stop=stop, stream=True))
    assert streamed == r.text


def test_eos_list_stops_generation(folder, tmp_path):
    m = qwen2rt.Model(folder, dtype="f32")
    free = m.generate("print(", max_new_tokens=20, temperature=0)
    assert len(free.token_ids) >= 6
    # Declare the 6th generated token an eos id (beside the real ones): generation stops before it.
    gen = json.loads((folder / "generation_config.json").read_text())
    gen["eos_token_id"] = [12345678, free.token_ids[5]]
    (folder / "generation_config.json").write_text(json.dumps(gen))
    try:
        m2 = qwen2rt.Model(folder, dtype="f32")
        r = m2.generate("print(", max_new_tokens=20, temperature=0)
        first = free.token_ids.index(free.token_ids[5])
        assert r.token_ids == free.token_ids[:first]
        assert r.finish_reason == "stop"
    finally:
        gen["eos_token_id"] = list(m.eos_token_ids)
        (folder / "generation_config.json").write_text(json.dumps(gen))


def test_leaving_the_stream_stops_generation(model):
    stream = model.generate("a", max_new_tokens=200, temperature=1.0, seed=1, stream=True)
    prompt_len = len(model.tokenize("a"))
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    assert model.cache_len < prompt_len + 100  # far from the 200 asked for
    with pytest.raises(StopIteration):
        next(stream)
    assert stream.result is None


def test_seed_is_reproducible(model):
    kw = dict(max_new_tokens=30, temperature=1.0, top_k=50, top_p=0.95, seed=1234)
    a = model.generate("The", **kw)
    b = model.generate("The", **kw)
    assert a.token_ids == b.token_ids
    others = {tuple(model.generate("The", **{**kw, "seed": s}).token_ids) for s in range(5)}
    assert len(others) > 1


def test_top_k_1_is_greedy(model):
    greedy = model.generate("for i in", max_new_tokens=20, temperature=0)
    sampled = model.generate("for i in", max_new_tokens=20, temperature=0.8, top_k=1, seed=5)
    assert sampled.token_ids == greedy.token_ids


def test_repetition_penalty_matches_transformers(folder):
    from transformers import Qwen2ForCausalLM

    ref = Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = list(range(10, 30))
    eos = list(ref.config.eos_token_id)
    with torch.no_grad():
        want = ref.generate(
            torch.tensor([prompt]), max_new_tokens=24, do_sample=False, repetition_penalty=1.5,
            eos_token_id=eos, pad_token_id=eos[0],
        )[0, len(prompt):].tolist()
    if want and want[-1] in eos:
        want = want[:-1]
    m = qwen2rt.Model(folder, dtype="f32")
    assert m.generate(prompt, max_new_tokens=24, temperature=0, repetition_penalty=1.5).token_ids == want


def test_sampler_distribution_respects_filters():
    s = _core.Sampler()
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05], dtype=np.float32))
    hist = np.zeros(0, dtype=np.int32)
    rng = np.random.default_rng(0)

    def draw(**kw):
        args = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
        args.update(kw)
        return np.bincount(
            [s.sample(logits, args["temperature"], args["top_k"], args["top_p"], args["min_p"],
                      args["repetition_penalty"], hist, rng.random()) for _ in range(4000)],
            minlength=5,
        ) / 4000

    freq = draw()
    np.testing.assert_allclose(freq, [0.5, 0.2, 0.15, 0.1, 0.05], atol=0.03)
    assert set(np.flatnonzero(draw(top_k=2))) == {0, 1}
    assert set(np.flatnonzero(draw(top_p=0.8))) == {0, 1, 2}  # 0.5 + 0.2 < 0.8 <= 0.85
    assert set(np.flatnonzero(draw(min_p=0.29))) == {0, 1, 2}  # >= 0.29 * 0.5
    assert set(np.flatnonzero(draw(temperature=0.05))) == {0}
    # the penalty divides a positive logit / multiplies a negative one, once per distinct token
    assert s.sample(np.array([2.0, 1.5], np.float32), 0.0, 0, 1.0, 0.0, 2.0, np.array([0, 0, 0], np.int32), 0.5) == 1


def test_sampler_large_vocab_top_p():
    # the nucleus reaches past the first 256 sorted candidates: the full sort path
    s = _core.Sampler()
    logits = np.zeros(151936, dtype=np.float32)
    picks = {s.sample(logits, 1.0, 0, 0.9, 0.0, 1.0, np.zeros(0, np.int32), u) for u in np.linspace(0, 0.999, 50)}
    assert len(picks) > 40
    assert max(picks) < 151936


def test_chat_messages_prompt(model):
    msgs = [{"role": "user", "content": "Write a haiku about CPUs."}]
    rendered = model.apply_chat_template(msgs)
    assert rendered.endswith("<|im_start|>assistant\n")
    a = model.generate(msgs, max_new_tokens=10, temperature=0)
    b = model.generate(model.tokenizer.encode_chat(msgs), max_new_tokens=10, temperature=0)
    assert a.token_ids == b.token_ids
    assert a.prompt_tokens == len(model.tokenizer.encode_chat(msgs))


def test_multibyte_text_streams_whole_characters(model):
    text = "中文测试 😀👍🏽 naïve café ∑∫ — 日本語"
    ids = model.tokenize(text)
    detok = IncrementalDetokenizer(model.tokenizer.decode)
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    # some token ends inside a character: that piece waits for the rest
    assert "" in pieces[:-1]


def test_random_bytes_stream_equals_decode(model):
    # Random tokens make broken UTF-8: the stream must still concatenate to the full decode.
    rng = np.random.default_rng(2)
    ids = rng.integers(0, model.tokenizer.vocab_size - 3, 300).tolist()
    detok = IncrementalDetokenizer(model.tokenizer.decode)
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == model.tokenizer.decode(ids)


def test_stop_strings_hold_back_partial_matches():
    s = StopStrings(["STOP", "END!"])
    out = []
    for piece in ["hello S", "TO", "x E", "N", "D", "!tail"]:
        shown, hit = s.feed(piece)
        out.append(shown)
        if hit:
            break
    assert "".join(out) == "hello STOx "
    assert hit


def test_two_models_in_two_threads(folder):
    """The GIL is released in C++: two models generate at once, each as it would alone."""
    a = qwen2rt.Model(folder, dtype="f32", threads=1)
    b = qwen2rt.Model(folder, dtype="bf16", threads=1)
    want_a = a.generate("abc", max_new_tokens=30, temperature=0).token_ids
    want_b = b.generate("xyz", max_new_tokens=30, temperature=0).token_ids
    got = {}

    def run(name, m, p):
        for _ in range(3):
            got.setdefault(name, []).append(m.generate(p, max_new_tokens=30, temperature=0).token_ids)

    ts = [threading.Thread(target=run, args=("a", a, "abc")), threading.Thread(target=run, args=("b", b, "xyz"))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert got["a"] == [want_a] * 3
    assert got["b"] == [want_b] * 3


def test_one_model_from_two_threads_is_refused_not_corrupted(folder):
    """A second thread gets ModelBusyError while a generation holds the model; the first
    generation's output is what it would be alone, and the model works afterwards."""
    m = qwen2rt.Model(folder, dtype="f32", threads=1)
    want = m.generate("abc", max_new_tokens=20, temperature=0)
    stream = m.generate("abc", max_new_tokens=20, temperature=0, stream=True)
    first = next(stream)  # the stream now holds the model
    errors = []

    def other():
        for call in (lambda: m.generate("xyz", max_new_tokens=5), lambda: m.forward([1, 2]), m.reset):
            try:
                call()
            except qwen2rt.ModelBusyError as e:
                errors.append(str(e))

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert len(errors) == 3 and "another thread" in errors[0]
    assert first + "".join(stream) == want
    # free again once the stream has ended
    assert m.generate("abc", max_new_tokens=20, temperature=0).token_ids == want.token_ids


def test_closed_or_dropped_stream_frees_the_model(folder):
    m = qwen2rt.Model(folder, dtype="f32", threads=1)
    s = m.generate("abc", max_new_tokens=50, temperature=0, stream=True)
    next(s)
    s.close()
    m.forward([1, 2, 3])
    s = m.generate("abc", max_new_tokens=50, temperature=0, stream=True)
    next(s)
    del s  # garbage-collected mid-stream
    m.forward([1, 2, 3])


def test_drop_oldest_keeps_the_newest_tokens(folder):
    m = qwen2rt.Model(folder, dtype="f32", max_context=32)
    ids = list(range(3, 43))  # 40 tokens > 32
    with pytest.raises(qwen2rt.ContextLengthError, match="drop_oldest"):
        m.generate(ids, max_new_tokens=4)
    r = m.generate(ids, max_new_tokens=4, temperature=0, drop_oldest=True)
    assert r.prompt_tokens == 28 and r.completion_tokens == 4
    assert list(m._core.cached_tokens[:28]) == ids[-28:]
    # the same as giving the newest 28 tokens yourself
    assert m.generate(ids[-28:], max_new_tokens=4, temperature=0).token_ids == r.token_ids
    # a huge max_new_tokens still keeps half the context for the prompt
    r = m.generate(ids, max_new_tokens=1000, temperature=0, drop_oldest=True)
    assert r.prompt_tokens == 16


def test_exactly_max_context_prompt(folder):
    m = qwen2rt.Model(folder, dtype="f32", max_context=24)
    assert m.forward(list(range(1, 25))).shape == (m.config.vocab_size,)
    with pytest.raises(qwen2rt.ContextLengthError, match="max_context=24"):
        m.forward(list(range(1, 26)))


def test_chat_keeps_history_and_prefills_only_the_new_turn(folder):
    m = qwen2rt.Model(folder, dtype="f32", threads=1)
    chat = m.chat(system="be brief")
    r1 = chat.say("hello there", max_new_tokens=8, temperature=0)
    assert [x["role"] for x in chat.messages] == ["system", "user", "assistant"]
    assert chat.messages[-1]["content"] == str(r1)

    seen = []
    core = m._core

    class Spy:  # records the positions each prefill starts at
        def __getattr__(self, name):
            return getattr(core, name)

        def forward(self, ids, start, all_logits=False, seq=0):
            seen.append((len(ids), start))
            return core.forward(ids, start, all_logits, seq)

    m._core = Spy()
    try:
        stream = chat.say("and again", max_new_tokens=8, temperature=0, stream=True)
        text = "".join(stream)
    finally:
        m._core = core
    n_new, start = seen[0]
    full = m.tokenizer.encode_chat(chat.messages[:-1], add_generation_prompt=True)
    assert start > 0 and start + n_new == len(full)  # the history before the new turn was not run again
    assert chat.messages[-1] == {"role": "assistant", "content": text}
    # the same reply as a cold start from the whole conversation
    m.reset()
    assert m.generate(chat.messages[:-1], max_new_tokens=8, temperature=0) == text
