"""How the demo's settings are chosen: a sweep scored on the synthetic *validation* split, never on test.

`python -m mrgfast.demo.select [demo.<key>=value ...]` trains SFT once per candidate length, decodes the val split
with each candidate beam width, and picks by SFT_RULE; then trains DPO from that SFT checkpoint once per
candidate (steps, lr, beta) and picks by DPO_RULE. It writes `selection.json` (every candidate's val metrics and
the picks) into `demo.output_dir` (default runs/select). DemoOptions' defaults are what this picked; the test
split is measured once, by the demo itself, with those settings.
"""

import dataclasses
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from mrgfast.demo.base_models import FAST_SETTINGS, BaseModelSettings, prepare_base_models
from mrgfast.demo.run import DemoOptions, command_line, evaluate_stage, finished, sft_reference_logps, stage_config
from mrgfast.metrics import write_eval_json
from mrgfast.train import train

SPLIT = "val"
# Widened from (600, 1000, 1600) when the val pick sat at the grid's longest run (see README).
SFT_STEPS = (600, 1000, 1600, 2400, 3200)
BEAMS = (1, 3)
# (steps, lr, beta, rpo_alpha): around the gentle end, since DPO starts next to its reference (pi_ref = pi_SFT); then
# stronger ones, added when the gentle ones left the val hallucination rate where SFT had it; then the same with
# RPO's chosen-NLL term (rpo_alpha 1), added when plain DPO was seen to stop asserting true findings (README).
DPO_CANDIDATES = ((120, 1e-4, 2.0, 0.0), (120, 5e-5, 2.0, 0.0), (120, 1e-4, 0.5, 0.0), (60, 3e-4, 2.0, 0.0),
                  (300, 1e-4, 2.0, 0.0), (300, 3e-4, 0.5, 0.0), (600, 1e-4, 0.5, 0.0),
                  (120, 1e-4, 0.5, 1.0), (300, 1e-4, 0.5, 1.0), (300, 3e-4, 0.5, 1.0), (600, 3e-4, 0.5, 1.0))
DPO_KEYS = ("dpo_steps", "dpo_lr", "dpo_beta", "rpo_alpha")
SFT_RULE = "highest val BLEU_4 + clinical macro_f1 over (sft_steps, num_beams)"
# DPO exists here to cut hallucinated findings, but not by giving up the report: a candidate qualifies only if
# it keeps macro-F1 within 0.02 and BLEU-4 within 0.01 of its SFT start.
DPO_RULE = ("lowest val hallucination rate among candidates within 0.02 macro_f1 and 0.01 BLEU_4 of the SFT pick; "
            "ties: higher macro_f1, then higher BLEU_4")
F1_SLACK, BLEU_SLACK = 0.02, 0.01


def dpo_run_name(sft_steps: int, steps: int, lr: float, beta: float, rpo_alpha: float) -> str:
    """The directory (and generations file) name of one DPO candidate: all its settings, since a sweep into the same
    directory reuses a finished run of that name."""
    return f"dpo-sft{sft_steps}-{steps}steps-lr{lr:g}-beta{beta:g}" + (f"-rpo{rpo_alpha:g}" if rpo_alpha else "")


def sft_score(metrics: dict) -> float:
    """SFT_RULE's score of one val evaluation."""
    return metrics["report"]["BLEU_4"] + metrics["clinical"]["macro_f1"]


def pick_sft(candidates: Sequence[dict]) -> dict:
    """The SFT candidate SFT_RULE picks (first one on a tie)."""
    return max(candidates, key=lambda c: sft_score(c["metrics"]))


def pick_dpo(sft_metrics: dict, candidates: Sequence[dict]) -> Optional[dict]:
    """The DPO candidate DPO_RULE picks, or None when none keeps the report within the slack."""
    f1, bleu = sft_metrics["clinical"]["macro_f1"], sft_metrics["report"]["BLEU_4"]
    eligible = [c for c in candidates if c["metrics"]["clinical"]["macro_f1"] >= f1 - F1_SLACK
                and c["metrics"]["report"]["BLEU_4"] >= bleu - BLEU_SLACK]
    if not eligible:
        return None
    return min(eligible, key=lambda c: (c["metrics"]["hallucination"]["rate"], -c["metrics"]["clinical"]["macro_f1"],
                                        -c["metrics"]["report"]["BLEU_4"]))


@dataclasses.dataclass
class Grid:
    """The candidates of one sweep."""

    sft_steps: tuple = SFT_STEPS
    beams: tuple = BEAMS
    dpo: tuple = DPO_CANDIDATES

    @classmethod
    def fast(cls) -> "Grid":
        """A seconds-long grid for tests (same code path, tiny budgets)."""
        return cls(sft_steps=(2, 3), beams=(1, 2), dpo=((2, 1e-4, 2.0, 0.0), (1, 3e-4, 0.5, 1.0)))


def run_selection(options: DemoOptions, grid: Optional[Grid] = None,
                  settings: Optional[BaseModelSettings] = None) -> dict:
    """Run the sweep on the val split; returns (and writes as selection.json) every candidate and the picks."""
    options = options.resolved()
    grid = grid if grid is not None else (Grid.fast() if options.fast else Grid())
    torch.set_num_threads(options.threads)
    settings = settings if settings is not None else (FAST_SETTINGS if options.fast else BaseModelSettings())
    out, start = Path(options.output_dir), time.perf_counter()
    base = prepare_base_models(options.cache_dir, options.seed, settings)

    sft_runs = []
    for steps in grid.sft_steps:
        # resume=auto: a run finished by an earlier sweep into the same directory is reused, not retrained.
        config = stage_config(base, dataclasses.replace(options, sft_steps=steps), "sft", out / f"sft-{steps}",
                              resume="auto")
        checkpoint = finished(train(config)).checkpoint
        for beams in grid.beams:
            metrics = evaluate_stage(config, options, checkpoint, f"sft-{steps}-beam{beams}", out, SPLIT, beams)
            sft_runs.append({"sft_steps": steps, "num_beams": beams, "checkpoint": str(checkpoint),
                             "score": sft_score(metrics), "metrics": metrics})
            print(f"[select] SFT {steps} steps, beam {beams}: BLEU_4 {metrics['report']['BLEU_4']:.4f}, "
                  f"macro_f1 {metrics['clinical']['macro_f1']:.4f}")
    sft = pick_sft(sft_runs)

    dpo_runs = []
    chosen = dataclasses.replace(options, sft_steps=sft["sft_steps"], num_beams=sft["num_beams"])
    for steps, lr, beta, alpha in grid.dpo:
        candidate = dataclasses.replace(chosen, dpo_steps=steps, dpo_lr=lr, dpo_beta=beta, rpo_alpha=alpha)
        name = dpo_run_name(sft["sft_steps"], steps, lr, beta, alpha)
        config = stage_config(base, candidate, "dpo", out / name, init_from=sft["checkpoint"], resume="auto")
        sft_reference_logps(config)
        checkpoint = finished(train(config)).checkpoint
        metrics = evaluate_stage(config, candidate, checkpoint, name, out, SPLIT)
        dpo_runs.append({"dpo_steps": steps, "dpo_lr": lr, "dpo_beta": beta, "rpo_alpha": alpha,
                         "checkpoint": str(checkpoint), "metrics": metrics})
        print(f"[select] DPO {steps} steps lr {lr:g} beta {beta:g} rpo_alpha {alpha:g}: hallucination "
              f"{metrics['hallucination']['rate']:.4f}, macro_f1 {metrics['clinical']['macro_f1']:.4f}, "
              f"BLEU_4 {metrics['report']['BLEU_4']:.4f}")
    dpo = pick_dpo(sft["metrics"], dpo_runs)

    summary = {"split": SPLIT, "rules": {"sft": SFT_RULE, "dpo": DPO_RULE}, "sft": sft_runs, "dpo": dpo_runs,
               "picked": {"sft_steps": sft["sft_steps"], "num_beams": sft["num_beams"],
                          "dpo": None if dpo is None else {k: dpo[k] for k in DPO_KEYS}},
               "seconds": time.perf_counter() - start}
    write_eval_json(out / "selection.json", summary)
    print(f"[select] picked {summary['picked']} on the {SPLIT} split; wrote {out / 'selection.json'}")
    return summary


def main(argv=None) -> int:
    """Command-line entry: `demo.<key>=value` arguments as for the demo (output_dir defaults to runs/select)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not any(a.lstrip("-").removeprefix("demo.").startswith("output_dir=") for a in argv):
        argv.append("demo.output_dir=runs/select")
    return command_line(argv, "mrgfast.demo.select", run_selection)


if __name__ == "__main__":
    sys.exit(main())
