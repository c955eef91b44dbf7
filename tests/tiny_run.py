"""The tiny training run the train, assemble, training and integration tests share: the demo config shrunk to a
model and dataset that train in well under a second a step, a module-scoped synthetic twin for it, and readers of
what a run writes (metrics.jsonl, eval.jsonl, the trained weights of a checkpoint)."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mrgfast.config import load_config
from mrgfast.train.periodic_eval import EVAL_LOG

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEMO = CONFIGS / "demo.yaml"
# Evaluation during training on a few train samples (the tiny twin's val split has one study).
EVAL = ["eval.split=train", "eval.limit=3", "eval.max_new_tokens=5", "eval.batch_size=2"]


def tiny_overrides(cache: Path) -> list:
    """Overrides that shrink the demo config to a model and dataset that train in well under a second a step."""
    return ["model.hidden_size=32", "model.intermediate_size=64", "model.vision_dim=16", "model.vision_depth=1",
            f"data.cache_dir={cache}", "data.synthetic_n=12", "data.synthetic_size=32", "data.synthetic_volumes=0",
            "data.token_budget=256", "data.rows=1", "data.max_length=256", "schedule.warmup_steps=0",
            "telemetry.progress_bar=false", "telemetry.tensorboard=false", "telemetry.log_every=1", "resume=none"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One synthetic twin (and its demo tokenizer) for the whole module (import it into a test module to use it)."""
    return tmp_path_factory.mktemp("synthetic-cache")


def tiny(cache, out, *extra):
    """The tiny demo config writing to `out`, with more overrides."""
    return load_config(DEMO, tiny_overrides(cache) + [f"output_dir={out}", *extra])


def tiny_with_eval(cache, out, *extra):
    """The tiny config for the periodic-evaluation tests: 4 steps, a checkpoint every 2."""
    return tiny(cache, out, "schedule.max_steps=4", "checkpoint.every_steps=2", *extra)


def logged(out: Path) -> list:
    """The metrics.jsonl records of a run."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def eval_lines(out) -> list:
    """The eval.jsonl records of a run."""
    return [json.loads(line) for line in (out / EVAL_LOG).read_text().splitlines()]


def trained_tensors(checkpoint: Path) -> dict:
    """Adapter and other trainable weights of a checkpoint directory."""
    tensors = load_file(str(checkpoint / "adapter" / "adapter_model.safetensors"))
    tensors.update(load_file(str(checkpoint / "modules.safetensors")))
    return tensors


def host_batches(pieces, count):
    """The first `count` micro-batches of the unshuffled sample order, collated on the host."""
    groups = pieces.packed.batches()[:count]
    return [pieces.collator([pieces.dataset[i] for i in group]) for group in groups], groups


def tiny_cuda(tmp_path, *extra):
    """The demo config shrunk to a tiny fp32 model on CUDA, unshuffled, without dropout (the CUDA-graph tests)."""
    return load_config(DEMO, ["model.hidden_size=32", "model.intermediate_size=64", "model.vision_dim=16",
                              f"data.cache_dir={tmp_path / 'cache'}", "data.synthetic_n=12",
                              "data.synthetic_size=32", "data.synthetic_volumes=0", "data.token_budget=256",
                              "data.rows=1", "data.max_length=256", "data.shuffle=false", "device=cuda",
                              "model.dtype=float32", "lora.lora_dropout=0.0", "telemetry.progress_bar=false",
                              f"output_dir={tmp_path / 'run'}", "resume=none", *extra])
