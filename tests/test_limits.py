"""Per-key limits and usage: requests and tokens per minute, the key id, usage by key and model."""

from __future__ import annotations

import hashlib

import pytest
from prometheus_client.parser import text_string_to_metric_families

from streamsvc.errors import KeyRateLimited
from streamsvc.web.auth import key_id
from streamsvc.web.limits import KeyLimits
from tests.fake_azure import FakeAzure, Reply
from tests.harness import asgi_client, server_env

KEYS = ("key-one-0123456789abcdef", "key-two-fedcba9876543210")
USER = [{"role": "user", "content": "hi"}]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_key_id_is_a_short_stable_digest_prefix() -> None:
    assert key_id(KEYS[0]) == hashlib.sha256(KEYS[0].encode()).hexdigest()[:8]
    assert key_id(KEYS[0]) == key_id(KEYS[0]) and len(key_id(KEYS[0])) == 8
    assert key_id(KEYS[0]) != key_id(KEYS[1])
    assert KEYS[0] not in key_id(KEYS[0])


def test_requests_per_minute_refill_continuously() -> None:
    clock = Clock()
    limits = KeyLimits(requests_per_minute=2, tokens_per_minute=0, clock=clock)
    limits.check("a", uses_tokens=False)
    limits.check("a", uses_tokens=False)
    with pytest.raises(KeyRateLimited) as refused:
        limits.check("a", uses_tokens=False)
    assert refused.value.status == 429 and refused.value.code == "rate_limited"
    assert refused.value.retry_after == 30  # one request comes back every 30 s
    assert refused.value.headers() == {"Retry-After": "30"}
    limits.check("b", uses_tokens=False)  # another key has its own budget
    clock.now += 29
    with pytest.raises(KeyRateLimited) as still:
        limits.check("a", uses_tokens=False)
    assert still.value.retry_after == 1
    clock.now += 1
    limits.check("a", uses_tokens=False)
    with pytest.raises(KeyRateLimited):
        limits.check("a", uses_tokens=False)


def test_tokens_per_minute_are_charged_after_the_answer() -> None:
    clock = Clock()
    limits = KeyLimits(requests_per_minute=0, tokens_per_minute=600, clock=clock)
    limits.check("a", uses_tokens=True)
    limits.spend("a", 900)  # an answer may overrun the budget; the debt is paid back first
    with pytest.raises(KeyRateLimited) as refused:
        limits.check("a", uses_tokens=True)
    assert refused.value.details == {"limit": "tokens", "per_minute": 600}
    assert refused.value.retry_after == 30  # 300 tokens owed at 10 per second
    limits.check("a", uses_tokens=False)  # a connector run spends no tokens
    clock.now += 30.5
    limits.check("a", uses_tokens=True)
    assert not KeyLimits(0, 0).enabled


async def test_a_key_over_its_request_limit_gets_429_and_others_do_not(
    azure: FakeAzure,
) -> None:
    env = server_env(
        azure, STREAMSVC_API_KEYS=",".join(KEYS), STREAMSVC_KEY_REQUESTS_PER_MINUTE="2"
    )
    async with asgi_client(env) as app:
        for _ in range(2):
            azure.push(Reply(text_chunks=["a"]))
            ok = await app.post("/chat", json={"messages": USER}, headers=bearer(KEYS[0]))
            assert ok.status_code == 200, ok.text
        refused = await app.post("/chat", json={"messages": USER}, headers=bearer(KEYS[0]))
        assert refused.status_code == 429
        assert 1 <= int(refused.headers["retry-after"]) <= 30
        error = refused.json()["error"]
        assert error["code"] == "rate_limited"
        assert error["details"] == {"limit": "requests", "per_minute": 2}
        assert KEYS[0] not in refused.text
        # OpenAI's shape under /v1, for the SDKs' RateLimitError.
        v1 = await app.post(
            "/v1/chat/completions", json={"messages": USER}, headers=bearer(KEYS[0])
        )
        assert v1.status_code == 429 and "retry-after" in v1.headers
        assert v1.json()["error"]["type"] == "rate_limit_error"
        assert v1.json()["error"]["code"] == "rate_limited"
        azure.push(Reply(text_chunks=["b"]))
        other = await app.post("/chat", json={"messages": USER}, headers=bearer(KEYS[1]))
        assert other.status_code == 200
        # A wrong key is still a 401, not a 429, and spends nobody's budget.
        assert (
            await app.post("/chat", json={"messages": USER}, headers=bearer("no"))
        ).status_code == 401

        metrics = (await app.get("/metrics")).text
        first = key_id(KEYS[0])
        assert sample(metrics, "streamsvc_rate_limited_total", key=first, limit="requests") == 2
        assert sample(metrics, "streamsvc_rate_limited_total", key=key_id(KEYS[1])) == 0
        # Refused before routing, as 401s are: counted under the route "unmatched".
        limited = sample(metrics, "streamsvc_errors_total", route="unmatched", error="rate_limited")
        assert limited == 2
        # The two 429s and the 401 were refused; the three answers completed.
        assert sample(metrics, "streamsvc_run_outcomes_total", kind="chat", outcome="refused") == 3
        assert (
            sample(metrics, "streamsvc_run_outcomes_total", kind="chat", outcome="completed") == 3
        )
        assert KEYS[0] not in metrics and KEYS[1] not in metrics


async def test_token_limit_and_usage_by_key_and_model(azure: FakeAzure) -> None:
    env = server_env(azure, STREAMSVC_API_KEYS=",".join(KEYS), STREAMSVC_KEY_TOKENS_PER_MINUTE="20")
    async with asgi_client(env) as app:
        azure.push(Reply(text_chunks=["one ", "two ", "three"]))
        first = await app.post("/chat", json={"messages": USER}, headers=bearer(KEYS[0]))
        assert first.status_code == 200
        used = first.json()["usage"]
        azure.push(Reply(text_chunks=["x"] * 30))
        body = {"messages": USER, "model": "gpt-4o-mini"}
        second = await app.post("/v1/chat/completions", json=body, headers=bearer(KEYS[0]))
        assert second.status_code == 200
        used_v1 = second.json()["usage"]
        assert used["total_tokens"] + used_v1["total_tokens"] > 20
        # The budget is spent: chat is refused until it refills, connector runs are not.
        refused = await app.post("/chat", json={"messages": USER}, headers=bearer(KEYS[0]))
        assert refused.status_code == 429
        assert refused.json()["error"]["details"]["limit"] == "tokens"
        assert int(refused.headers["retry-after"]) >= 1
        run = await app.post("/execute-connector", json={"connector": {}}, headers=bearer(KEYS[0]))
        assert run.status_code != 429
        azure.push(Reply(text_chunks=["b"]))
        other = await app.post("/chat", json={"messages": USER}, headers=bearer(KEYS[1]))
        assert other.status_code == 200

        metrics = (await app.get("/metrics")).text
        key = key_id(KEYS[0])

        def tokens(model: str, kind: str) -> float:
            return sample(metrics, "streamsvc_key_tokens_total", key=key, model=model, kind=kind)

        assert tokens("gpt-4o", "completion") == used["completion_tokens"] == 3
        assert tokens("gpt-4o", "prompt") == used["prompt_tokens"]
        assert tokens("gpt-4o-mini", "completion") == used_v1["completion_tokens"] == 30
        assert sample(metrics, "streamsvc_rate_limited_total", key=key, limit="tokens") == 1


async def test_without_keys_there_are_no_limits_and_usage_counts_as_none(azure: FakeAzure) -> None:
    async with asgi_client(server_env(azure, STREAMSVC_KEY_REQUESTS_PER_MINUTE="1")) as app:
        for _ in range(3):
            azure.push(Reply(text_chunks=["a", "b"]))
            answer = await app.post("/chat", json={"messages": USER})
            assert answer.status_code == 200
        metrics = (await app.get("/metrics")).text
        labels = {"key": "none", "model": "gpt-4o", "kind": "completion"}
        assert sample(metrics, "streamsvc_key_tokens_total", **labels) == 6


def test_the_limits_are_settings() -> None:
    from streamsvc.settings import SettingsError, load_settings

    settings = load_settings(
        {"STREAMSVC_KEY_REQUESTS_PER_MINUTE": "60", "STREAMSVC_KEY_TOKENS_PER_MINUTE": "1000"},
        None,
    )
    assert settings.server.key_requests_per_minute == 60
    assert settings.server.key_tokens_per_minute == 1000
    with pytest.raises(SettingsError, match="STREAMSVC_KEY_TOKENS_PER_MINUTE"):
        load_settings({"STREAMSVC_KEY_TOKENS_PER_MINUTE": "-1"}, None)
