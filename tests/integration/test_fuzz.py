"""Property-based fuzzing of the API against its own OpenAPI schema (schemathesis).

Bounded here to a few hundred cases (``CDI_FUZZ_EXAMPLES`` per operation); scripts/fuzz-api
runs tens of thousands. Every response must be a documented status with a body and headers
that match the schema, and never a 5xx.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from .conftest import Service

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("CDI_FUZZ_EXAMPLES", "20"))


def fuzz(app: Any, headers: dict[str, str], examples: int, seed: int | None = 0) -> dict[str, Any]:
    """Run ``examples`` generated cases per operation; returns counts and the failures found."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)

    def label(case: Any) -> str:
        return f"{case.operation.method.upper()} {case.operation.path}"

    stats: dict[str, Any] = {"cases": 0, "server_errors": 0, "failures": [], "accepted_invalid": [],
                             "statuses": {}}
    for result in schema.get_all_operations():
        operation = result.ok()

        # Cases that follow the schema, and cases that break it on purpose (wrong types,
        # missing fields, out-of-range values): the second kind must be refused with a 4xx.
        strategy = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                             operation.as_strategy(GenerationMode.NEGATIVE))

        @given(case=strategy)
        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck),
                  derandomize=seed is not None, database=None)
        def run(case: Any) -> None:
            stats["cases"] += 1
            try:
                # The API key is fixed (an admin's, so that every operation is reachable). A
                # schema-valid request may still be refused (a random "archive" is not a zip).
                response = case.call_and_validate(headers=headers, excluded_checks=[positive_data_acceptance])
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # schemathesis reports a group of failures (not an Exception)
                text = f"{label(case)}: {exc}"[:2000]
                # "Schema-violating request accepted" alone: some generated violations do not
                # survive serialisation (a property whose value encodes to nothing), so the
                # request sent is valid; they are counted and shown, not failed on.
                only_accepted = "ST201" in text and text.count("- ST") == 1
                stats["accepted_invalid" if only_accepted else "failures"].append(text)
                return
            key = f"{label(case)} {response.status_code}"
            stats["statuses"][key] = stats["statuses"].get(key, 0) + 1
            if response.status_code >= 500:
                stats["server_errors"] += 1

        run()
    return stats


def test_api_conforms_to_its_schema(service: Service) -> None:
    stats = fuzz(service.client.app, service.headers(service.admin), EXAMPLES)  # type: ignore[attr-defined]
    assert stats["cases"] >= 5 * EXAMPLES
    assert stats["server_errors"] == 0
    assert not stats["failures"], "\n\n".join(stats["failures"][:5])
    service.purge()
