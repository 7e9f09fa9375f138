"""What the side-by-side benchmarks share: the ours-against-TRL table and the JSON they write."""

from __future__ import annotations

import json
from pathlib import Path


def report(ours: dict, trl: dict, keys: tuple[str, ...], json_path: str | None) -> None:
    """One row per figure: ours, TRL's and their ratio (blank where a figure is missing)."""
    print(f"{'':<16}{'ours':>10}{'TRL':>10}{'ours/TRL':>10}")
    for k in keys:
        a, b = ours.get(k), trl.get(k)
        ratio = f"{a / b:10.2f}" if a is not None and b else f"{'':>10}"
        print(f"{k:<16}{a if a is not None else float('nan'):10.2f}{b if b is not None else float('nan'):10.2f}"
              f"{ratio}")
    if json_path:
        Path(json_path).write_text(json.dumps({"ours": ours, "trl": trl}, indent=1))
