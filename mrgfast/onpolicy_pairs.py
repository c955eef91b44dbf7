"""On-policy DPO pairs: the model's own sampled reports that assert a finding the study lacks (rejected) against the
faithful reference report (chosen). `python -m mrgfast.onpolicy_pairs checkpoint=PATH out=pairs.jsonl [...]`.

Template pairs (a finding injected into the reference) teach DPO errors a model may never make; pairs drawn from
the model itself aim at the hallucinations it does make (the RLHF-V / RLAIF-V construction), labelled here by the
finding labeler against the reference. The file is the JSONL `data.dataset=preference` reads, with absolute image
paths (so train on it with `data.allow_outside_image_dir=true`).
"""

import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from mrgfast.assemble.evaluation import checkpoint_config, prepare_eval
from mrgfast.common.files import atomic_write_text
from mrgfast.common.program import run_program
from mrgfast.config import parse_command_line
from mrgfast.data.labeler import label_report
from mrgfast.data.text import clean_report_iu_xray
from mrgfast.evaluate import HALLUCINATION_FINDINGS, generate_texts, loadable_samples


@dataclasses.dataclass
class PairOptions:
    """How many reports are drawn per study and how (transformers' sampling names); checked when given, so a bad
    option fails before the model is loaded."""

    num_samples: int = 4
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 100
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {self.num_samples!r}")
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1: off), got {self.top_p}")


def hallucinated(reference: str, generated: str) -> list:
    """The findings `generated` asserts that `reference` does not (by the finding labeler), in labeler order."""
    ref, gen = label_report(reference), label_report(generated)
    return [name for name in HALLUCINATION_FINDINGS if gen.get(name) == 1 and ref.get(name) != 1]


def draw_reports(model, tokenizer, samples: Sequence, builder, image_config, options: PairOptions) -> list:
    """options.num_samples sampled reports per sample: a list (per sample) of lists of texts."""
    generator = torch.Generator().manual_seed(options.seed)
    repeated = [s for s in samples for _ in range(options.num_samples)]
    texts = generate_texts(model, tokenizer, repeated, builder, image_config, options.batch_size, 1,
                           options.max_new_tokens, do_sample=True, temperature=options.temperature,
                           top_k=options.top_k, top_p=options.top_p, generator=generator)
    k = options.num_samples
    return [texts[i * k:(i + 1) * k] for i in range(len(samples))]


def choose_pairs(samples: Sequence, drawn: Sequence[Sequence[str]],
                 clean: Callable[[str], str] = clean_report_iu_xray) -> tuple:
    """(pair rows, counts): per sample, its cleaned reference as chosen and, as rejected, the drawn report with the
    fewest hallucinated findings among those with at least one (first drawn on a tie: the closest to the reference
    that is still wrong); samples none of whose draws hallucinates give no pair."""
    if len(samples) != len(drawn):
        raise ValueError(f"{len(samples)} samples but {len(drawn)} lists of drawn reports")
    rows, counts = [], {"studies": len(samples), "drawn": 0, "drawn_with_hallucination": 0, "pairs": 0}
    for sample, texts in zip(samples, drawn):
        reference = clean(sample.answer)
        wrong = [(len(found), i, found) for i, text in enumerate(texts) if (found := hallucinated(reference, text))]
        counts["drawn"] += len(texts)
        counts["drawn_with_hallucination"] += len(wrong)
        if not wrong:
            continue
        _, index, found = min(wrong)
        rows.append({"id": sample.id, "images": [os.path.abspath(p) for p in sample.image_paths],
                     "prompt": sample.prompt,
                     "chosen": reference, "rejected": texts[index], "change": "hallucinated: " + ", ".join(found)})
    counts["pairs"] = len(rows)
    return rows, counts


def build_onpolicy_pairs(model, tokenizer, samples: Sequence, builder, image_config, out,
                         options: Optional[PairOptions] = None,
                         clean: Callable[[str], str] = clean_report_iu_xray, skip_bad_samples: bool = False) -> dict:
    """Draw reports for the report samples, write the pairs to `out` (JSONL, atomically) and return the counts (with
    `skip_bad_samples`, samples whose images do not load are left out, counted under "data")."""
    options = options or PairOptions()
    samples, data_stats = loadable_samples(samples, image_config, skip_bad_samples)
    reports = [s for s in samples if s.task == "report"]
    if not reports:
        raise ValueError("on-policy pairs need report samples (task 'report'), got none")
    drawn = draw_reports(model, tokenizer, reports, builder, image_config, options)
    rows, counts = choose_pairs(reports, drawn, clean)
    if not rows:
        raise ValueError(f"none of the {counts['drawn']} drawn reports asserts a finding its reference lacks: no "
                         f"pairs to write to {out} (draw more with num_samples or a higher temperature)")
    atomic_write_text(out, "".join(json.dumps(row) + "\n" for row in rows), fsync=True)
    if skip_bad_samples:
        counts["data"] = dict(data_stats)
    return counts


@dataclasses.dataclass(kw_only=True)
class PairsCommand(PairOptions):
    """What `python -m mrgfast.onpolicy_pairs` takes besides training-config keys: PairOptions, the checkpoint, the
    output file and the split to draw for (train by default)."""

    checkpoint: str = dataclasses.field(metadata={"help": "a step-XXXXXX directory written by mrgfast.train"})
    out: str = dataclasses.field(metadata={"help": "the pairs JSONL to write"})
    split: str = "train"


def main(argv=None) -> int:
    """Command-line entry: draw from a checkpoint's model on a split (default train), write the pairs JSONL; an error
    is one line and its exit code (mrgfast.common.program)."""
    return run_program("onpolicy_pairs", pairs_from_cli, argv)


def pairs_from_cli(argv: list) -> int:
    """Build the pairs the arguments describe (options checked before the model is loaded)."""
    command, overrides = parse_command_line(argv, PairsCommand)
    config = checkpoint_config(command.checkpoint, overrides)
    model, tokenizer, builder, image_config, samples = prepare_eval(config, command.split, Path(command.checkpoint))
    options = PairOptions(**{f.name: getattr(command, f.name) for f in dataclasses.fields(PairOptions)})
    counts = build_onpolicy_pairs(model, tokenizer, samples, builder, image_config, Path(command.out), options,
                                  skip_bad_samples=config.data.skip_bad_samples)
    print(f"[onpolicy_pairs] {counts['pairs']} pairs from {counts['studies']} studies "
          f"({counts['drawn_with_hallucination']} of {counts['drawn']} drawn reports hallucinate) -> {command.out} "
          "(absolute image paths: train on it with data.allow_outside_image_dir=true)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
