"""/v1/audits/{id}/explanation and /figures/{name}.png: the PDF's first page and figures over HTTP.

The audit is submitted through the API (Postgres, Redis); its report is then stored as a
worker stores one (a sealed ``cdi-report/1`` document of a real, synthetic audit), so that
the routes are checked against the library's own rendering of the same report.
"""

from __future__ import annotations

import importlib.util
import uuid
from typing import Any

import pytest

from app.storage.db import session_scope
from app.storage.models import Audit, utcnow

from .conftest import ROOT, Service, synthetic_archive


def synthetic_result(kind: str, seed: int) -> Any:
    """The unit tests' synthetic audit result (tests/unit/test_report.py)."""
    spec = importlib.util.spec_from_file_location("_report_fixtures", ROOT / "tests" / "unit" / "test_report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.synthetic_result(kind, seed=seed)

pytestmark = pytest.mark.integration


def test_explanation_and_figures(service: Service) -> None:
    from cdi.report import build_report, figures, report_json, seal
    from cdi.report.explain import MONO_HTML, explain

    client: Any = service.client
    alice, bob = service.headers(service.alice), service.headers(service.bob)
    r = client.post("/v1/audits", headers=alice, files={"archive": ("a.zip", synthetic_archive(offset=700))},
                    data={"model": "digits-memorised"})
    assert r.status_code == 202, r.text
    audit_id = r.json()["id"]
    base = f"/v1/audits/{audit_id}"

    for url in (f"{base}/explanation", f"{base}/figures/scores.png"):
        r = client.get(url, headers=alice)
        assert r.status_code == 409 and r.json()["error"]["code"] == "report_not_ready"
        assert client.get(url, headers=bob).status_code == 404
    r = client.get(f"{base}/figures/nope.png", headers=alice)
    assert r.status_code == 422 and "scores" in r.text

    import json

    report = seal(build_report(synthetic_result("used", seed=0)))
    document = json.loads(report_json(report))
    with session_scope(service.settings.database_url) as session:  # type: ignore[attr-defined]
        audit = session.get(Audit, uuid.UUID(audit_id))
        assert audit is not None
        audit.state, audit.report, audit.verdict, audit.p_value = "done", document, report.verdict, report.p_value
        audit.finished_at = utcnow()
    service.purge()

    r = client.get(f"{base}/explanation", headers=alice)
    assert r.status_code == 200, r.text
    body = r.json()
    expected = explain(report, MONO_HTML).to_dict()
    assert {k: body[k] for k in expected} == expected
    assert body["reason"] == report.reason
    assert [f["name"] for f in body["figures"]] == ["p-value", "scores", "subsampling", "negative-control",
                                                    "distribution"]
    r = client.get(f"{base}/figures/p-value.png", headers=alice)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == figures.p_value_scale(report)
    r = client.get(f"{base}/figures/distribution.png", headers=alice)
    assert r.status_code == 200 and r.content == figures.distribution_check(report)
    assert client.get(f"{base}/figures/scores.png", headers=bob).status_code == 404
