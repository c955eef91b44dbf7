"""Generation + metrics: `python -m mrgfast.evaluate checkpoint=PATH [data.split=test] [key=value ...]`.

`evaluate_model` generates (KV cache, greedy or beam, batched) through MultimodalLM.generate and scores what it
wrote: report metrics on R2Gen-cleaned text (as R2Gen's compute_scores, plus CIDEr), clinical finding P/R/F1 and
the hallucination rate from the finding labeler (reference vs generated report), and VQA exact match split
closed/open. The CLI rebuilds the model of a training run from its resolved config.yaml, loads a checkpoint's
adapter and trainable weights, and writes eval.json, generations.jsonl and a one-screen table. With
data.skip_bad_samples, samples whose media do not load are left out and counted (eval.json's "data").
"""

import dataclasses
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from mrgfast.assemble.evaluation import checkpoint_config, metric_cleaning, prepare_eval
from mrgfast.common.program import run_program
from mrgfast.config import parse_command_line
from mrgfast.data.dataset import MedicalDataset
from mrgfast.data.images import ImageConfig
from mrgfast.data.labeler import OBSERVATIONS, label_report
from mrgfast.data.samples import SampleSet
from mrgfast.data.text import clean_report_iu_xray
from mrgfast.data.volumes import VolumeConfig
from mrgfast.metrics import (clinical_metrics, format_table, hallucination_rate, report_metrics,
                             vqa_accuracy, write_eval_json, write_generations)

__all__ = ["EvalOptions", "SUMMARY_METRICS", "evaluate_model", "generate_texts", "loadable_samples", "main",
           "summary_table"]

REPORT_TASKS = ("report", "caption")
EVAL_NAME = "eval"  # -> eval.json and eval.generations.jsonl
GENERATIONS = "generations.jsonl"
# 'No Finding' asserts an absence: it is scored for P/R/F1 but not counted as a hallucinated finding.
HALLUCINATION_FINDINGS = tuple(name for name in OBSERVATIONS if name != "No Finding")
# The rows of the one-screen table (runs as columns).
SUMMARY_METRICS = ("report/BLEU_1", "report/BLEU_4", "report/METEOR", "report/ROUGE_L", "report/CIDEr",
                   "clinical/micro_f1", "clinical/macro_precision", "clinical/macro_recall", "clinical/macro_f1",
                   "hallucination/rate", "hallucination/reports_with_hallucination", "vqa/overall", "vqa/closed",
                   "vqa/open", "generation/seconds")


def media_kwargs(media: Union[ImageConfig, VolumeConfig, None]) -> dict:
    """MedicalDataset's keyword for a media config: volume_config for a VolumeConfig, else image_config."""
    return {"volume_config": media} if isinstance(media, VolumeConfig) else {"image_config": media}


def loadable_samples(samples: Sequence, image_config: Union[ImageConfig, VolumeConfig, None],
                     skip_bad_samples: bool) -> tuple:
    """(the samples to generate for, their counts: the reader's plus, with `skip_bad_samples`, each sample whose
    media do not load, left out and counted by reason as in training). Without it every sample is kept and a bad one
    fails when generation loads it, naming it."""
    if not skip_bad_samples:
        stats = Counter(getattr(samples, "stats", {}))
        stats["kept"] = len(samples)
        return list(samples), stats
    dataset = MedicalDataset(samples, **media_kwargs(image_config), skip_bad_samples=True).check()
    return dataset.samples, dataset.stats


def generate_texts(model, tokenizer, samples: Sequence, builder,
                   image_config: Union[ImageConfig, VolumeConfig, None] = None, batch_size: int = 16,
                   num_beams: int = 1, max_new_tokens: int = 100, **generate_kwargs) -> list:
    """The decoded generation of each sample (its prompt only; the answer is never shown), in sample order.
    `image_config` says how the media are loaded (a VolumeConfig for CT volumes, as prepare_eval returns it);
    generate_kwargs (do_sample, temperature, top_k, top_p, generator, ...) go to models.generate."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    views = sorted({len(s.image_paths) for s in samples})
    if len(views) > 1:
        # The builder reserves slots for a fixed number of images: one dataset (one view count) at a time.
        raise ValueError(f"samples mix {views} images per sample; evaluate each dataset on its own, with a "
                         "PromptBuilder made for its number of images")
    dataset = MedicalDataset(samples, **media_kwargs(image_config))
    was_training = model.training
    model.eval()  # no dropout (LoRA's included) while generating
    texts = []
    try:
        for start in range(0, len(samples), batch_size):
            chunk = range(start, min(start + batch_size, len(samples)))
            items = [dataset.load(i) for i in chunk]
            # encode(instruction, answer="") gives the prompt part the model would see at test time.
            prompts = [builder.encode(item["prompt"], "", item["task"], str(item["id"])) for item in items]
            pixels = torch.stack([item["pixel_values"] for item in items]) if model.adapters else None
            new_ids = model.generate(prompts, pixel_values=pixels, max_new_tokens=max_new_tokens,
                                     num_beams=num_beams, eos_token_id=tokenizer.eos_token_id, **generate_kwargs)
            texts += [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new_ids]
    finally:
        model.train(was_training)
    return texts


def clinical_scores(references: Sequence[str], hypotheses: Sequence[str]) -> tuple:
    """(clinical P/R/F1 over the findings the references have, hallucination rate, per-report label rows)."""
    ref_labels = [label_report(text) for text in references]
    gen_labels = [label_report(text) for text in hypotheses]
    # Macro means over findings no reference has would only add zeros (clinical.py): score findings with support.
    supported = [name for name in OBSERVATIONS if any(labels.get(name) == 1 for labels in ref_labels)]
    clinical = clinical_metrics(ref_labels, gen_labels, findings=supported or list(OBSERVATIONS))
    clinical["findings"] = supported
    hallucination = hallucination_rate(ref_labels, gen_labels, findings=HALLUCINATION_FINDINGS)
    return clinical, hallucination, ref_labels, gen_labels


def positives(labels: dict) -> list:
    """The findings a label dict marks present (label 1), for the generations file."""
    return [name for name, value in labels.items() if value == 1]


def evaluate_model(model, tokenizer, samples: Sequence, builder,
                   image_config: Union[ImageConfig, VolumeConfig, None] = None, *,
                   batch_size: int = 16, num_beams: int = 1, max_new_tokens: int = 100, meteor: bool = True,
                   clean: Callable[[str], str] = clean_report_iu_xray, output_dir=None, name: str = "eval",
                   log: Optional[Callable[[str], None]] = print, skip_bad_samples: bool = False) -> dict:
    """Generate for every sample and score it; returns the metrics dict (report, clinical, hallucination, vqa,
    generation), and when `output_dir` is given writes `<name>.json` and `<name>.generations.jsonl` there.

    Report and caption samples get the report metrics, clinical P/R/F1 (micro and macro over the findings with
    support in the references) and the hallucination rate; VQA samples get exact-match accuracy, closed/open.
    `model` is a MultimodalLM, `builder` a PromptBuilder matching it, `image_config` how to load the media (a
    VolumeConfig for CT volumes). With `skip_bad_samples` samples whose media do not load are left out; "data" holds
    the counts (the reader's, when `samples` is a SampleSet, and those skips).
    """
    samples, data_stats = loadable_samples(samples, image_config, skip_bad_samples)
    if not samples:
        raise ValueError("evaluate_model needs at least one sample, got none")
    start = time.perf_counter()
    texts = generate_texts(model, tokenizer, samples, builder, image_config, batch_size, num_beams, max_new_tokens)
    seconds = time.perf_counter() - start
    new_tokens = sum(len(tokenizer.encode(t)) for t in texts)
    metrics = {"n_samples": len(samples), "data": dict(data_stats)}
    extra = {"task": [s.task for s in samples], "ref_findings": [None] * len(samples),
             "gen_findings": [None] * len(samples)}
    reports = [i for i, s in enumerate(samples) if s.task in REPORT_TASKS]
    if reports:
        refs, hyps = [samples[i].answer for i in reports], [texts[i] for i in reports]
        metrics["report"] = report_metrics(refs, hyps, clean=clean, meteor=meteor)
        clinical, hallucination, ref_labels, gen_labels = clinical_scores(refs, hyps)
        hallucination.pop("per_report")  # one number per sample: kept in the generations file instead
        metrics["clinical"], metrics["hallucination"] = clinical, hallucination
        for i, ref, gen in zip(reports, ref_labels, gen_labels):
            extra["ref_findings"][i], extra["gen_findings"][i] = positives(ref), positives(gen)
    questions = [i for i, s in enumerate(samples) if s.task == "vqa"]
    if questions:
        metrics["vqa"] = vqa_accuracy([texts[i] for i in questions], [samples[i].answer for i in questions],
                                      [samples[i].answer_type for i in questions])
    metrics["generation"] = {"seconds": seconds, "new_tokens": new_tokens, "tokens_per_s": new_tokens / seconds,
                             "num_beams": num_beams, "max_new_tokens": max_new_tokens}
    if output_dir is not None:
        out = Path(output_dir)
        write_eval_json(out / f"{name}.json", metrics)
        write_generations(out / f"{name}.{GENERATIONS}", [s.answer for s in samples], texts,
                          ids=[s.id for s in samples], **extra)
    if log is not None:
        log(f"[evaluate] {name}: {len(samples)} samples, {new_tokens} tokens generated in {seconds:.1f}s")
    return metrics


def summary_table(results: dict) -> str:
    """The one-screen table of runs (columns) over SUMMARY_METRICS rows that at least one run has."""
    from mrgfast.metrics import flatten_metrics
    present = {key for metrics in results.values() for key in flatten_metrics(metrics)}
    return format_table(results, metrics=[m for m in SUMMARY_METRICS if m in present])


# ------------------------------------------------------------------------------------------------------ CLI

@dataclasses.dataclass
class EvalOptions:
    """What `python -m mrgfast.evaluate` takes besides training-config keys (which re-read the run's data/model)."""

    checkpoint: str = dataclasses.field(metadata={"help": "a step-XXXXXX directory written by mrgfast.train"})
    split: str = "test"
    num_beams: int = 1
    max_new_tokens: int = 100
    batch_size: int = 16
    limit: Optional[int] = None
    meteor: bool = True
    output_dir: Optional[str] = None

    def __post_init__(self):
        for key in ("num_beams", "max_new_tokens", "batch_size", "limit"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key}={value}: expected an integer >= 1")


def parse_args(argv: Sequence[str]) -> tuple:
    """(EvalOptions, training-config overrides) from `key=value` arguments (`data=PATH`: data.path)."""
    return parse_command_line(argv, EvalOptions, aliases={"data": "data.path"})


def main(argv=None) -> int:
    """Command-line entry: evaluate a checkpoint, write eval.json + generations.jsonl, print the table; an error is
    one line and its exit code (mrgfast.common.program)."""
    return run_program("evaluate", evaluate_from_cli, argv)


def evaluate_from_cli(argv: list) -> int:
    """Evaluate the checkpoint the arguments name."""
    options, overrides = parse_args(argv)
    config = checkpoint_config(options.checkpoint, overrides)
    model, tokenizer, builder, image_config, samples = prepare_eval(config, options.split, Path(options.checkpoint))
    if options.limit is not None:
        samples = SampleSet(samples[:options.limit], samples.stats)
    out = Path(options.output_dir or Path(options.checkpoint) / "eval")
    metrics = evaluate_model(model, tokenizer, samples, builder, image_config, batch_size=options.batch_size,
                             num_beams=options.num_beams, max_new_tokens=options.max_new_tokens,
                             meteor=options.meteor, clean=metric_cleaning(config), output_dir=out, name=EVAL_NAME,
                             skip_bad_samples=config.data.skip_bad_samples)
    print(summary_table({Path(options.checkpoint).name: metrics}))
    print(f"mrgfast.evaluate: wrote {out / (EVAL_NAME + '.json')} and {out / (EVAL_NAME + '.' + GENERATIONS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
