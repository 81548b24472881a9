"""Turn a pytest-benchmark JSON file into the Markdown tables of bench/RESULTS.md.

    pytest bench --benchmark-enable --benchmark-json=bench.json
    python bench/report.py bench.json

Each group is one job done several ways; every row shows its median and its speed relative
to the group's baseline (the row whose extra_info has baseline=True: the torch way).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def _fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def render(data: dict) -> str:
    groups: dict[str, list[dict]] = defaultdict(list)
    for bench in data["benchmarks"]:
        groups[bench["group"] or bench["name"]].append(bench)
    machine = data.get("machine_info", {})
    lines = [
        f"Machine: {machine.get('cpu', {}).get('brand_raw', '?')}, "
        f"{machine.get('cpu', {}).get('count', '?')} logical CPUs; "
        f"python {machine.get('python_version', '?')}; date {data.get('datetime', '?')[:19]}",
        "",
    ]
    for group, rows in groups.items():
        baseline = next((r for r in rows if r.get("extra_info", {}).get("baseline")), None)
        lines += [f"### {group}", "", "| way | median | min | max | vs baseline | extra |",
                  "|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: r["stats"]["median"]):
            s = r["stats"]
            ratio = ""
            if baseline is not None:
                ratio = f"{baseline['stats']['median'] / s['median']:.2f}x"
            way = r.get("param") or r["name"]
            extra = ", ".join(
                f"{k}={v}" for k, v in r.get("extra_info", {}).items() if k != "baseline"
            )
            lines.append(
                f"| {way}{' (baseline)' if r is baseline else ''} | {_fmt_time(s['median'])} | "
                f"{_fmt_time(s['min'])} | {_fmt_time(s['max'])} | {ratio} | {extra} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        print(render(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
