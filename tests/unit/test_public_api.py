"""The public Python API: what ``import cdi`` costs and offers, docs/python.md's audit, the torch-free client."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def fresh(code: str) -> dict[str, object]:
    """Run ``code`` in a new interpreter; it prints a JSON object."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def test_import_cdi_is_cheap_and_exports_the_api() -> None:
    got = fresh(
        "import json, sys, cdi; heavy = [m for m in ('torch', 'numpy', 'scipy', 'sklearn', 'diffusers') "
        "if m in sys.modules]; print(json.dumps({'heavy': heavy, 'all': cdi.__all__, "
        "'callable': all(callable(getattr(cdi, n)) for n in cdi.__all__ if n != '__version__'), "
        "'docs': all((getattr(cdi, n).__doc__ or '').strip() for n in cdi.__all__ if n != '__version__')}))")
    assert got["heavy"] == []
    assert set(got["all"]) == {"__version__", "run_audit", "extract_features", "load_model", "save_report",  # type: ignore[arg-type]
                               "verify", "recompute"}
    assert got["callable"] and got["docs"]


def test_names_stay_functions_after_the_submodules_are_imported() -> None:
    import cdi

    # Submodules of the same stem must not shadow the functions.
    import cdi.audit
    import cdi.features

    assert callable(cdi.run_audit) and callable(cdi.extract_features)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        cdi.nope  # noqa: B018


def test_http_client_imports_no_torch() -> None:
    got = fresh("import json, sys; from app.client import CdiClient, ServiceError, TransportError; "
                "print(json.dumps({'heavy': [m for m in ('torch', 'numpy', 'cdi.audit', 'sqlalchemy') "
                "if m in sys.modules]}))")
    assert got["heavy"] == []


def _ten_lines() -> str:
    text = (ROOT / "docs" / "python.md").read_text()
    section = text.split("## A complete audit in ten lines", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "docs/python.md lost its ten-line audit"
    return match.group(1)


def test_the_ten_line_audit_of_docs_runs(tmp_path: Path) -> None:
    from cdi import zoo

    code = _ten_lines()
    assert len([ln for ln in code.splitlines() if ln.strip()]) <= 10
    # The folders `cdi demo --export demo/` writes (fewer images than the demo, for speed).
    zoo.get("digits-memorised").export(tmp_path / "demo", members=20, held_out=20)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, cwd=tmp_path,
                         env={"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PATH": "/usr/bin:/bin",
                              "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    report = json.loads((tmp_path / "report.json").read_text())
    # digits-memorised was trained on these members: the audit must say so, at α = 0.01.
    assert report["verdict"] == "used" and report["p_value"] < 0.01, first
    assert first == f"used p = {report['p_value']:.3g}"
    assert (tmp_path / "report.pdf").read_bytes().startswith(b"%PDF-")
