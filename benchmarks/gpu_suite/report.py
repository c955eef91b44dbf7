"""The suite's output: one line per part as it finishes, suite.json with every report, summary.md with every figure."""

import json
from pathlib import Path

MIB = 2.0 ** 20
PROFILE_ROWS = 25


def number(value) -> str:
    """A figure as text: 4 significant digits for floats, as is otherwise."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def benchmark_figures(report: dict) -> list:
    """(case, figure, value) rows of a benchmark report: each variant's median ms and peak MiB, then the case's
    ratios and other scalar figures, then the headline."""
    rows = []
    for case_name, case in report.get("results", {}).items():
        for variant, v in case.get("variants", {}).items():
            rows.append((case_name, f"{variant} median ms", v.get("median_ms")))
            rows.append((case_name, f"{variant} peak MiB", v["peak_bytes"] / MIB if "peak_bytes" in v else None))
        rows += [(case_name, key, value) for key, value in case.items()
                 if key not in ("variants", "baseline", "candidate") and isinstance(value, (int, float, bool, str))]
        rows += [(case_name, f"{backend} {key}", value) for backend, figures in case.get("kernels", {}).items()
                 for key, value in figures.items()]
        if "routing" in case:
            rows.append((case_name, "auto runs", f"{case['routing']['auto']} ({case['routing']['case']}, "
                                                 f"{case['routing']['size']:,} elements)"))
    rows += [("headline", key, report.get(key)) for key in ("speed_ratio", "memory_ratio") if key in report]
    return rows


def figures(result: dict) -> list:
    """(case, figure, value) rows of one part's report."""
    report = result.get("report") or {}
    if result["group"] == "tests":
        return [("", key, report.get(key)) for key in ("passed", "failed", "errors", "skipped", "seconds")]
    if result["group"] == "train":
        return [("", key, report.get(key)) for key in ("steps", "tokens_per_s", "tflops", "mfu", "gpu_mem_peak_gb",
                                                        "graph_replays", "loss_first", "loss_last")]
    if result["group"] == "profile":
        rows = [("", key, report.get(key)) for key in ("step_ms", "device_ms", "cpu_self_ms", "busy_share")
                if key in report]
        return rows + [(row["name"][:80], f"ms ({row['calls']} calls), share of step",
                        f"{row['ms']:.3f} ({row['share_of_step']:.1%})" if row.get("share_of_step") is not None
                        else f"{row['ms']:.3f}") for row in report.get("top", [])[:PROFILE_ROWS]]
    return benchmark_figures(report)


def headline(result: dict) -> str:
    """A few words on a finished part for its progress line."""
    if result["status"] != "ok":
        return (result.get("error") or "").splitlines()[0][:120] if result.get("error") else ""
    report = result.get("report") or {}
    if result["group"] == "tests":
        return f"{report['passed']} passed, {report['failed']} failed, {report['errors']} errors, " \
               f"{report['skipped']} skipped"
    if result["group"] == "train":
        return f"tokens/s {number(report.get('tokens_per_s'))}, MFU {number(report.get('mfu'))}, " \
               f"peak {number(report.get('gpu_mem_peak_gb'))} GB"
    if result["group"] == "profile":
        top = report.get("top") or [{}]
        return f"step {number(report.get('step_ms'))} ms, busy {number(report.get('busy_share'))}, " \
               f"top: {str(top[0].get('name', ''))[:50]}"
    return f"speed_ratio {number(report.get('speed_ratio'))}, memory_ratio {number(report.get('memory_ratio'))}"


def progress_line(result: dict, elapsed: float) -> str:
    """The line printed as a part finishes: elapsed time, part, status, its time and box, a headline."""
    return (f"[{elapsed:6.0f} s] {result['name']:<22} {result['status']:<8} {result['seconds']:6.1f} s of "
            f"{result['limit_s']:5.0f}  {headline(result)}")


def write_suite(out: Path, summary: dict, results: list) -> dict:
    """suite.json: the run's settings and environment, and every part's result with its report."""
    suite = {**summary, "parts": results}
    (out / "suite.json").write_text(json.dumps(suite, indent=2) + "\n", encoding="utf-8")
    return suite


def markdown(suite: dict) -> str:
    """summary.md: the environment, then one table of every figure of every part."""
    env = suite["environment"]
    commit = f"{env.get('commit')}{' (uncommitted changes)' if env.get('dirty') else ''}"
    packages = ", ".join(f"{name} {version or 'absent'}" for name, version in env.get("optional_packages", {}).items())
    lines = [f"# mrgfast GPU suite: {env.get('device')}, {suite['date']}", "",
             f"Device {env.get('device')} ({env.get('device_memory_gib')} GiB), driver {env.get('driver')}, "
             f"torch {env.get('torch')} (CUDA {env.get('cuda')}), triton {env.get('triton')}, "
             f"Python {env.get('python')}, commit {commit}.",
             f"Optional packages: {packages or 'unknown'}.",
             f"Mode: {suite['mode']}; budget {suite['budget_s']:.0f} s, used {suite['seconds']:.0f} s; "
             f"`{suite['command']}`.", "",
             "| part | status | seconds (box) | headline or error |", "|---|---|---|---|"]
    for result in suite["parts"]:
        text = headline(result) if result["status"] == "ok" else (result.get("error") or "").replace("\n", " / ")[:300]
        lines.append(f"| {result['name']} | {result['status']} | {result['seconds']:.0f} ({result['limit_s']:.0f}) | "
                     f"{cell(text)} |")
    lines += ["", "| part | case | figure | value |", "|---|---|---|---|"]
    for result in suite["parts"]:
        for case, figure, value in figures(result) if result.get("report") else []:
            lines.append(f"| {result['name']} | {cell(case)} | {cell(figure)} | {'' if value is None else number(value)} |")
    return "\n".join(lines) + "\n"


def cell(text) -> str:
    """Text that cannot break a markdown table row."""
    return str(text).replace("|", "/").replace("\n", " ")


def write_summary(out: Path, suite: dict) -> Path:
    """Write summary.md beside suite.json."""
    path = out / "summary.md"
    path.write_text(markdown(suite), encoding="utf-8")
    return path
