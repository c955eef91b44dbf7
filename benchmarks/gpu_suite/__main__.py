"""`python -m benchmarks.gpu_suite`: measure the engine on a GPU in one command (see benchmarks/README.md).

Parts, in order: the GPU tests (`pytest -m gpu`, fixed kernel configs), every kernel benchmark at GPU shapes, the
end-to-end benchmarks, a CUDA-graph training run, a torch.profiler table of one training step. Each part runs in
its own process under a time box (`--budget`, shared out by default seconds per part); a failing part is recorded
and the suite goes on; a missing optional package skips its part with the package's name. Output: one line per part,
then <out>/suite.json (every report) and <out>/summary.md (every figure). Exit code 1 when any part failed or ran out
of time.
"""

import argparse
import datetime
import re
import shlex
import sys
import time
from pathlib import Path

from benchmarks.crossover import table_text
from benchmarks.gpu_suite.environment import probe
from benchmarks.gpu_suite.parts import DEFAULT_BUDGET, REPO_ROOT, SMOKE_BUDGET, all_parts, select, shares
from benchmarks.gpu_suite.report import progress_line, write_suite, write_summary
from benchmarks.gpu_suite.runner import run_suite


def parse_args(argv=None) -> argparse.Namespace:
    """The suite's command line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite", description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds for the whole suite (default {DEFAULT_BUDGET:.0f}; --cpu-smoke {SMOKE_BUDGET:.0f})")
    parser.add_argument("--only", default="", metavar="PART[,PART]",
                        help="run these parts or groups only (tests, kernels, e2e, train, profile, or a part's name)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="every part at tiny shapes on the CPU: proves the suite starts, runs each part, writes files")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default bench-results/gpu/<date>-<device>/)")
    parser.add_argument("--list", action="store_true", help="print the parts and their time boxes, run nothing")
    return parser.parse_args(argv)


def slug(text: str) -> str:
    """A device name as a folder name: 'NVIDIA H200' -> 'nvidia-h200'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def write_routing_table(out: Path, results: list) -> None:
    """<out>/routing_table.txt: the crossover the routed ops' reports measured, as mrgfast/ops/routing.py's TABLE
    entries (`python -m benchmarks.crossover <out>` prints the same); nothing when no part measured one."""
    try:
        text = table_text([r["report"] for r in results if isinstance(r.get("report"), dict)])
    except SystemExit as error:  # a report the crossover cannot read: say so, the suite's files are written already
        print(f"gpu_suite: no routing table: {error}", file=sys.stderr)
        return
    if text:
        (out / "routing_table.txt").write_text(text, encoding="utf-8")
        print(f"gpu_suite: routing table (mrgfast/ops/routing.py TABLE entries) -> {out / 'routing_table.txt'}")


def main(argv=None) -> int:
    """Run the suite; 0 when every part that ran passed, 1 otherwise, 2 on a bad command line."""
    args = parse_args(argv)
    budget = args.budget or (SMOKE_BUDGET if args.cpu_smoke else DEFAULT_BUDGET)
    try:
        parts = select(all_parts(args.cpu_smoke), args.only)
    except ValueError as error:
        print(f"gpu_suite: {error}", file=sys.stderr)
        return 2
    if args.list:
        for part, seconds in zip(parts, shares(parts, budget).values()):
            print(f"{part.name:<22} {part.group:<8} {seconds:5.0f} s  {shlex.join(part.argv)}")
        return 0
    started = time.monotonic()
    environment = probe()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out = args.out or REPO_ROOT / "bench-results" / "gpu" / f"{date}-{slug(str(environment.get('device', 'unknown')))}"
    out.mkdir(parents=True, exist_ok=True)
    print(f"gpu_suite: {environment.get('device')} | torch {environment.get('torch')} | triton "
          f"{environment.get('triton')} | commit {environment.get('commit')} | {len(parts)} parts in {budget:.0f} s "
          f"-> {out}", flush=True)
    # The budget covers the whole command: what the environment probe took is not the parts' to spend.
    results = run_suite(parts, budget - (time.monotonic() - started), out,
                        lambda result, elapsed: print(progress_line(result, elapsed), flush=True))
    summary = {"suite": "mrgfast gpu_suite", "date": date, "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
               "budget_s": budget, "seconds": round(time.monotonic() - started, 1),
               "command": shlex.join(["python", "-m", "benchmarks.gpu_suite", *(sys.argv[1:] if argv is None else argv)]),
               "environment": environment}
    suite = write_suite(out, summary, results)
    summary_path = write_summary(out, suite)
    write_routing_table(out, results)
    bad = [r["name"] for r in results if r["status"] in ("failed", "timeout")]
    print(f"gpu_suite: {len(results) - len(bad)} of {len(results)} parts ok or skipped; "
          f"{'failed: ' + ', '.join(bad) if bad else 'none failed'}; {suite['seconds']:.0f} s -> {out / 'suite.json'}, "
          f"{summary_path}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
