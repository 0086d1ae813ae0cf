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
    return subprocess.run([sys.executable, "-m", "qwen2rt", *map(str, args)], capture_output=True, text=True, timeout=120)


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
    assert info["kv_cache_bytes"]["per_token"] == 2 * 3 * 2 * 6 * 4
    r = run("info", folder)
    assert "KV cache" in r.stdout and "parameters" in r.stdout


def test_errors_are_one_line(tmp_path):
    r = run("generate", tmp_path / "nothing", "hi")
    assert r.returncode == 2
    assert r.stderr.startswith("qwen2rt: error:") and "nothing" in r.stderr
    assert "Traceback" not in r.stderr


def test_system_info():
    info = qwen2rt.system_info()
    assert info["isa"] in info["available_isas"]
    assert info["threads"] >= 1
