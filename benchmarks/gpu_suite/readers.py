"""What a finished part left, read into its report: the JSON it wrote, pytest's junit.xml, a run's metrics.jsonl."""

import json
import statistics
import xml.etree.ElementTree as ElementTree
from pathlib import Path

FAILED_SHOWN = 20  # failing test ids listed in a report


def read_json(path: Path) -> dict:
    """The JSON report a benchmark or the profiler wrote."""
    return json.loads(path.read_text(encoding="utf-8"))


def read_pytest(junit: Path) -> dict:
    """Counts of pytest's junit.xml (passed, failed, errors, skipped, seconds) and the failing tests' ids."""
    root = ElementTree.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failing = [f"{case.get('classname', '')}::{case.get('name', '')}" for case in root.iter("testcase")
               if case.find("failure") is not None or case.find("error") is not None]
    return {"name": "tests", "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": counts["failures"], "errors": counts["errors"], "skipped": counts["skipped"],
            "seconds": sum(float(s.get("time", 0.0)) for s in suites), "failing": failing[:FAILED_SHOWN]}


def read_train(metrics: Path) -> dict:
    """A training run's logged records and their figures after warm-up (the graph replays, when it captured one;
    else every record after the first): median tokens/s, TFLOP/s and MFU, peak GPU memory, first and last loss."""
    records = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{metrics}: no records")
    warm = [r for r in records if r.get("graph_replays", 0) > 0] or records[1:] or records

    def median(key):
        values = [r[key] for r in warm if isinstance(r.get(key), (int, float))]
        return statistics.median(values) if values else None

    peaks = [r["gpu_mem_peak_gb"] for r in records if isinstance(r.get("gpu_mem_peak_gb"), (int, float))]
    last = records[-1]
    return {"name": "train_cuda_graphs", "steps": last["step"], "records_after_warmup": len(warm),
            "tokens_per_s": median("tokens_per_s"), "tflops": median("tflops"), "mfu": median("mfu"),
            "gpu_mem_peak_gb": max(peaks) if peaks else None, "graph_replays": last.get("graph_replays"),
            "graph_eager_steps": last.get("graph_eager_steps"), "loss_first": records[0].get("loss"),
            "loss_last": last.get("loss"), "records": records}


def read_report(reader: str, json_path: Path, work: Path) -> dict:
    """The part's report by its reader (see parts.Part.reader); the ones the suite derives are written to
    `json_path` too, so every part leaves a <part>.json."""
    if reader == "json":
        return read_json(json_path)
    derived = {"pytest": lambda: read_pytest(work / "junit.xml"), "train": lambda: read_train(work / "run" / "metrics.jsonl")}
    report = derived[reader]()
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report
