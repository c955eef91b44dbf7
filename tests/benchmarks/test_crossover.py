"""The crossover script on synthetic reports: the smallest size a kernel wins from and keeps winning, ties, losers,
a suite folder, bad reports, and the GPU suite's routing_table.txt."""

import json

import pytest

from benchmarks import crossover
from benchmarks.gpu_suite.__main__ import write_routing_table
from mrgfast.ops.routing import Route


def case(op, routing_case, size, **speeds):
    """A benchmark case as the routed benchmarks write it (only what the crossover reads)."""
    return {"kernels": {b: {"speed_ratio": r, "memory_ratio": 0.5} for b, r in speeds.items()},
            "routing": {"op": op, "case": routing_case, "size": size, "auto": "reference", "why": ""}}


def report(name, device, results):
    """A benchmark report holding `results`."""
    return {"name": name, "config": {"device": device}, "results": results}


REPORTS = [
    report("grouped_projection", "cuda", {
        # Triton wins from 4 images on (the 2-image point loses); CUDA wins only at 16: Triton's crossover is smaller.
        "p_16img": case("grouped_projection", "1d_frozen_x", 1600, triton=1.3, cuda=1.05),
        "p_8img": case("grouped_projection", "1d_frozen_x", 800, triton=1.2, cuda=0.9),
        "p_4img": case("grouped_projection", "1d_frozen_x", 400, triton=1.0, cuda=0.8),
        "p_2img": case("grouped_projection", "1d_frozen_x", 200, triton=0.7, cuda=0.6),
        "p_1img": case("grouped_projection", "1d_frozen_x", 100, triton=1.1, cuda=0.5),  # a win below a loss: no
        # Loses at the largest size: the torch path, whatever smaller sizes did.
        "q_16img": case("grouped_projection", "2d_train_x", 1600, triton=0.9, cuda=0.95),
        "q_8img": case("grouped_projection", "2d_train_x", 800, triton=1.5, cuda=1.5),
    }),
    report("affine_prompt", "cuda", {
        # Two measurements at one size (B16 L32 and B8 L64): both must win.
        "op_a": case("affine_prompt", "book_new", 2048, triton=1.1, cuda=1.2),
        "op_b": case("affine_prompt", "book_new", 2048, triton=1.07, cuda=0.99),
        "seq_a": case("affine_prompt", "book_out", 2048, triton=1.0, cuda=1.0),  # ties go to the faster at the top
        "op_p": case("affine_prompt", "prompt_new", 100, triton=1.1, cuda=1.3),  # both win from 100: the faster
        "other": {"variants": {}},  # a case without routing figures is not read
    }),
    report("group_tokens", "cpu", {"g": case("group_tokens", "2d", 10, cpu=1.5)}),
]


def test_the_crossover_of_each_case():
    table = crossover.crossover(crossover.measurements(REPORTS))
    assert table == {
        ("cuda", "grouped_projection", "1d_frozen_x"): Route("triton", 400),
        ("cuda", "grouped_projection", "2d_train_x"): None,
        ("cuda", "affine_prompt", "book_new"): Route("triton", 2048),
        ("cuda", "affine_prompt", "book_out"): Route("cuda", 2048),  # a complete tie: the first by name
        ("cuda", "affine_prompt", "prompt_new"): Route("cuda", 100),
        ("cpu", "group_tokens", "2d"): Route("cpu", 10),
    }
    # A stricter threshold moves the crossover up, or removes it.
    strict = crossover.crossover(crossover.measurements(REPORTS), min_speed=1.15)
    assert strict[("cuda", "grouped_projection", "1d_frozen_x")] == Route("triton", 800)
    assert strict[("cuda", "affine_prompt", "book_new")] is None


def test_the_text_is_the_routing_modules_format_with_its_evidence():
    text = crossover.table_text(REPORTS)
    assert "    # cuda grouped_projection 1d_frozen_x: 100: cuda 0.50 triton 1.10; 200: cuda 0.60 triton 0.70;" in text
    entries = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert entries[0] == "    ('cuda', 'grouped_projection', '1d_frozen_x'): Route('triton', 400),"
    assert "    ('cuda', 'grouped_projection', '2d_train_x'): None," in entries
    assert entries[-1] == "    ('cpu', 'group_tokens', '2d'): Route('cpu', 10),"  # cuda first, then cpu


def test_a_suite_folder_and_the_command_line(tmp_path, capsys):
    parts = [{"name": r["name"], "report": r} for r in REPORTS] + [{"name": "tests", "report": None}]
    (tmp_path / "suite.json").write_text(json.dumps({"parts": parts}))
    assert crossover.main([str(tmp_path)]) == 0
    assert capsys.readouterr().out == crossover.table_text(REPORTS)
    single = tmp_path / "one.json"
    single.write_text(json.dumps(REPORTS[2]))
    assert crossover.main([str(single)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "    ('cpu', 'group_tokens', '2d'): Route('cpu', 10),"
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps(report("lora_linear", "cuda", {"x": {"variants": {}}})))
    assert crossover.main([str(empty)]) == 1


def test_bad_reports_are_named(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(SystemExit, match="broken.json: not a readable JSON report"):
        crossover.load_reports([broken])
    unknown = report("group_tokens", "cuda", {"g": case("group_tokens", "3d", 10, triton=2.0)})
    with pytest.raises(SystemExit, match="case 'g' names routing case 'group_tokens'/'3d'"):
        crossover.measurements([unknown])


def test_the_gpu_suite_writes_the_routing_table(tmp_path, capsys):
    results = [{"name": r["name"], "report": r} for r in REPORTS] + [{"name": "tests", "report": None}]
    write_routing_table(tmp_path, results)
    assert (tmp_path / "routing_table.txt").read_text() == crossover.table_text(REPORTS)
    other = tmp_path / "none"
    other.mkdir()
    write_routing_table(other, [{"name": "tests", "report": None}])
    assert not (other / "routing_table.txt").exists()
