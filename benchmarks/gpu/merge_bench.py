"""Merge several pytest-benchmark JSON files (one per suite) into one, keeping the first file's machine info."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    out, *parts = sys.argv[1:]
    merged = None
    for part in parts:
        path = Path(part)
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        if merged is None:
            merged = data
        else:
            merged["benchmarks"].extend(data["benchmarks"])
    if merged is not None:
        Path(out).write_text(json.dumps(merged, indent=1))
        print(f"{out}: {len(merged['benchmarks'])} benchmarks")
    else:
        print("no benchmark results to merge")


if __name__ == "__main__":
    main()
