"""Generation + metrics: `python -m mrgfast.evaluate checkpoint=PATH [data.split=test] [key=value ...]`.

`evaluate_model` generates (KV cache, greedy or beam, batched) through MultimodalLM.generate and scores what it
wrote: report metrics on R2Gen-cleaned text (as R2Gen's compute_scores, plus CIDEr), clinical finding P/R/F1 and
the hallucination rate from the finding labeler (reference vs generated report), and VQA exact match split
closed/open. The CLI rebuilds the model of a training run from its resolved config.yaml, loads a checkpoint's
adapter and trainable weights, and writes eval.json, generations.jsonl and a one-screen table.
"""

import copy
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from mrgfast.data.dataset import MedicalDataset
from mrgfast.data.images import ImageConfig
from mrgfast.data.labeler import OBSERVATIONS, label_report
from mrgfast.data.text import clean_report_iu_xray, clean_report_mimic_cxr
from mrgfast.data.volumes import VolumeConfig
from mrgfast.metrics import (clinical_metrics, format_table, hallucination_rate, java_available, report_metrics,
                             vqa_accuracy, write_eval_json, write_generations)

__all__ = ["SUMMARY_METRICS", "evaluate_model", "java_available", "main", "metric_cleaning", "prepare_eval",
           "report_metrics", "summary_table"]

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
                   log: Optional[Callable[[str], None]] = print) -> dict:
    """Generate for every sample and score it; returns the metrics dict (report, clinical, hallucination, vqa,
    generation), and when `output_dir` is given writes `<name>.json` and `<name>.generations.jsonl` there.

    Report and caption samples get the report metrics, clinical P/R/F1 (micro and macro over the findings with
    support in the references) and the hallucination rate; VQA samples get exact-match accuracy, closed/open.
    `model` is a MultimodalLM, `builder` a PromptBuilder matching it, `image_config` how to load the media (a
    VolumeConfig for CT volumes).
    """
    samples = list(samples)
    if not samples:
        raise ValueError("evaluate_model needs at least one sample, got none")
    start = time.perf_counter()
    texts = generate_texts(model, tokenizer, samples, builder, image_config, batch_size, num_beams, max_new_tokens)
    seconds = time.perf_counter() - start
    new_tokens = sum(len(tokenizer.encode(t)) for t in texts)
    metrics = {"n_samples": len(samples)}
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

CLI_KEYS = ("checkpoint", "split", "num_beams", "max_new_tokens", "batch_size", "limit", "meteor", "output_dir")


def parse_args(argv: Sequence[str]) -> tuple:
    """(evaluation options, training-config overrides) from `key=value` arguments; checkpoint= is required."""
    options = {"split": "test", "num_beams": 1, "max_new_tokens": 100, "batch_size": 16, "limit": None,
               "meteor": True, "output_dir": None}
    overrides = []
    for item in argv:
        if "=" not in item:
            raise ValueError(f"argument {item!r}: expected key=value (checkpoint=PATH, split=test, num_beams=3, ...)")
        key, value = item.split("=", 1)
        key = key.lstrip("-")
        if key == "data":  # `data=PATH`: shorthand for the data root / annotation file
            overrides.append(f"data.path={value}")
        elif key in CLI_KEYS:
            options[key] = value
        else:
            overrides.append(f"{key}={value}")  # a training-config key (model.*, data.*, ...)
    if "checkpoint" not in options:
        raise ValueError("checkpoint=PATH is required: a step-XXXXXX directory written by mrgfast.train")
    from mrgfast.training.config_parse import convert
    for key, kind in (("num_beams", int), ("max_new_tokens", int), ("batch_size", int), ("limit", Optional[int])):
        options[key] = convert(options[key], kind, key)
        if options[key] is not None and options[key] < 1:
            raise ValueError(f"{key}={options[key]}: expected an integer >= 1")
    options["meteor"] = convert(options["meteor"], bool, "meteor")  # a typo is an error, not a silent 'false'
    return options, overrides


def run_config(checkpoint: Path, overrides: Sequence[str]):
    """The training config of the run that wrote `checkpoint` (its output_dir's config.yaml), with overrides."""
    from mrgfast.training.config import RESOLVED_NAME, load_config
    for directory in (checkpoint, checkpoint.parent):
        if (directory / RESOLVED_NAME).is_file():
            return load_config(directory / RESOLVED_NAME, overrides)
    raise FileNotFoundError(f"no {RESOLVED_NAME} in {checkpoint} or {checkpoint.parent}: the checkpoint must sit in "
                            "the output_dir of an mrgfast.train run")


def prepare_eval(config, split: str = "test", checkpoint=None):
    """(model of `config` in eval mode, tokenizer, builder, media config (the ImageConfig, or the VolumeConfig of a
    CT recipe), samples of `split`); with `checkpoint`, its adapter and trainable weights are loaded, else the
    adapters stay at their initialisation (the untrained baseline)."""
    from mrgfast.common.rng import seed_everything
    from mrgfast.data import PromptBuilder
    from mrgfast.training.build import (TEMPLATES, build_model, build_tokenizer, load_initial_weights, read_samples,
                                        synthetic_root)
    config = copy.deepcopy(config)
    # Evaluation reads the report/VQA split (a DPO run trained on preference pairs: score its reports).
    config.mode, config.data.split, config.model.init_from = "sft", split, None
    root = synthetic_root(config) if config.data.dataset == "synthetic" else None
    tokenizer = build_tokenizer(config, root)
    samples = read_samples(config, root)
    if not samples:
        raise ValueError(f"no samples in split {split!r} of {config.data.path or root}")
    seed_everything(config.seed)  # adapters at init are the ones train() starts from with this seed
    parts = build_model(config, tokenizer.vocab_size, len(samples[0].image_paths))
    if checkpoint is not None:
        load_initial_weights(parts.model, Path(checkpoint))
    builder = PromptBuilder(tokenizer, TEMPLATES[config.model.recipe], **parts.builder_kwargs)
    media = parts.volume_config if parts.volume_config is not None else parts.image_config
    return parts.model.eval(), tokenizer, builder, media, samples


def metric_cleaning(config) -> Callable[[str], str]:
    """The R2Gen cleaning the report metrics of a run use: MIMIC-CXR's for MIMIC-CXR text, IU-Xray's otherwise.

    R2Gen scores each dataset on text cleaned by that dataset's own function; MIMIC-CXR's also turns line breaks
    into spaces and collapses runs of '_' and spaces, which IU-Xray's would leave in raw MIMIC text.
    """
    data = config.data
    mimic = data.clean == "mimic_cxr" or (data.dataset == "mimic_cxr" and data.clean != "iu_xray")
    return clean_report_mimic_cxr if mimic else clean_report_iu_xray


def checkpoint_config(checkpoint, overrides: Sequence[str] = ()):
    """The config of the run that wrote the training checkpoint directory `checkpoint`, with overrides."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint={checkpoint}: not a directory")
    return run_config(checkpoint, list(overrides))


def load_for_eval(checkpoint, overrides: Sequence[str] = (), split: str = "test"):
    """prepare_eval for a training checkpoint directory, with the config of the run that wrote it."""
    return prepare_eval(checkpoint_config(checkpoint, overrides), split, Path(checkpoint))


def main(argv=None) -> int:
    """Command-line entry: evaluate a checkpoint, write eval.json + generations.jsonl, print the table."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        options, overrides = parse_args(argv)
        config = checkpoint_config(options["checkpoint"], overrides)
        model, tokenizer, builder, image_config, samples = prepare_eval(config, options["split"],
                                                                        Path(options["checkpoint"]))
    except (ValueError, FileNotFoundError) as err:
        print(f"mrgfast.evaluate: {err}", file=sys.stderr)
        return 2
    if options["limit"] is not None:
        samples = samples[:options["limit"]]
    out = Path(options["output_dir"] or Path(options["checkpoint"]) / "eval")
    metrics = evaluate_model(model, tokenizer, samples, builder, image_config, batch_size=options["batch_size"],
                             num_beams=options["num_beams"], max_new_tokens=options["max_new_tokens"],
                             meteor=options["meteor"], clean=metric_cleaning(config), output_dir=out, name=EVAL_NAME)
    print(summary_table({Path(options["checkpoint"]).name: metrics}))
    print(f"mrgfast.evaluate: wrote {out / (EVAL_NAME + '.json')} and {out / (EVAL_NAME + '.' + GENERATIONS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
