"""Status polls and list pages never load the report document (a deferred column).

A report of an audit of thousands of images weighs megabytes; a client polling the status
every second, or a list page of fifty audits, would otherwise fetch all of it each time
(bench/status_reads.py measures the difference). The statements the routes send are recorded
on the engine and searched for the report column.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event, inspect

from app.storage.db import engine_for, session_scope
from app.storage.models import Audit, utcnow
from app.storage.repositories import AuditRepository

from .conftest import Service

pytestmark = pytest.mark.integration

#: The report column in a SELECT (not report_pdf_sha256).
REPORT_COLUMN = re.compile(r"audits\.report(?![_\w])")


@contextmanager
def statements(url: str) -> Iterator[list[str]]:
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    engine = engine_for(url)
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def _done_audit(url: str, tenant_id: uuid.UUID, n_images: int = 200) -> uuid.UUID:
    images = [("published" if i % 2 else "unpublished", f"i{i}.png", f"{i:064x}", 100, None, None)
              for i in range(n_images)]
    report = {"verdict": "used", "p_value": 0.001,
              "images": [{"name": f"i{i}.png", "scores": [0.1 * i] * 12} for i in range(n_images)]}
    with session_scope(url) as s:
        audit = AuditRepository(s).create(tenant_id=tenant_id, images=images, model_id="m", model_source="/m",
                                          model_revision=None, options={"alpha": 0.01}, callback_url=None,
                                          retain_images=True)
        audit.state, audit.report, audit.verdict, audit.p_value = "done", report, "used", 0.001
        audit.finished_at = utcnow()
        return audit.id


def test_status_and_list_do_not_load_the_report(service: Service) -> None:
    url = service.settings.database_url  # type: ignore[attr-defined]
    client: Any = service.client
    headers = service.headers(service.alice)
    audit_id = _done_audit(url, service.alice.id)

    with statements(url) as seen:
        status = client.get(f"/v1/audits/{audit_id}", headers=headers)
        page = client.get("/v1/audits?limit=5", headers=headers)
    assert status.status_code == 200 and status.json()["verdict"] == "used"
    assert page.status_code == 200 and str(audit_id) in [a["id"] for a in page.json()["items"]]
    audit_selects = [s for s in seen if s.lstrip().upper().startswith("SELECT") and "FROM audits" in s]
    assert len(audit_selects) >= 2, seen  # the status's and the page's
    assert not [s for s in audit_selects if REPORT_COLUMN.search(s)], "a status read selected the report"

    # The check sees the column when a route does read it: the report route.
    with statements(url) as seen:
        report = client.get(f"/v1/audits/{audit_id}/report", headers=headers)
    assert report.status_code == 200 and len(report.json()["images"]) == 200
    assert any(REPORT_COLUMN.search(s) for s in seen)

    # And what the ORM says of the row a status read loads.
    with session_scope(url) as s:
        row = AuditRepository(s).get_for_tenant(audit_id, service.alice.id)
        assert row is not None and row.state == "done"
        assert "report" in inspect(row).unloaded and "verdict" not in inspect(row).unloaded
        assert row.report is not None and row.report["verdict"] == "used"  # loaded when asked for
    with session_scope(url) as s:
        s.delete(s.get(Audit, audit_id))
