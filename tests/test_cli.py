"""The qwen2rt command line."""

import json
import subprocess
import sys

import pytest

import qwen2rt
from tiny_model import make_checkpoint


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    f = tmp_path_factory.mktemp("cli")
    make_checkpoint(f, shape="gqa", seed=5)
    return f


def run(*args):
    cmd = [sys.executable, "-m", "qwen2rt", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_generate_streams_the_same_text(folder):
    want = qwen2rt.Model(folder).generate("def f(x):", max_new_tokens=12, temperature=0).text
    r = run("generate", folder, "def f(x):", "-n", 12, "--temperature", 0)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"


def test_generate_chat(folder):
    m = qwen2rt.Model(folder)
    want = m.generate([{"role": "user", "content": "hi"}], max_new_tokens=8, temperature=0).text
    r = run("generate", folder, "hi", "--chat", "-n", 8, "--temperature", 0)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"


def test_info(folder):
    r = run("info", folder, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["config"]["num_attention_heads"] == 14
    per_token = 2 * 3 * 2 * 6  # K and V, layers, kv heads, head_dim
    assert info["kv_cache_bytes"]["f16"]["per_token"] == per_token * 2
    assert info["kv_cache_bytes"]["f32"]["per_token"] == per_token * 4
    assert info["weights_bytes"]["q8"] < info["weights_bytes"]["bf16"] < info["weights_bytes"]["f32"]
    r = run("info", folder)
    assert "KV cache" in r.stdout and "parameters" in r.stdout


def test_errors_are_one_line(tmp_path):
    r = run("generate", tmp_path / "nothing", "hi")
    assert r.returncode == 2
    assert r.stderr.startswith("qwen2rt: error:") and "nothing" in r.stderr
    assert "Traceback" not in r.stderr


def test_system_info():
    info = qwen2rt.system_info()
    assert info["isa"] in info["available_isas"] + qwen2rt._core.emulated_isas()  # QWEN2RT_ISA may name one
    assert info["threads"] >= 1


def test_run_is_a_chat_turn(folder):
    m = qwen2rt.Model(folder)
    want = m.generate([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                      max_new_tokens=8, temperature=0).text
    r = run("run", "hi", "-m", folder, "--system", "Be brief.", "-n", 8, "--temperature", 0)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"


def test_chat_reads_turns_until_eof(folder):
    m = qwen2rt.Model(folder)
    msgs = [{"role": "user", "content": "one"}]
    first = m.generate(msgs, max_new_tokens=6, temperature=0).text
    msgs += [{"role": "assistant", "content": first}, {"role": "user", "content": "two"}]
    second = m.generate(msgs, max_new_tokens=6, temperature=0).text
    p = subprocess.run([sys.executable, "-m", "qwen2rt", "chat", "-m", str(folder), "-n", "6", "--temperature", "0"],
                       input="one\ntwo\n/reset\n", capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.replace("> ", "") == first + "\n" + second + "\n"


def test_unknown_model_name_lists_known_ones():
    r = run("run", "hi", "-m", "qwen9-1t")
    assert r.returncode == 2
    assert "qwen2.5-coder-0.5b-instruct" in r.stderr


def test_list():
    r = run("list")
    assert r.returncode == 0 and "qwen2.5-coder-0.5b-instruct" in r.stdout


def test_perplexity_and_saved_reference(folder, tmp_path):
    text = tmp_path / "t.txt"
    import inspect
    import textwrap

    text.write_text(inspect.getsource(textwrap))
    ref = tmp_path / "ref.npz"
    r = run("perplexity", folder, text, "--ctx", 64, "--windows", 3, "--dtype", "f32", "--save-logprobs", ref, "--json")
    assert r.returncode == 0, r.stderr
    base = json.loads(r.stdout)
    assert base["tokens"] == 3 * 32 and base["perplexity"] > 1
    # the same model against its own saved log-probs: no divergence
    r = run("perplexity", folder, text, "--ctx", 64, "--windows", 3, "--dtype", "f32", "--kl-divergence", ref, "--json")
    s = json.loads(r.stdout)
    assert s["mean_kl"] < 1e-6 and s["top1_agreement"] == 1.0
    assert abs(s["perplexity"] - base["perplexity"]) < 1e-3 * base["perplexity"]
    # bf16 weights against the f32 model: a small, non-zero divergence
    r = run("perplexity", folder, text, "--ctx", 64, "--windows", 3, "--dtype", "bf16", "--kl-divergence", folder,
            "--json")
    s = json.loads(r.stdout)
    assert 0 < s["mean_kl"] < 0.05
