"""``Retry-After`` honoured by the OpenAI backend: the header's two forms (delay-seconds and an
HTTP date, RFC 9110 10.2.3) parsed, and the client measured waiting at least the advertised
delay after a 429 from the local stand-in of DeepSeek's API (tests/standin_openai.py), where
the same 429 without the header is retried at once (the policy's backoff, 10-20 ms)."""

from __future__ import annotations

import email.utils
import math
import time
import uuid
from datetime import datetime, timezone

import pytest

pytest.importorskip("openai")
pytest.importorskip("torch")

from codedistill.generation.openai_api import (  # noqa: E402
    OpenAIGenerator,
    OpenAISettings,
    RetryPolicy,
    parse_retry_after,
)
from standin_openai import StandIn  # noqa: E402


def _http_date(ts: float) -> str:
    return email.utils.format_datetime(datetime.fromtimestamp(ts, tz=timezone.utc), usegmt=True)


def test_parse_retry_after_seconds_and_http_dates():
    assert parse_retry_after("1") == 1.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("-3") == 0.0  # a negative delay is no delay
    now = time.time()
    assert parse_retry_after(_http_date(now + 30)) == pytest.approx(30, abs=1.5)  # the date has whole seconds
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: retry now
    for bad in (None, "", "soon", "1,5"):
        assert parse_retry_after(bad) is None


@pytest.fixture(scope="module")
def standin():
    s = StandIn("tiny-source", served_name="deepseek-chat", faults={}).start()
    yield s
    s.stop()


def _gap_after_a_429(standin: StandIn, header: str) -> tuple[float, float]:
    """One request that gets a 429 with ``Retry-After: header``, then its answer: (seconds
    between the two POSTs' arrivals at the server, when the retry arrived). The client read
    the 429 after the first arrival and sent the retry before the second, so the gap bounds
    its wait from above."""
    standin.retry_after = header
    first = standin.posts + 1
    standin.faults = {first: "429"}
    gen = OpenAIGenerator(
        "deepseek-chat",
        standin.base_url,
        OpenAISettings(retry=RetryPolicy(backoff_base=0.01, backoff_max=0.02)),
    )
    prompt = f"# {uuid.uuid4().hex}\ndef add(a, b):\n"  # never a cached answer
    out = gen.sample([prompt], n=1, temperature=0.8, max_new_tokens=2, seed=1)
    usage = gen.usage()
    gen.close()
    assert len(out[0]) == 1 and usage["requests_sent"] == 1 and usage["retries"] == {"429": 1}
    assert standin.posts == first + 1
    t = standin.post_times
    return t[first] - t[first - 1], t[first]


def test_the_client_waits_the_advertised_delay(standin):
    # no Retry-After: the policy's backoff (10-20 ms), then the retry
    fast, _ = _gap_after_a_429(standin, "")
    # Retry-After: 1 (seconds)
    waited, _ = _gap_after_a_429(standin, "1")
    assert waited >= 1.0 > fast, (waited, fast)
    # Retry-After as an HTTP date, 2 s after the next whole second: no retry before it
    when = math.ceil(time.time()) + 2
    _, retried_at = _gap_after_a_429(standin, _http_date(when))
    assert retried_at >= when, (retried_at, when)
