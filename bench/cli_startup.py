"""Benchmark: how long ``cdi --help`` (and other commands that do no work) take to start.

Each command runs in a fresh interpreter, alternating with the baseline (``python -c pass``,
the interpreter's own start-up) so that both see the same machine load; the best of
``--repeats`` runs is kept. Prints seconds and the ratio to the baseline; the target for
``cdi --help`` is under 0.5 s. Also lists the heavy packages each command imports.

    python bench/cli_startup.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass (baseline)": [sys.executable, "-c", "pass"],
    "cdi --help": [sys.executable, "-c", "import sys; from cdi.cli import main; sys.argv[0] = 'cdi'; main()",
                   "--help"],
    "cdi audit --help": [sys.executable, "-c", "import sys; from cdi.cli import main; sys.argv[0] = 'cdi'; main()",
                         "audit", "--help"],
    "cdi submit --help": [sys.executable, "-c", "import sys; from cdi.cli import main; sys.argv[0] = 'cdi'; main()",
                          "submit", "--help"],
    "import cdi": [sys.executable, "-c", "import cdi"],
    "import app.client": [sys.executable, "-c", "import app.client"],
}
HEAVY = ("torch", "numpy", "scipy", "sklearn", "diffusers", "matplotlib", "sqlalchemy", "celery")


def run_once(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child): CPU time is less sensitive to a busy machine."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def heavy_imports(argv: list[str]) -> list[str]:
    """The heavy packages a command imports (run once more, with an exit hook that lists them)."""
    code = argv[2]
    probe = (f"import atexit, json, sys\n"
             f"atexit.register(lambda: sys.__stderr__.write('HEAVY=' + json.dumps("
             f"[m for m in {HEAVY!r} if m in sys.modules]) + '\\n'))\n{code}")
    out = subprocess.run([argv[0], "-c", probe, *argv[3:]], capture_output=True, text=True)
    for line in out.stderr.splitlines():
        if line.startswith("HEAVY="):
            return list(json.loads(line[6:]))
    return []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    best = {name: float("inf") for name in COMMANDS}
    cpu = {name: float("inf") for name in COMMANDS}
    for _ in range(args.repeats):
        for name, argv in COMMANDS.items():  # alternate: every command sees the same load
            wall, used = run_once(argv)
            best[name] = min(best[name], wall)
            cpu[name] = min(cpu[name], used)
    base = best["python -c pass (baseline)"]
    print(f"{'command':28s} {'best s':>8s} {'CPU s':>7s} {'× baseline':>11s}  heavy imports")
    for name, seconds in best.items():
        heavy = "" if name.startswith("python") else ", ".join(heavy_imports(COMMANDS[name])) or "none"
        print(f"{name:28s} {seconds:8.3f} {cpu[name]:7.3f} {seconds / base:11.1f}  {heavy}")
    verdict = "under" if best["cdi --help"] < 0.5 else "OVER"
    print(f"\ncdi --help: {best['cdi --help']:.3f} s wall ({cpu['cdi --help']:.3f} s CPU), {verdict} the 0.5 s "
          "target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
