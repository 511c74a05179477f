"""/v1/audits/{id}/explanation and /figures: the report's first page and figures, for the web page.

The texts and the pictures are the PDF's own (:mod:`cdi.report.explain`,
:mod:`cdi.report.figures`), drawn from the stored report alone. Figures need the ``report``
extra (matplotlib); without it the figure routes answer 503 ``figures_unavailable`` and the
explanation still works.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import BaseModel, Field

from app.api.deps import CallerAudit
from app.api.routes.audits import require_done
from app.errors import Conflict, Unavailable
from app.schemas import ErrorResponse

router = APIRouter(prefix="/audits", tags=["audits"])

FigureName = Literal["p-value", "scores", "subsampling", "negative-control", "distribution"]
#: Figure names in the PDF's order, with the PDF's captions (short form).
FIGURES: dict[str, str] = {
    "p-value": "This audit's p-value on a log scale against the threshold α.",
    "scores": "Figure 1: the test scores of the published (P) and unpublished (U) images; dashed: the means.",
    "subsampling": "Figure 2: the p-value of random subsets of the images against their size, with α.",
    "negative-control": "Figure 3: the negative control, two random halves of U, and the p-values against α.",
    "distribution": "Figure 4: the distribution check, a model-free classifier of P against U.",
}

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or invalid API key."},
    404: {"model": ErrorResponse, "description": "No such audit for this tenant."},
    409: {"model": ErrorResponse, "description": "Not done, or a report without a schema."},
}


class ControlOut(BaseModel):
    name: str
    outcome: str
    text: str
    failed: bool


class FigureOut(BaseModel):
    name: str
    url: str
    caption: str


class ExplanationOut(BaseModel):
    """The PDF's first page. Texts use ``<b>``, ``<i>``, ``<code>`` and XML escapes only."""

    verdict: str
    label: str
    headline: str
    p_value: str
    tested: list[str]
    means: str
    not_means: str
    controls: list[ControlOut]
    warnings: list[str]
    check: str
    reason: str = Field(description="The verdict's one-sentence reason (the JSON report's `reason`).")
    figures: list[FigureOut]


def _document(audit: Any) -> Any:
    require_done(audit)
    report = audit.report or {}
    if report.get("schema_version") is None:
        raise Conflict("the report predates the report schema: it has no explanation; download the JSON",
                       "report_unsupported")
    from cdi.report import parse_report

    return parse_report({k: v for k, v in report.items() if k != "service"})


@router.get("/{audit_id}/explanation", response_model=ExplanationOut, responses=_ERRORS,
            summary="The report in plain language")
def get_explanation(audit: CallerAudit) -> ExplanationOut:
    """The verdict explained as on the PDF's first page, with the URLs of the PDF's figures."""
    from cdi.report.explain import MONO_HTML, explain

    document = _document(audit)
    base = f"/v1/audits/{audit.id}/figures"
    return ExplanationOut(
        **explain(document, MONO_HTML).to_dict(), reason=document.reason,
        figures=[FigureOut(name=n, url=f"{base}/{n}.png", caption=_caption(n, c, document))
                 for n, c in FIGURES.items()],
    )


def _caption(name: str, caption: str, document: Any) -> str:
    """The PDF's short caption; Figure 1's says what a score is under the audit's protocol."""
    if name != "scores":
        return caption
    from cdi.report.scores import score_meaning

    return f"{caption} Here {score_meaning(document.test.protocol, document.test.selected_feature)}."


#: Figures already drawn, by (report digest, name): a report never changes, so neither do they.
_CACHE: OrderedDict[tuple[str, str], bytes] = OrderedDict()
_CACHE_SIZE = 64
_LOCK = threading.Lock()


def _draw(document: Any, name: str) -> bytes:
    from cdi.report import figures

    if name == "p-value":
        return figures.p_value_scale(document)
    if name == "scores":
        return figures.score_distributions(document)
    if name == "negative-control":
        return figures.negative_control(document)
    if name == "distribution":
        return figures.distribution_check(document)
    from cdi.report.curve import subsampling_curve

    return figures.subsampling(document, subsampling_curve(document))


@router.get(
    "/{audit_id}/figures/{name}.png", response_class=Response, summary="A figure of the report (PNG)",
    responses={**_ERRORS, 200: {"content": {"image/png": {}}, "description": "The figure."},
               503: {"model": ErrorResponse, "description": "The service lacks the report extra (matplotlib)."}},
)
def get_figure(audit: CallerAudit, name: FigureName) -> Response:
    document = _document(audit)
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        raise Unavailable("figures need the service's report extra (matplotlib), which is not installed",
                          "figures_unavailable") from None
    key = (document.digest or str(audit.id), name)
    with _LOCK:
        data = _CACHE.get(key)
    if data is None:
        data = _draw(document, name)
        with _LOCK:
            _CACHE[key] = data
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})
