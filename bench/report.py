"""The benchmarks' key=value lines and JSON file, one way."""
import json
from pathlib import Path


def emit(rows: list, json_path=None, **extra) -> None:
    """Prints each row as ``key=value | ...`` and writes ``{"rows": rows, **extra}`` to
    ``json_path`` when given."""
    for r in rows:
        print(" | ".join(f"{k}={v}" for k, v in r.items()))
    if json_path:
        Path(json_path).write_text(json.dumps({"rows": rows, **extra}, indent=1))
