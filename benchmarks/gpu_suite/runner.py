"""Running the parts: each in its own process group under a time box, time a part left unused going to the next."""

import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

from benchmarks.gpu_suite.parts import OPTIONAL_PACKAGES, REPO_ROOT, Part, shares
from benchmarks.gpu_suite.readers import read_report

MIN_SECONDS = 5.0   # a part offered less than this is skipped: it could not even import torch
KILL_GRACE_S = 10   # after the time box, SIGTERM, then this long before SIGKILL
ERROR_LINES = 8     # lines of a failed part's log kept as its error
MISSING_MODULE = re.compile(r"No module named '([\w.]+)'")


def paths(part: Part, out: Path) -> dict:
    """Where a part's files go: its report <out>/<part>.json, its log, its work folder (runs, junit.xml)."""
    return {"json": out / f"{part.name}.json", "log": out / "logs" / f"{part.name}.log",
            "work": out / "work" / part.name}


def command(part: Part, where: dict) -> list:
    """The part's argv with its placeholders filled in."""
    return [arg.replace("{json}", str(where["json"])).replace("{work}", str(where["work"])) for arg in part.argv]


def run_process(argv: list, env: dict, log: Path, limit: float) -> tuple:
    """Run argv (output to `log`) in its own process group; (exit code or None when the time box ended it, seconds)."""
    start = time.monotonic()
    with open(log, "w", encoding="utf-8") as out:
        # A session of its own: on timeout the whole group goes (DataLoader workers, torch compile workers).
        process = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            code = process.wait(timeout=max(limit, 0.0))
        except subprocess.TimeoutExpired:
            code = None
            stop_group(process)
    return code, time.monotonic() - start


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the process group the suite started (so a run can save what it has), SIGKILL it after a grace."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(log: Path, lines: int = ERROR_LINES) -> str:
    """The last non-empty lines of a log."""
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def missing_optional(log: Path) -> list:
    """pip names of optional packages whose import failed in the log (a part that needs one it did not declare)."""
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    modules = {match.split(".")[0] for match in MISSING_MODULE.findall(text)}
    return sorted(OPTIONAL_PACKAGES[m] for m in modules if m in OPTIONAL_PACKAGES)


def run_part(part: Part, limit: float, out: Path, run=run_process) -> dict:
    """Run one part within `limit` seconds; its result: status (ok | failed | timeout | skipped), seconds, error,
    command, log and report."""
    where = paths(part, out)
    argv = command(part, where)
    result = {"name": part.name, "group": part.group, "limit_s": round(limit, 1), "command": argv,
              "log": str(where["log"].relative_to(out)), "seconds": 0.0, "error": None, "report": None}
    missing = part.missing()
    if missing:
        return {**result, "status": "skipped", "error": f"missing optional package: {', '.join(missing)}"}
    if limit < MIN_SECONDS:
        return {**result, "status": "skipped", "error": f"no time left in the budget ({limit:.0f} s)"}
    for folder in (where["log"].parent, where["work"]):
        folder.mkdir(parents=True, exist_ok=True)
    where["json"].unlink(missing_ok=True)  # a report left by an earlier run must not pass for this one's
    env = {**os.environ, **dict(part.env)}
    code, seconds = run(argv, env, where["log"], limit)
    result.update(seconds=round(seconds, 1), exit_code=code)
    try:
        result["report"] = read_report(part.reader, where["json"], where["work"])
        read_error = None
    except Exception as error:  # noqa: BLE001 - nothing, or nothing readable, was written: the suite goes on
        read_error = f"no report: {type(error).__name__}: {error}"
    if code is None:
        return {**result, "status": "timeout", "error": f"ran past its time box of {limit:.0f} s\n{tail(where['log'])}"}
    if code == 0 and read_error is None:
        return {**result, "status": "ok"}
    missing = missing_optional(where["log"])
    if missing:
        return {**result, "status": "skipped", "error": f"missing optional package: {', '.join(missing)}"}
    return {**result, "status": "failed", "error": failure_text(result["report"], read_error, where["log"])}


def failure_text(report, read_error, log: Path) -> str:
    """Why a part failed: the failing tests when pytest said so, else the end of its log."""
    if report and report.get("name") == "tests" and (report.get("failed") or report.get("errors")):
        return f"{report['failed']} failed, {report['errors']} errors: " + ", ".join(report["failing"])
    return "\n".join(filter(None, [read_error, tail(log)]))


def run_suite(parts: list, budget: float, out: Path, echo: Callable[[dict, float], None],
              run=run_process) -> list:
    """Run the parts in order within `budget` seconds in all; `echo(result, elapsed)` as each one finishes."""
    share = shares(parts, budget)
    start, carried, results = time.monotonic(), 0.0, []
    for part in parts:
        elapsed = time.monotonic() - start
        allowance = min(share[part.name] + carried, budget - elapsed)
        try:
            result = run_part(part, allowance, out, run)
        except Exception as error:  # noqa: BLE001 - the part could not even start: record it and go on
            result = {"name": part.name, "group": part.group, "limit_s": round(allowance, 1), "seconds": 0.0,
                      "command": list(part.argv), "log": None, "report": None, "status": "failed",
                      "error": f"could not run: {type(error).__name__}: {error}"}
        # What a part left unused goes to the next: a fast part gives the slower ones more room.
        carried = max(0.0, allowance - result["seconds"])
        results.append(result)
        echo(result, time.monotonic() - start)
    return results
