"""A local stand-in for DeepSeek's OpenAI-compatible API (what cannot run here: a hosted API).

A real HTTP server (``http.server.ThreadingHTTPServer``) that serves a real model through
the HF backend (by default tiny-source) under DeepSeek's model name, and behaves like
DeepSeek's API where it matters to codedistill:

- ``GET /v1/models`` lists the served name (``deepseek-chat``);
- ``POST /v1/chat/completions`` and ``/v1/completions`` with ``logprobs`` (chat:
  ``top_logprobs`` <= 20), ``seed``, ``stop``, ``temperature``, ``top_p``;
- ``n`` must be 1 (HTTP 400 otherwise); there is no beam search (``use_beam_search`` is
  refused with 400);
- an API key when ``api_key`` is set (401 otherwise);
- injected faults by POST ordinal: ``"429"`` (with ``Retry-After``), ``"500"``, ``"drop"``
  (the connection is closed without an answer);
- answers name the model that gave them: ``model`` is ``reported_model`` (default: the
  name asked for; set it to stand for an alias the provider has moved to a newer model) and
  ``system_fingerprint`` is ``fingerprint``.

Chat requests carry codedistill's chat instruction for an MBPP-style problem; a base model
cannot follow instructions, so the stand-in turns the message back into the benchmark's
base prompt and answers with the code the model writes (the answer's log-probs are the
model's own, temperature 1). Counters: ``posts`` (every POST received), ``served``
(answered 200), ``faults`` (by kind); ``post_times``: when each POST arrived (``time.time()``).

    python tests/standin_openai.py --port 8765          # serves until interrupted
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DEEPSEEK_LIKE_FAULTS = {2: "429", 3: "429", 5: "500", 8: "drop"}

_CHAT_RE = re.compile(
    r"^(?P<desc>.*?)\nYour code should pass these tests:\n\n(?P<tests>.*?)\n\nWrite the Python code", re.S
)


def base_prompt_from_chat(messages: list[dict[str, str]]) -> str:
    """codedistill's chat instruction (prompts.chat_instruction) -> the MBPP/synth base prompt."""
    text = messages[-1]["content"]
    m = _CHAT_RE.match(text)
    if not m:
        return text
    return (
        "You are an expert Python programmer, and here is your task: "
        f"{m.group('desc').strip()} Your code should pass these tests:\n\n{m.group('tests').strip()}\n[BEGIN]\n"
    )


class StandIn:
    """The server; ``start()`` runs it in a thread, ``stop()`` shuts it down."""

    def __init__(
        self,
        model: str = "tiny-source",
        served_name: str = "deepseek-chat",
        port: int = 0,
        faults: dict[int, str] | None = None,
        api_key: str | None = None,
        retry_after: str = "1",
        max_top_logprobs: int = 20,
        logprobs: bool = True,
        reported_model: str | None = None,
        fingerprint: str = "fp_standin_0",
    ):
        from codedistill.generation.hf import HFGenerator
        from codedistill.models.registry import local_path, resolve_model

        spec = resolve_model(model)
        self.gen = HFGenerator.from_pretrained(
            local_path(spec), name=served_name, device="cpu", dtype="float32", batch_size=1
        )
        self.served_name = served_name
        self.reported_model = reported_model or served_name
        self.fingerprint = fingerprint
        self.faults = dict(DEEPSEEK_LIKE_FAULTS if faults is None else faults)
        self.api_key = api_key
        self.retry_after = retry_after
        self.max_top_logprobs = max_top_logprobs
        self.logprobs = logprobs
        self.posts = 0
        self.post_times: list[float] = []
        self.served = 0
        self.fault_log: list[tuple[int, str]] = []
        self._lock = threading.Lock()
        self._gen_lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @property
    def faults_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, k in self.fault_log:
            out[k] = out.get(k, 0) + 1
        return out

    def start(self) -> StandIn:
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> StandIn:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- the model ------------------------------------------------------------------
    def _token_logprobs(self, prompt: str, ids: list[int], k: int) -> tuple[list[float], list[dict[str, float]]]:
        """Per-token raw log-probs of ``ids`` after ``prompt`` and the top-k at each step."""
        import torch

        tok, model = self.gen.tokenizer, self.gen.model
        p_ids = tok(prompt, add_special_tokens=True)["input_ids"]
        if not ids:
            ids_t = torch.tensor([p_ids])
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=ids_t).logits[0, -1:].float(), -1)
            return [], [self._topk(lp[0], k)] if k else []
        ids_t = torch.tensor([p_ids + ids])
        with torch.no_grad():
            logits = model(input_ids=ids_t).logits[0].float()
        lp = torch.log_softmax(logits[len(p_ids) - 1 : len(p_ids) - 1 + len(ids)], -1)
        vals = [float(lp[i, t]) for i, t in enumerate(ids)]
        tops = [self._topk(lp[i], k) for i in range(len(ids))] if k else []
        return vals, tops

    def _topk(self, row: Any, k: int) -> dict[str, float]:
        import torch

        v, i = torch.topk(row, k)
        return {self.gen.tokenizer.decode([int(t)]): float(x) for x, t in zip(v, i)}

    def complete(self, prompt: str, body: dict[str, Any], k: int) -> dict[str, Any]:
        temperature = float(body.get("temperature", 1.0))
        stop = body.get("stop") or ()
        if isinstance(stop, str):
            stop = [stop]
        with self._gen_lock:
            c = self.gen.sample(
                [prompt],
                n=1,
                temperature=temperature,
                top_p=float(body.get("top_p", 1.0)),
                max_new_tokens=int(body.get("max_tokens", 64)),
                stop=stop,
                seed=body.get("seed"),
            )[0][0]
            ids = c.meta["token_ids"]
            vals, tops = self._token_logprobs(prompt, ids, k)
        tokens = [self.gen.tokenizer.decode([t]) for t in ids]
        return {
            "text": c.text,
            "tokens": tokens,
            "logprobs": vals,
            "top": tops,
            "finish_reason": c.finish_reason,
            "prompt_tokens": len(self.gen.tokenizer(prompt)["input_ids"]),
            "completion_tokens": len(ids),
        }

    # ---- HTTP -----------------------------------------------------------------------
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _json(self, code: int, obj: Any, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _error(
                self, code: int, msg: str, kind: str = "invalid_request_error", headers: dict[str, str] | None = None
            ) -> None:
                self._json(code, {"error": {"message": msg, "type": kind, "param": None, "code": None}}, headers)

            def _authorized(self) -> bool:
                if standin.api_key is None:
                    return True
                if self.headers.get("Authorization") == f"Bearer {standin.api_key}":
                    return True
                self._error(401, "Authentication Fails (no such user)", "authentication_error")
                return False

            def do_GET(self) -> None:
                if not self._authorized():
                    return
                if self.path.rstrip("/") == "/v1/models":
                    self._json(
                        200,
                        {
                            "object": "list",
                            "data": [{"id": standin.served_name, "object": "model", "owned_by": "deepseek"}],
                        },
                    )
                else:
                    self._error(404, f"no route {self.path}")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with standin._lock:
                    standin.post_times.append(time.time())
                    standin.posts += 1
                    ordinal = standin.posts
                    fault = standin.faults.get(ordinal)
                    if fault:
                        standin.fault_log.append((ordinal, fault))
                if fault == "drop":
                    self.close_connection = True
                    self.connection.close()  # no answer at all
                    return
                if fault == "429":
                    self._error(
                        429, "Rate limit reached", "rate_limit_error", headers={"Retry-After": standin.retry_after}
                    )
                    return
                if fault == "500":
                    self._error(500, "Internal server error", "server_error")
                    return
                if not self._authorized():
                    return
                route = self.path.rstrip("/")
                if route not in ("/v1/chat/completions", "/v1/completions"):
                    self._error(404, f"no route {self.path}")
                    return
                if body.get("model") != standin.served_name:
                    self._error(400, f"Model Not Exist: {body.get('model')}")
                    return
                if int(body.get("n", 1)) != 1:
                    self._error(400, "Invalid n: only n=1 is supported")
                    return
                if body.get("use_beam_search"):
                    self._error(400, "use_beam_search is not supported")
                    return
                chat = route.endswith("chat/completions")
                if chat:
                    want_lp = bool(body.get("logprobs"))
                    k = int(body.get("top_logprobs") or 0)
                    if k > standin.max_top_logprobs:
                        self._error(400, f"top_logprobs must be <= {standin.max_top_logprobs}")
                        return
                    prompt = base_prompt_from_chat(body["messages"])
                    body = {**body, "stop": list(body.get("stop") or []) + ["[DONE]"]}
                else:
                    want_lp = body.get("logprobs") is not None
                    k = int(body.get("logprobs") or 0)
                    if k > standin.max_top_logprobs:
                        self._error(400, f"logprobs must be <= {standin.max_top_logprobs}")
                        return
                    prompt = body["prompt"]
                r = standin.complete(prompt, body, k)
                want_lp = want_lp and standin.logprobs
                if chat:
                    lp = None
                    if want_lp:
                        lp = {
                            "content": [
                                {
                                    "token": t,
                                    "logprob": v,
                                    "bytes": list(t.encode()),
                                    "top_logprobs": [
                                        {"token": a, "logprob": b, "bytes": list(a.encode())}
                                        for a, b in (r["top"][i].items() if r["top"] else [])
                                    ],
                                }
                                for i, (t, v) in enumerate(zip(r["tokens"], r["logprobs"]))
                            ]
                        }
                    choice = {
                        "index": 0,
                        "message": {"role": "assistant", "content": r["text"]},
                        "logprobs": lp,
                        "finish_reason": r["finish_reason"],
                    }
                    obj = "chat.completion"
                else:
                    lp = None
                    if want_lp:
                        offs, o = [], len(prompt)
                        for t in r["tokens"]:
                            offs.append(o)
                            o += len(t)
                        lp = {
                            "tokens": r["tokens"],
                            "token_logprobs": r["logprobs"],
                            "text_offset": offs,
                            "top_logprobs": r["top"] or None,
                        }
                    choice = {"index": 0, "text": r["text"], "logprobs": lp, "finish_reason": r["finish_reason"]}
                    obj = "text_completion"
                with standin._lock:
                    standin.served += 1
                self._json(
                    200,
                    {
                        "id": f"standin-{ordinal}",
                        "object": obj,
                        "created": int(time.time()),
                        "model": standin.reported_model,
                        "system_fingerprint": standin.fingerprint,
                        "choices": [choice],
                        "usage": {
                            "prompt_tokens": r["prompt_tokens"],
                            "completion_tokens": r["completion_tokens"],
                            "total_tokens": r["prompt_tokens"] + r["completion_tokens"],
                        },
                    },
                )

        return Handler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--model", default="tiny-source")
    ap.add_argument("--served-name", default="deepseek-chat")
    ap.add_argument("--no-faults", action="store_true")
    args = ap.parse_args()
    s = StandIn(args.model, args.served_name, port=args.port, faults={} if args.no_faults else None)
    print(f"serving {args.model} as {args.served_name} at {s.base_url}", flush=True)
    try:
        s.httpd.serve_forever()
    except KeyboardInterrupt:
        s.stop()


if __name__ == "__main__":
    main()
