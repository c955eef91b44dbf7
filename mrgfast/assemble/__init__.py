"""Assembly: a TrainConfig -> the pieces of a run (data, tokenizer, model per recipe, optimizer, loader), or of an
evaluation (the model with a checkpoint's weights, its split's samples). train, evaluate, onpolicy_pairs, the demo
and the benchmarks all build through here.

data: samples, tokenizer, packed lengths, the resumable sampler; model: decoder, vision, adapters, starting weights;
run: everything train() needs (Pieces); evaluation: what an evaluation of a run or checkpoint needs.
"""

from mrgfast.assemble.data import ResumableBatchSampler, build_tokenizer, read_samples, synthetic_root
from mrgfast.assemble.evaluation import checkpoint_config, load_for_eval, metric_cleaning, prepare_eval
from mrgfast.assemble.model import TEMPLATES, ModelParts, build_model, load_initial_weights
from mrgfast.assemble.run import Pieces, build_all, build_loader

__all__ = ["ModelParts", "Pieces", "ResumableBatchSampler", "TEMPLATES", "build_all", "build_loader", "build_model",
           "build_tokenizer", "checkpoint_config", "load_for_eval", "load_initial_weights", "metric_cleaning",
           "prepare_eval", "read_samples", "synthetic_root"]
