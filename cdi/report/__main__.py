"""``python -m cdi.report``: write the JSON Schema of the current report version to its file.

``python -m cdi.report --check`` exits 1 if the committed file is out of date.
"""

from __future__ import annotations

import sys

from cdi.report import SCHEMA_PATH, schema_json


def main(argv: list[str]) -> int:
    text = schema_json()
    if "--check" in argv:
        current = SCHEMA_PATH.read_text(encoding="utf-8") if SCHEMA_PATH.exists() else ""
        if current != text:
            print(f"{SCHEMA_PATH} is out of date: run python -m cdi.report", file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.parent.mkdir(parents=True, exist_ok=True)
    SCHEMA_PATH.write_text(text, encoding="utf-8")
    print(f"wrote {SCHEMA_PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
