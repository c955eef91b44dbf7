"""Config -> the run's data: the synthetic twin's directory, the samples, the tokenizer, packed lengths and the
resumable sampler over them."""

from pathlib import Path
from typing import Optional

import torch

from mrgfast.common.files import build_directory_once
from mrgfast.config import ConfigError, TrainConfig
from mrgfast.data import (PackedBatchSampler, PromptBuilder, build_demo_tokenizer, load_tokenizer, read_ct_reports,
                          read_preference_jsonl, read_r2gen, read_report_list, read_slake, read_vqa_rad)
from mrgfast.data.synthetic import demo_samples, generate_demo


def synthetic_root(config: TrainConfig) -> Path:
    """The synthetic twin's directory: data.path when it names one already generated, else one under
    data.cache_dir generated once (atomically) for these settings."""
    data = config.data
    if data.path is not None:
        if not (Path(data.path) / "manifest.json").is_file():
            raise ConfigError(f"data.path: {data.path} holds no manifest.json; for dataset 'synthetic' it must be a "
                              "directory written by mrgfast.data.synthetic.generate_demo (or leave it unset)")
        return Path(data.path)
    root = Path(data.cache_dir) / (f"synthetic-seed{config.seed}-n{data.synthetic_n}-s{data.synthetic_size}"
                                   f"-v{data.synthetic_volumes}-{data.synthetic_volume_size}")
    return build_directory_once(root, "manifest.json", lambda temp: generate_demo(
        temp, seed=config.seed, n=data.synthetic_n, size=data.synthetic_size, n_volumes=data.synthetic_volumes,
        volume_size=data.synthetic_volume_size))


def read_samples(config: TrainConfig, root: Optional[Path]):
    """The run's SampleSet: the synthetic twin's part, or the real dataset at data.path."""
    data, skip = config.data, dict(skip_bad_samples=config.data.skip_bad_samples)
    if data.clean is not None:  # else each reader's own default (TrainConfig refuses it for VQA)
        skip["clean"] = data.clean
    if data.dataset == "synthetic":
        return demo_samples(root, config.synthetic_part(), data.split, **skip)
    skip["allow_outside"] = data.allow_outside_image_dir
    if data.dataset in ("iu_xray", "mimic_cxr"):
        return read_r2gen(data.path, split=data.split, dataset=data.dataset, image_dir=data.image_dir, **skip)
    if data.dataset == "vqa_rad":
        return read_vqa_rad(data.path, image_dir=data.image_dir, **skip)
    if data.dataset == "slake":
        return read_slake(data.path, image_dir=data.image_dir, **skip)
    if data.dataset == "captions":
        return read_report_list(data.path, image_dir=data.image_dir, task=data.task, **skip)
    if data.dataset == "preference":
        return read_preference_jsonl(data.path, image_dir=data.image_dir, task=data.task, **skip)
    if data.image_dir is None:
        raise ConfigError("data.image_dir: dataset 'ct_rate' needs the volume directory")
    return read_ct_reports(data.path, data.image_dir, labels_csv=data.labels_path, **skip)


def synthetic_texts(root: Path) -> list:
    """Every text of the synthetic twin's training splits (what the demo tokenizer learns from)."""
    texts = []
    for part in ("report", "vqa", "caption", "preference", "ct"):
        try:
            samples = demo_samples(root, part, "train")
        except ValueError:  # e.g. generated without volumes
            continue
        for s in samples:
            texts.extend(t for t in (s.prompt, s.answer, s.rejected) if t)
    return texts


def build_tokenizer(config: TrainConfig, root: Optional[Path]):
    """model.tokenizer_path, else the decoder checkpoint's tokenizer, else the synthetic twin's demo tokenizer."""
    path = config.model.tokenizer_path or config.model.name_or_path
    if path is not None:
        return load_tokenizer(path)
    if root is None:
        raise ConfigError("model.tokenizer_path: real data without a decoder checkpoint needs a tokenizer directory")
    return demo_tokenizer(root)


def demo_tokenizer(root: Path):
    """The synthetic twin's demo tokenizer, learnt from its training texts once into `root`/tokenizer."""
    directory = build_directory_once(root / "tokenizer", "tokenizer.json",
                                     lambda temp: build_demo_tokenizer(synthetic_texts(root), temp))
    return load_tokenizer(directory)


def sample_lengths(builder: PromptBuilder, sample, dpo: bool, layout: str) -> tuple:
    """(tokens the sample or pair takes in a packed row, its longest single sequence), tokenizing it once."""
    if not dpo:
        n = len(builder(sample))
        return n, n
    pair = builder.pair(sample)
    longest = len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))
    if layout == "padded":
        return longest, longest
    return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids), longest


def check_max_length(samples, lengths, max_length: int) -> None:
    """ConfigError naming the first sample longer than data.max_length tokens (prompt, slots and answer)."""
    for sample, n in zip(samples, lengths):
        if n > max_length:
            raise ConfigError(f"data.max_length: sample {sample.id!r} ({sample.source or 'memory'}) has {n} tokens, "
                              f"more than max_length={max_length}; raise data.max_length (and token_budget) or "
                              "shorten the texts (the readers' max_words)")


class ResumableBatchSampler(torch.utils.data.Sampler):
    """PackedBatchSampler's micro-batches epoch after epoch, without end, skipping the first `consumed` (global
    count); with several ranks, rank r takes micro-batches r, r + W, r + 2W, ... of the global sequence."""

    def __init__(self, packed: PackedBatchSampler, rank: int = 0, world_size: int = 1, consumed: int = 0):
        self.packed, self.rank, self.world_size, self.consumed = packed, rank, world_size, consumed

    def __iter__(self):
        index, epoch = 0, 0
        while True:
            self.packed.set_epoch(epoch)
            batches = self.packed.batches()
            if not batches:
                raise ValueError("the dataset yields no batches: it is empty")
            for batch in batches:
                if index >= self.consumed and index % self.world_size == self.rank:
                    yield batch
                index += 1
            epoch += 1
