"""How high report BLEU can go on the demo's synthetic data: oracles that know every study's true findings.

Each synthetic report sentence takes one of 2-6 phrasings, drawn with Zipf frequencies, so even a model that sees
every finding cannot know the phrasing. `python -m mrgfast.demo.bleu_ceiling [split]` scores, against the split's
references:
- `random_phrasing`: the true findings written with a fresh draw of phrasings (what a perfect model that samples
  phrasings at the data's frequencies gets);
- `best_fixed_phrasing`: the true findings and the reference's own sentence structure, with one fixed phrasing
  per template list, chosen by coordinate ascent on this very split (what a model that always writes the same
  phrasing might reach; a reference point, not a bound: the demo's SFT model, which writes the most common
  phrasing almost always, scores above it on test).
The demo's BLEU-4 target is read against these.
"""

import json
import sys
from typing import Optional, Sequence

from mrgfast.data.synthetic import reports
from mrgfast.data.synthetic.demo import chest_xray_studies
from mrgfast.demo.base_models import BaseModelSettings
from mrgfast.metrics import report_metrics

TEMPLATE_LISTS = ("HEART_NORMAL", "HEART_ENLARGED", "EFFUSION_NONE", "EFFUSION_SIDE", "EFFUSION_BOTH", "NODULE_NONE",
                  "NODULE_SIDE", "PNEUMOTHORAX_NONE", "PLEURA_NONE", "NORMAL_IMPRESSION")
REDRAW_OFFSET = 7919  # another style seed per study: same findings, other phrasing


def fixed_picker(choice: dict):
    """A write_report `pick` that takes option choice[name] of each template list, whatever the slot seed."""
    by_identity = {id(getattr(reports, name)): name for name in TEMPLATE_LISTS}

    def pick(options: tuple, slot_seed: int) -> str:
        return options[choice[by_identity[id(options)]]]
    return pick


def bleu_4(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus BLEU-4 as the demo's evaluation computes it (R2Gen cleaning, pycocoevalcap)."""
    return report_metrics(list(references), list(hypotheses), meteor=False)["BLEU_4"]


def ceilings(split: str = "test", settings: Optional[BaseModelSettings] = None, seed: int = 0,
             rounds: int = 2) -> dict:
    """{"random_phrasing", "best_fixed_phrasing", "choice", "n"} for `split` of the demo's chest X-ray data."""
    settings = settings or BaseModelSettings()
    studies = [(findings, style) for s, _, findings, _, style in
               chest_xray_studies(seed, settings.n_studies, settings.image_size) if s == split]
    if not studies:
        raise ValueError(f"no studies in split {split!r}; expected train, val or test")
    references = [reports.write_report(f, style) for f, style in studies]
    redrawn = [reports.write_report(f, style + REDRAW_OFFSET) for f, style in studies]
    choice = {name: 0 for name in TEMPLATE_LISTS}
    best = 0.0
    for _ in range(rounds):
        for name in TEMPLATE_LISTS:
            scores = []
            for option in range(len(getattr(reports, name))):
                trial = {**choice, name: option}
                scores.append(bleu_4(references, [reports.write_report(f, s, fixed_picker(trial))
                                                  for f, s in studies]))
            choice[name] = max(range(len(scores)), key=scores.__getitem__)
            best = max(scores)
    return {"split": split, "n": len(studies), "random_phrasing": bleu_4(references, redrawn),
            "best_fixed_phrasing": best, "choice": choice}


def main(argv=None) -> int:
    """Print the ceilings of a split (default test) as JSON."""
    argv = sys.argv[1:] if argv is None else list(argv)
    print(json.dumps(ceilings(*argv[:1]), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
