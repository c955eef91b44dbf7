"""The routing table from benchmark reports: per device, op and case, the smallest measured size from which a kernel
beats eager at that size and every larger one measured (mrgfast/ops/routing.py's TABLE entries, ready to paste).

    python -m benchmarks.crossover bench-results/gpu/<date>-<device>/   # a GPU suite run's folder
    python -m benchmarks.crossover grouped_projection.json affine_prompt.json ...

Reads every case that carries "routing" (op, case, size) and "kernels" (each forced kernel's speed_ratio against
eager), as grouped_projection.py, group_tokens.py and affine_prompt.py write them. Cases no report measured are left
out (routing.py keeps what it had for them).
"""

import argparse
import json
import sys
import textwrap
from pathlib import Path

from mrgfast.ops.routing import CASES, Route, table_lines

WIDTH = 118  # evidence comment lines, to sit in routing.py's 120 columns
MIN_SPEED = 1.0  # a kernel must be at least as fast as eager (eager / kernel time >= this) to be routed to


def load_reports(paths) -> list[dict]:
    """The benchmark reports under `paths`: a suite folder's suite.json parts (else its *.json files), or JSON files."""
    reports = []
    for path in map(Path, paths):
        if path.is_dir():
            suite = path / "suite.json"
            if suite.exists():
                parts = read(suite).get("parts", [])
                reports += [p["report"] for p in parts if isinstance(p.get("report"), dict)]
            else:
                reports += [read(p) for p in sorted(path.glob("*.json"))]
        else:
            reports.append(read(path))
    return reports


def read(path: Path) -> dict:
    """One JSON file, or a SystemExit naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SystemExit(f"crossover: {path}: not a readable JSON report ({error})") from None


def measurements(reports: list[dict]) -> dict:
    """{(device, op, case): [(size, {backend: speed_ratio}, report name, case name)]} over every routed case."""
    found: dict = {}
    for report in reports:
        device = report.get("config", {}).get("device")
        for name, case in report.get("results", {}).items():
            routing, kernels = case.get("routing"), case.get("kernels")
            if not routing or kernels is None:
                continue
            if routing.get("case") not in CASES.get(routing.get("op"), ()):
                raise SystemExit(f"crossover: {report.get('name')}: case {name!r} names routing case "
                                 f"{routing.get('op')!r}/{routing.get('case')!r}, not one of mrgfast/ops/routing.py's")
            speeds = {backend: figures["speed_ratio"] for backend, figures in kernels.items()}
            found.setdefault((device, routing["op"], routing["case"]), []).append(
                (int(routing["size"]), speeds, report.get("name"), name))
    return found


def winning_from(points: list, backend: str, min_speed: float = MIN_SPEED):
    """The smallest size from which `backend` is at least min_speed at that size and every larger measured size
    (every measurement at a size must pass); None when it loses at the largest size or was not measured there."""
    sizes = sorted({size for size, _, _, _ in points}, reverse=True)
    start = None
    for size in sizes:
        ratios = [speeds.get(backend) for s, speeds, _, _ in points if s == size]
        if any(r is None or r < min_speed for r in ratios):
            break
        start = size
    return start


def crossover(found: dict, min_speed: float = MIN_SPEED) -> dict:
    """{(device, op, case): Route or None}: per case the kernel that wins from the smallest size (ties: the faster at
    the largest size), None when none wins at the largest size."""
    table = {}
    for key, points in found.items():
        largest = max(size for size, _, _, _ in points)
        best = None
        for backend in sorted({b for _, speeds, _, _ in points for b in speeds}):
            start = winning_from(points, backend, min_speed)
            if start is None:
                continue
            at_largest = min(speeds[backend] for size, speeds, _, _ in points if size == largest)
            if best is None or (start, -at_largest) < (best[0], -best[1]):
                best = (start, at_largest, backend)
        table[key] = None if best is None else Route(best[2], best[0])
    return table


def evidence_lines(found: dict) -> list[str]:
    """One comment line per case: every measured size and each kernel's speed ratio there (the table's evidence)."""
    lines = []
    for (device, op, case), points in sorted(found.items()):
        cells = []
        for size, speeds, _, _ in sorted(points, key=lambda p: p[0]):
            cells.append(f"{size:,}: " + " ".join(f"{b} {r:.2f}" for b, r in sorted(speeds.items())))
        lines += textwrap.wrap(f"{device} {op} {case}: " + "; ".join(cells), WIDTH, initial_indent="    # ",
                               subsequent_indent="    #   ", break_on_hyphens=False)
    return lines


def table_text(reports: list[dict], min_speed: float = MIN_SPEED) -> str:
    """The evidence comments and the TABLE entries for the routed cases these reports measured ('' if none)."""
    found = measurements(reports)
    if not found:
        return ""
    return "\n".join(evidence_lines(found) + table_lines(crossover(found, min_speed))) + "\n"


def main(argv=None) -> int:
    """Print the table; 1 when the reports hold no routed case."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.crossover", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="a GPU suite output folder, or benchmark JSON reports")
    parser.add_argument("--min-speed", type=float, default=MIN_SPEED,
                        help=f"eager / kernel time a kernel must reach (default {MIN_SPEED})")
    args = parser.parse_args(argv)
    text = table_text(load_reports(args.paths), args.min_speed)
    if not text:
        print("crossover: no case with 'routing' and 'kernels' in these reports", file=sys.stderr)
        return 1
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
