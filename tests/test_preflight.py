"""Preflight before loading weights: an unreachable hub with an uncached model, and a model
too large for the device, each refused in one clear line (no network needed: the hub is
forced offline or pointed at a closed local port; sizes come from config files)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from codedistill.errors import ConfigError
from codedistill.models import preflight as pf
from codedistill.models.registry import resolve_model

# bigcode/starcoder2-15b's config.json (the fields that set its size)
STARCODER2_15B = {
    "architectures": ["Starcoder2ForCausalLM"],
    "model_type": "starcoder2",
    "hidden_size": 6144,
    "intermediate_size": 24576,
    "num_attention_heads": 48,
    "num_hidden_layers": 40,
    "num_key_value_heads": 4,
    "vocab_size": 49152,
    "max_position_embeddings": 16384,
    "use_bias": True,
    "hidden_act": "gelu_pytorch_tanh",
    "norm_epsilon": 1e-05,
    "rope_theta": 100000,
    "sliding_window": 4096,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
# what transformers instantiates from that config on the meta device (sum of p.numel())
STARCODER2_15B_PARAMS = 15_655_899_136


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    pf._checked.clear()
    monkeypatch.delenv(pf.SKIP_ENV, raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    yield
    pf._checked.clear()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _one_line_with(msg: str, *parts: str) -> None:
    assert "\n" not in msg, msg
    for p in parts:
        assert p in msg, (p, msg)


def test_offline_uncached_hub_model_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    spec = resolve_model("StarCoder2-15B")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        pf.preflight(spec, device="cpu")
    print(f"offline refusal in {time.perf_counter() - t0:.3f} s")
    _one_line_with(
        str(e.value),
        "StarCoder2-15B",
        "bigcode/starcoder2-15b",
        "HF_HUB_OFFLINE is set",
        "unreachable",
        "not cached",
        "save_pretrained",
        "HF_HUB_OFFLINE=1",
        "--backend vllm|openai",
    )


def test_unreachable_hub_is_probed_not_waited_for(monkeypatch, tmp_path):
    """No HF_HUB_OFFLINE: the probe itself finds the hub unreachable (a closed local port
    stands for the unreachable hub, on any machine)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    ok, why = pf.hub_reachable()
    assert not ok and endpoint in why
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        pf.preflight(resolve_model("Qwen2.5-Coder-7B"), device="cpu")
    print(f"probe + refusal in {time.perf_counter() - t0:.3f} s")
    _one_line_with(str(e.value), "Qwen2.5-Coder-7B (Qwen/Qwen2.5-Coder-7B)", endpoint, "not cached")


def test_reachable_hub_answers_the_probe(monkeypatch):
    class Ok(BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        assert pf.hub_reachable() == (True, "")
    finally:
        server.shutdown()
        server.server_close()


def test_cli_says_it_in_one_line_and_writes_no_run_dir(tmp_path):
    """The plan's step-1 command with a hub model this machine cannot get: exit 2, one
    error line, no traceback, nothing written."""
    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    t0 = time.perf_counter()
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "codedistill",
            "baseline",
            "--model-name",
            "StarCoder2-15B",
            "--dataset",
            "synth",
            "--num-samples",
            "10",
            "--output-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    print(f"CLI refusal in {time.perf_counter() - t0:.1f} s (process start and imports included)")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "OSError" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: StarCoder2-15B (bigcode/starcoder2-15b)"), lines
    assert not out.exists()


def test_parameter_count_from_config():
    assert pf.count_parameters(STARCODER2_15B) == STARCODER2_15B_PARAMS
    assert pf.count_parameters({"model_type": "llama"}) is None  # no sizes: no count


@pytest.mark.parametrize("arch", ["llama", "starcoder2", "qwen2"])
def test_parameter_count_matches_transformers(arch, tmp_path):
    """The formula against the real model class (small random configs, saved and re-read)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        arch,
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    cfg.save_pretrained(tmp_path)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    real = sum(p.numel() for p in model.parameters())
    assert pf.count_parameters(json.loads((tmp_path / "config.json").read_text())) == real


def test_too_large_refusal_names_the_alternatives():
    """A 15B model in fp32 on a 24 GB CPU machine: refused, with what would work."""
    with pytest.raises(ConfigError) as e:
        pf.check_fit(
            "StarCoder2-15B (bigcode/starcoder2-15b)", STARCODER2_15B_PARAMS, "float32", "inference", 24e9, "CPU RAM"
        )
    msg = str(e.value)
    _one_line_with(
        msg,
        "needs about 75 GB to generate in float32",
        "15.7B parameters",
        "4 bytes each",
        "24.0 GB available",
        "StarCoder2-3B",
        "DeepSeek-Coder-1.3B",
        "--dtype bfloat16",
        "--backend vllm",
        "tensor parallel",
        "--backend openai",
        pf.SKIP_ENV,
    )
    assert "Qwen2.5-Coder-7B" not in msg  # 7B in fp32 (~34 GB) does not fit 24 GB either
    pf.check_fit("StarCoder2-3B", 3e9, "float32", "inference", 24e9, "CPU RAM")  # 14.4 GB: fits
    pf.check_fit("StarCoder2-15B", STARCODER2_15B_PARAMS, "bfloat16", "inference", 80e9, "1 GPU(s)")  # 37.6 GB
    with pytest.raises(ConfigError, match="fine-tune fully"):  # 15.7B x (2+2+8) bytes x 1.2 = 225 GB
        pf.check_fit("StarCoder2-15B", STARCODER2_15B_PARAMS, "bfloat16", "full", 80e9, "1 GPU(s)")


def test_too_large_local_model_from_its_config_file(tmp_path, monkeypatch):
    """preflight on a directory holding only a StarCoder2-15B config.json (no weights), on
    this machine's real available RAM."""
    d = tmp_path / "starcoder2-15b-config-only"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(STARCODER2_15B))
    spec = resolve_model(str(d))
    avail, where = pf.available_memory("cpu")
    assert avail and avail > 0 and where == "CPU RAM"
    need = pf.memory_needed(STARCODER2_15B_PARAMS, "float32")
    if need <= avail:
        pytest.skip(f"this machine has {avail / 1e9:.0f} GB available: a 15B fp32 model fits")
    with pytest.raises(ConfigError) as e:
        pf.preflight(spec, device="cpu", dtype="float32")
    _one_line_with(str(e.value), str(d), "from config.json", "float32", "GB available", "--backend vllm")
    monkeypatch.setenv(pf.SKIP_ENV, "1")  # the way to try anyway
    info = pf.preflight(spec, device="cpu", dtype="float32")
    assert info["params"] == STARCODER2_15B_PARAMS and info["needed_gb"] > info["available_gb"]


def test_cached_hub_model_offline_is_sized_from_the_cache(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 with a filled cache is a way out: no hub error; the size check then
    reads the cached config.json."""
    cache = tmp_path / "hub"
    repo = cache / "models--bigcode--starcoder2-15b"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    (snap / "config.json").write_text(json.dumps(STARCODER2_15B))
    (snap / "model.safetensors.index.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert pf.hub_cached_dir("bigcode/starcoder2-15b") == snap
    monkeypatch.setenv(pf.SKIP_ENV, "1")
    info = pf.preflight(resolve_model("StarCoder2-15B"), device="cpu", dtype="bfloat16")
    assert info["source"].startswith("hub cache") and info["params_from"] == "config.json"
    assert info["params"] == STARCODER2_15B_PARAMS and info["dtype"] == "bfloat16"
    # without weights in the snapshot it is not cached: the offline error again
    (snap / "model.safetensors.index.json").unlink()
    pf._checked.clear()
    with pytest.raises(ConfigError, match="not cached"):
        pf.preflight(resolve_model("StarCoder2-15B"), device="cpu")


def test_small_local_and_embedded_models_pass(random_lm):
    _, _, path = random_lm
    info = pf.preflight(resolve_model(str(path)), device="cpu")
    assert info["source"] == "local directory" and 0 < info["params"] < 1e6 and info["dtype"] == "float32"
    assert pf.preflight(resolve_model("tiny-target"))["source"] == "embedded"
