"""Import boundaries: the API never imports torch; the library never imports the service."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``; a failure of ``code`` (an
    import that fails) fails the test, since what did not load was not checked."""
    script = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "CDI_DATA_DIR": "/tmp/cdi-boundary-test",
                              "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, f"the boundary check could not run:\n{out.stderr[-3000:]}"
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_api_process_never_imports_torch() -> None:
    # Building the app builds the Celery client too, and the OpenAPI schema touches every route.
    mods = modules_after(
        "from app.main import create_app\n"
        "from app.settings import Settings\n"
        "app = create_app(Settings(data_dir='/tmp/cdi-boundary-test'))\n"
        "app.openapi()\n"
        "import app.cli, app.client, app.registry, app.uploads, worker.celery_app\n"
    )
    assert "torch" not in mods and "diffusers" not in mods
    assert "fastapi" in mods


def test_the_library_imports_nothing_from_the_service() -> None:
    import pkgutil

    import cdi

    names = ["cdi"] + [m.name for m in pkgutil.walk_packages(cdi.__path__, "cdi.")]
    assert {"cdi.audit", "cdi.report.model", "cdi.models.detect", "cdi.features.extractor"} <= set(names)
    mods = modules_after("import importlib\n" + "".join(f"importlib.import_module({n!r})\n" for n in names))
    assert set(names) <= mods
    assert not any(m == "app" or m.startswith(("app.", "worker")) for m in mods)
