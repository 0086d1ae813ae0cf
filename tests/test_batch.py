"""Batched generation: several sequences decoded in one step, each as it would be alone."""

import numpy as np
import pytest

import qwen2rt
from isa_paths import TILE_ISAS
from qwen2rt.model import BatchGenerator
from tiny_model import make_checkpoint


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    f = tmp_path_factory.mktemp("batch")
    make_checkpoint(f, shape="gqa", seed=5)
    return f


@pytest.fixture(scope="module", params=["f32", "q8"])
def model(request, folder):
    return qwen2rt.Model(folder, dtype=request.param, max_context=256)


PROMPTS = ["def add(a, b):", "x", "import numpy as np\nimport os\n\nclass Foo:", list(range(5, 16))]


def skip_if_length_dependent(model):
    """On AMX a q8 prompt of 16 tokens or more runs on bf16 tiles, fewer on the integer kernels. Alone,
    a prompt reuses the cached prefix the previous one left in slot 0 and runs only its new tokens;
    in a batch it runs whole: the arithmetic, not the batching, differs."""
    if model.dtype != "f32" and qwen2rt._core.active_isa() in TILE_ISAS:
        pytest.skip("a prompt's arithmetic depends on how many of its tokens run (AMX tiles)")


def test_batch_equals_one_at_a_time(model, isa):
    """Prompts of different lengths and limits; each stops on its own (length, stop string, eos)."""
    skip_if_length_dependent(model)
    kw = [dict(max_new_tokens=12), dict(max_new_tokens=30), dict(max_new_tokens=5), dict(max_new_tokens=20)]
    alone = [model.generate(p, temperature=0, **k) for p, k in zip(PROMPTS, kw)]
    # one batch with a common max_new_tokens, cut by stop strings that end some sequences early
    stops = [alone[0][:3]] if len(alone[0]) >= 3 else None
    want = [model.generate(p, max_new_tokens=25, temperature=0, stop=stops) for p in PROMPTS]
    got = model.generate(PROMPTS, max_new_tokens=25, temperature=0, stop=stops)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [str(g) for g in got] == [str(w) for w in want]
    assert [g.finish_reason for g in got] == [w.finish_reason for w in want]
    assert [g.prompt_tokens for g in got] == [w.prompt_tokens for w in want]


def test_batch_sampling_with_seed_equals_alone(model):
    skip_if_length_dependent(model)
    kw = dict(max_new_tokens=15, temperature=0.9, top_p=0.9, seed=123)
    want = [model.generate(p, **kw).token_ids for p in PROMPTS]
    assert [g.token_ids for g in model.generate(PROMPTS, **kw)] == want


def test_batch_logits_equal_single_forward(model):
    """decode_batch rows are the logits each sequence gets alone (the same kernels per row)."""
    core = model._core
    core.set_sequences(max(3, core.sequences))
    ids = [[3, 4, 5, 6], [7, 8], [9, 10, 11]]
    for s, p in enumerate(ids):
        core.forward(np.array(p, np.int32), 0, False, s)
    got = core.decode_batch(np.array([20, 21, 22], np.int32), np.array([0, 1, 2], np.int32))
    for s, p in enumerate(ids):
        model.reset()
        want = model.forward(p + [20 + s])
        np.testing.assert_allclose(got[s], want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_continuous_batching_join_and_cancel(model):
    want = [model.generate(p, max_new_tokens=16, temperature=0) for p in PROMPTS[:3]]
    got = {}
    with BatchGenerator(model, max_batch=2) as b:
        h0 = b.add(PROMPTS[0], max_new_tokens=16, temperature=0)
        h_cancel = b.add("to be cancelled", max_new_tokens=100, temperature=0)
        pieces = {h0: []}
        for step in range(100):
            if step == 3:
                b.cancel(h_cancel)
                h2 = b.add(PROMPTS[2], max_new_tokens=16, temperature=0)  # joins mid-way, in the freed slot
                pieces[h2] = []
            if not b.active:
                break
            for h, piece, done in b.step():
                assert h != h_cancel or step < 3
                if h in pieces:
                    pieces[h].append(piece)
                if done is not None:
                    got[h] = done
        with pytest.raises(qwen2rt.InvalidInputError, match="full"):
            b.add("a", max_new_tokens=1)
            b.add("b", max_new_tokens=1)
            b.add("c", max_new_tokens=1)
    assert got[h0].token_ids == want[0].token_ids and "".join(pieces[h0]) == want[0]
    assert got[h2].token_ids == want[2].token_ids and "".join(pieces[h2]) == want[2]


def test_follow_up_reuses_its_slot_prefix(model):
    """A request that extends an earlier one (the next chat turn) lands in that sequence's slot and
    prefills only the new tokens."""
    first = [5, 6, 7, 8, 9, 10, 11, 12]
    calls = []
    core = model._core

    class Spy:
        def __getattr__(self, name):
            return getattr(core, name)

        def forward(self, ids, start, all_logits, seq):
            calls.append((len(ids), start, seq))
            return core.forward(ids, start, all_logits, seq)

    with BatchGenerator(model, max_batch=3) as b:
        b.add([1, 2, 3, 4], max_new_tokens=2, temperature=0)
        b.add(first, max_new_tokens=4, temperature=0)
        while b.active:
            b.step()
    r = None
    model._core = Spy()
    try:
        with BatchGenerator(model, max_batch=3) as b:
            b.add(first + [13, 14, 15], max_new_tokens=2, temperature=0)
            while b.active:
                for _, _, done in b.step():
                    r = done or r
    finally:
        model._core = core
    n, start, _ = calls[-1]
    assert start >= len(first) and n == len(first) + 3 - start
    assert r.token_ids == model.generate(first + [13, 14, 15], max_new_tokens=2, temperature=0).token_ids


def test_batch_holds_the_model(model):
    b = BatchGenerator(model, max_batch=2)
    with pytest.raises(qwen2rt.ModelBusyError):
        model.generate("x", max_new_tokens=1)
    b.close()
    model.generate("x", max_new_tokens=1)


def test_decode_batch_checks_its_input(model):
    core = model._core
    core.set_sequences(max(2, core.sequences))
    with pytest.raises(qwen2rt.InvalidInputError, match="repeated"):
        core.decode_batch(np.array([1, 2], np.int32), np.array([0, 0], np.int32))
    with pytest.raises(qwen2rt.InvalidInputError, match="out of range"):
        core.decode_batch(np.array([1], np.int32), np.array([99], np.int32))
    with pytest.raises(qwen2rt.InvalidInputError, match="vocabulary"):
        core.decode_batch(np.array([10**6], np.int32), np.array([0], np.int32))
    with pytest.raises(qwen2rt.InvalidInputError, match="stream"):
        model.generate(["a", "b"], stream=True)
