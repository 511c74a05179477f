"""Throttling before authentication, shared by two API processes through Redis.

Requests with a bad key or none used to answer 401 forever; now each client address has a
request rate, counted before the key is looked at, and the count lives in Redis: two uvicorn
processes behind one address give it one limit between them, not one each.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from .conftest import service_env

pytestmark = pytest.mark.integration

LIMIT = 20


def test_unauthenticated_requests_are_throttled_across_two_api_processes(
        migrated: str, redis_url: str, tmp_path: Path, start_api: Callable[[dict[str, str]], str]) -> None:
    env = service_env(migrated, redis_url, tmp_path / "blobs", CDI_ADDRESS_RATE_LIMIT_PER_MINUTE=str(LIMIT))
    bases = [start_api(env), start_api(env)]
    assert bases[0] != bases[1]
    codes: list[list[int]] = [[], []]
    retry_after: list[int] = []
    started = time.monotonic()
    with httpx.Client(timeout=10) as client:
        for i in range(300):
            which = i % 2
            headers = {"Authorization": "Bearer cdi_bogus_key"} if i % 3 else {}
            r = client.get(f"{bases[which]}/v1/audits", headers=headers)
            codes[which].append(r.status_code)
            if r.status_code == 429:
                assert r.json()["error"]["code"] == "rate_limited"
                retry_after.append(int(r.headers["retry-after"]))
    elapsed = time.monotonic() - started
    every = codes[0] + codes[1]
    assert set(every) == {401, 429}, set(every)
    refilled = int(elapsed * LIMIT / 60) + 1
    # One limit for the address, whichever process answered: not LIMIT per process.
    assert LIMIT <= every.count(401) <= LIMIT + refilled, (every.count(401), elapsed)
    assert all(429 in c for c in codes), "each process throttles"
    assert every.count(429) >= 300 - LIMIT - refilled
    assert retry_after and all(1 <= s <= 60 for s in retry_after)
    # Probes are never throttled.
    assert httpx.get(f"{bases[0]}/healthz", timeout=5).status_code == 200
