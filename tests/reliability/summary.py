"""Sum up what the reliability suite did, from the figures file its tests append to (one JSON object a line).

    python tests/reliability/summary.py reliability-results/figures.jsonl

Numbers are added up per test, outcome counters merged, lists of faults joined: the figures docs/reliability.md
quotes come from this output.
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any


def summarise(lines: list[str]) -> dict[str, dict[str, Any]]:
    totals: dict[str, dict[str, Any]] = defaultdict(dict)
    for line in lines:
        record = json.loads(line)
        total = totals[record.pop("test")]
        total["runs"] = total.get("runs", 0) + 1
        for key, value in record.items():
            if key in ("at", "profile", "seed"):
                total.setdefault(key + "s", []).append(value)
            elif isinstance(value, bool) or not isinstance(value, int | float | dict | list):
                total[key] = value
            elif isinstance(value, int | float):
                total[key] = total.get(key, 0) + value
            elif isinstance(value, dict):
                total[key] = total.get(key, Counter()) + Counter(value)
            else:
                total[key] = [*total.get(key, []), *[v for v in value if v not in total.get(key, [])]]
    return totals


def main(path: str) -> int:
    file = Path(path)
    if not file.exists():
        print(f"no figures in {path}: did the tests run?")
        return 1
    for test, total in sorted(summarise(file.read_text().splitlines()).items()):
        print(f"\n{test} ({total.pop('runs')} runs, profile {sorted(set(total.pop('profiles', [])))})")
        total.pop("ats", None)
        for key, value in total.items():
            if isinstance(value, Counter):
                print(f"  {key}: {sum(value.values())}")
                for name, count in sorted(value.items()):
                    print(f"      {name}: {count}")
            elif isinstance(value, list):
                print(f"  {key}:")
                for item in value:
                    print(f"      {item}")
            else:
                print(f"  {key}: {round(value, 1) if isinstance(value, float) else value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "reliability-results/figures.jsonl"))
