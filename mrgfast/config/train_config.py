"""The run configuration: nested dataclasses, loaded from YAML plus dotted `key=value` overrides."""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

import yaml

from mrgfast.common.files import atomic_write_text
from mrgfast.config.cli import parse_command_line, split_key_value
from mrgfast.config.parse import (ConfigError, apply_mapping, build, is_config_key, read_yaml, set_dotted, suggest_key,
                                  to_plain)
from mrgfast.losses.dpo import check_dpo_args
from mrgfast.peft.config import LoraConfig

RESOLVED_NAME = "config.yaml"       # the first run's config in output_dir, and each checkpoint's own
RESUMED_NAME = "config-resume-{step:06d}.yaml"  # the config of a run resumed from step-{step}, beside config.yaml


def require(condition: bool, message: str) -> None:
    """ValueError(message) unless `condition` (section checks; build() adds the section name)."""
    if not condition:
        raise ValueError(message)


@dataclass
class ModelSection:
    """Which model to build and how: checkpoints by path (or tiny sizes for the synthetic twin), adapters, dtype."""

    recipe: Literal["demo", "pefomed", "mrgllm_promptwise", "mrgllm_promptbook", "ldp", "rad3d_prefix"] = "demo"
    name_or_path: Optional[str] = None          # decoder checkpoint directory (HF layout); None: built from sizes
    vision_name_or_path: Optional[str] = None   # HF vision tower, or a demo ViT dir (vit_config.json); None: a ViT
                                                # built from the vision_* sizes
    # Which hidden state of an HF / EVA tower feeds the adapters, as HF's hidden_states[i] (-1: the last layer).
    # None: the tower's default: -1, and for EVA -2, BLIP-2's convention that PeFoMed / MiniGPT-v2 inherit (the
    # 40-block EVA-g's block 39 output, no final norm; mrgfast.models.eva.BLIP2_SELECT_LAYER).
    vision_select_layer: Optional[int] = None
    tokenizer_path: Optional[str] = None        # None: name_or_path's tokenizer, else the demo tokenizer (synthetic)
    init_from: Optional[str] = None             # a previous stage's checkpoint (step-XXXXXX) or adapter to start from,
                                                # or MiniGPT-v2's .pth (PeFoMed); read at a run's start, not on resume
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    activation_checkpointing: bool = False
    # How the decoder runs RMSNorm (+ residual add), RoPE and SwiGLU: eager ("off"), mrgfast's fused ops ("triton":
    # Triton kernels on CUDA) or torch.compile'd regions ("compile"). "off" until a GPU measurement picks the faster
    # (benchmarks/README.md, "Fused elementwise regions").
    fused_elementwise: Literal["off", "triton", "compile"] = "off"
    group_size: int = 4                         # PeFoMed: consecutive vision tokens concatenated into one
    # Decoder sizes when name_or_path is None (the synthetic twin trains from random or demo-pretrained weights).
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: Optional[int] = None            # None: the tokenizer's; larger pads the embedding and LM head (as a
                                                # real checkpoint's vocabulary is, e.g. to measure a full-size head)
    # Vision encoder sizes when vision_name_or_path is None: a ViT (2D) or ViT3D (rad3d) over the synthetic images.
    vision_dim: int = 32
    vision_depth: int = 1
    vision_heads: int = 2
    patch_size: int = 8
    train_vision: bool = False                  # MRG-LLM trains its vision encoder; the others freeze it
    # A frozen encoder's features computed once per image and reused (mrgfast.models.feature_cache): "memory"
    # (LRU of vision_cache_max_gb) or "disk" (also safetensors under vision_cache_dir, default
    # <output_dir>/feature_cache, shared by runs with the same encoder). Needs a frozen tower, no augmentation.
    vision_cache: Literal["off", "memory", "disk"] = "off"
    vision_cache_dir: Optional[str] = None
    vision_cache_max_gb: float = 2.0
    # MRG-LLM prompts and RAD3D prefix (sizes unconfirmed by the papers: configurable).
    n_prompts: int = 4
    book_size: int = 1                          # 1: prompt-wise; > 1: promptbook-wise bank of prompt sets
    n_prefix: int = 10
    mapper_layers: int = 8
    n_labels: int = 18                          # RAD3D classifier outputs (CT-RATE has 18 abnormalities)
    # RAD3D-Prefix's diagnostic priors come from the classifier the classify stage wrote (mode=classify,
    # configs/rad3d_classifier.yaml): its directory or classifier.safetensors. classifier=random builds a random
    # frozen head instead (and leaves classifier_from unread, saying so): for tests only, never the paper's setting.
    classifier_from: Optional[str] = None
    classifier: Literal["trained", "random"] = "trained"

    def __post_init__(self):
        require(self.group_size >= 1, f"group_size must be >= 1, got {self.group_size}")
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "vision_dim", "vision_depth", "vision_heads", "patch_size", "n_prompts",
                     "book_size", "n_prefix", "mapper_layers", "n_labels"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        require(self.vision_cache == "off" or not self.train_vision,
                "vision_cache needs a frozen vision encoder: a trained one (train_vision=true) changes its features "
                "every step")
        require(self.vision_cache_max_gb >= 0, f"vision_cache_max_gb must be >= 0, got {self.vision_cache_max_gb}")
        require(self.vocab_size is None or self.vocab_size >= 1, f"vocab_size must be >= 1, got {self.vocab_size}")
        require(self.num_attention_heads % self.num_key_value_heads == 0,
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})")
        require(self.recipe == "rad3d_prefix" or (self.classifier_from is None and self.classifier == "trained"),
                f"classifier / classifier_from are RAD3D-Prefix's diagnostic classifier; recipe {self.recipe!r} has "
                "none")


@dataclass
class DataSection:
    """Where the samples come from and how they are packed into batches."""

    dataset: Literal["synthetic", "iu_xray", "mimic_cxr", "vqa_rad", "slake", "captions", "preference",
                     "ct_rate"] = "synthetic"
    path: Optional[str] = None                  # annotation / questions / JSONL / reports CSV; synthetic: a generated
                                                # root (default: generated under cache_dir)
    image_dir: Optional[str] = None             # images or volumes root (default: the reader's own default)
    labels_path: Optional[str] = None           # ct_rate: the multi-label CSV
    split: str = "train"
    task: Literal["report", "vqa", "caption"] = "report"
    # Report text cleaning (None: the reader's own default: R2Gen's for iu_xray / mimic_cxr, PeFoMed's for captions,
    # none for preference pairs and CT reports). DPO pairs should be cleaned like the SFT text the model learned.
    clean: Optional[Literal["iu_xray", "mimic_cxr", "pefomed", "none"]] = None
    token_budget: int = 2048                    # tokens per packed row (fixed: CUDA graphs need it)
    rows: int = 1                               # packed rows per micro-batch
    max_length: int = 512                       # longest sample, in tokens (a longer one is an error naming it)
    image_size: Optional[int] = None            # None: the vision tower's own size (synthetic: synthetic_size)
    num_workers: int = 0
    shuffle: bool = True
    skip_bad_samples: bool = False
    # Annotation paths must stay inside the image directory (an absolute path or one climbing out with '..' is an
    # error naming the entry); true: the dataset really points elsewhere, take its paths as written.
    allow_outside_image_dir: bool = False
    # The synthetic twin (dataset: synthetic): generated once into cache_dir, keyed by its settings.
    cache_dir: str = ".cache/mrgfast"
    synthetic_n: int = 300
    synthetic_size: int = 128
    synthetic_volumes: int = 60
    synthetic_volume_size: int = 32

    def __post_init__(self):
        require(self.token_budget >= 1, f"token_budget must be >= 1, got {self.token_budget}")
        require(1 <= self.max_length <= self.token_budget,
                f"max_length must be in [1, token_budget={self.token_budget}], got {self.max_length}")
        require(self.rows >= 1, f"rows must be >= 1, got {self.rows}")
        require(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        require(self.dataset == "synthetic" or self.path is not None,
                f"dataset {self.dataset!r} needs data.path (the annotation / question / JSONL / CSV file)")
        require(self.image_size is None or self.image_size >= 1, f"image_size must be >= 1, got {self.image_size}")
        require(self.synthetic_n >= 3, f"synthetic_n must be >= 3, got {self.synthetic_n}")
        require(self.synthetic_size >= 32, f"synthetic_size must be >= 32, got {self.synthetic_size}")
        require(self.synthetic_volume_size >= 8,
                f"synthetic_volume_size must be >= 8, got {self.synthetic_volume_size}")


@dataclass
class LoraSection:
    """LoRA settings with PEFT's LoraConfig field names; `enabled: false` trains without adapters."""

    enabled: bool = True
    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    use_rslora: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: Optional[list[str]] = None

    def __post_init__(self):
        require(self.r >= 1, f"r must be >= 1, got {self.r}")
        require(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}")
        require(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        require(not self.enabled or bool(self.target_modules), "target_modules must name at least one module")

    def to_lora_config(self, base_model_name_or_path: Optional[str] = None) -> LoraConfig:
        """The mrgfast.peft.LoraConfig these settings describe."""
        return LoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=list(self.target_modules), use_rslora=self.use_rslora, bias=self.bias,
                          modules_to_save=self.modules_to_save, base_model_name_or_path=base_model_name_or_path)


@dataclass
class OptimSection:
    """AdamW, gradient accumulation and clipping."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    max_grad_norm: Optional[float] = 1.0        # None: no clipping
    grad_accum_steps: int = 1
    fused: Union[Literal["auto"], bool] = "auto"  # auto: fused AdamW (on CUDA and CPU alike)

    def __post_init__(self):
        require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                f"betas must be two numbers in [0, 1), got {self.betas}")
        require(self.eps > 0, f"eps must be > 0, got {self.eps}")
        require(self.max_grad_norm is None or self.max_grad_norm > 0,
                f"max_grad_norm must be > 0 or null, got {self.max_grad_norm}")
        require(self.grad_accum_steps >= 1, f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")


@dataclass
class ScheduleSection:
    """Learning-rate schedule: linear warmup then cosine decay (HF's get_cosine_schedule_with_warmup)."""

    name: Literal["cosine", "constant"] = "cosine"
    max_steps: int = 200                        # optimizer steps in the run
    warmup_steps: int = 0
    warmup_ratio: float = 0.0                   # used when warmup_steps is 0: warmup = ceil(ratio * max_steps)
    num_cycles: float = 0.5
    min_lr_rate: float = 0.0                    # floor of the cosine, as a fraction of the peak LR

    def __post_init__(self):
        require(self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}")
        require(0 <= self.warmup_steps <= self.max_steps,
                f"warmup_steps must be in [0, max_steps={self.max_steps}], got {self.warmup_steps}")
        require(0.0 <= self.warmup_ratio <= 1.0, f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        require(not (self.warmup_steps and self.warmup_ratio), "set warmup_steps or warmup_ratio, not both")
        require(self.num_cycles > 0, f"num_cycles must be > 0, got {self.num_cycles}")
        require(0.0 <= self.min_lr_rate <= 1.0, f"min_lr_rate must be in [0, 1], got {self.min_lr_rate}")

    def resolved_warmup_steps(self) -> int:
        """Warmup length in steps, from warmup_steps or warmup_ratio (ceil, as transformers does)."""
        if self.warmup_steps:
            return self.warmup_steps
        return math.ceil(self.warmup_ratio * self.max_steps)


@dataclass
class DPOSection:
    """DPO settings with TRL's names; used when mode is 'dpo'."""

    beta: float = 0.1
    # One loss, or (TRL 1.x) a list summed with loss_weights: [sigmoid, sft] with weights [1, alpha] is RPO.
    loss_type: Union[Literal["sigmoid", "hinge", "ipo", "robust"],
                     list[Literal["sigmoid", "hinge", "ipo", "robust", "sft"]]] = "sigmoid"
    label_smoothing: float = 0.0
    loss_weights: Optional[list[float]] = None  # one per loss_type entry (default 1 each)
    reference: Literal["disabled_adapters", "precomputed"] = "disabled_adapters"
    reference_logps_path: Optional[str] = None  # precomputed: where the first pass writes / training reads them
    layout: Literal["shared", "padded"] = "shared"  # shared: each prompt packed once; padded: TRL's two rows

    def __post_init__(self):
        check_dpo_args(self.loss_type, self.beta, self.label_smoothing, self.loss_weights)


@dataclass
class ClassifySection:
    """mode=classify: RAD3D-Prefix's diagnostic classifier, a linear multi-label head trained with BCE on the frozen
    volume encoder's pooled features (full batch: the features are computed once), scored on a validation split."""

    val_split: str = "valid"                    # the synthetic twin's CT validation split
    val_path: Optional[str] = None              # ct_rate: the validation reports CSV (CT-RATE's validation_reports.csv)
    val_labels_path: Optional[str] = None       # ct_rate: the validation multi-label CSV
    val_image_dir: Optional[str] = None         # ct_rate: the validation volumes (default: data.image_dir)
    threshold: float = 0.5                      # F1's decision threshold on sigmoid(logit)
    batch_size: int = 8                         # volumes per encoder forward while the features are computed

    def __post_init__(self):
        require(0.0 < self.threshold < 1.0, f"threshold must be in (0, 1), got {self.threshold}")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class CheckpointSection:
    """How often checkpoints are written and how many are kept."""

    every_steps: int = 100
    keep_last: int = 2
    save_at_end: bool = True

    def __post_init__(self):
        require(self.every_steps >= 1, f"every_steps must be >= 1, got {self.every_steps}")
        require(self.keep_last >= 1, f"keep_last must be >= 1, got {self.keep_last}")


@dataclass
class EvalSection:
    """Evaluation during training (mrgfast.evaluate on the model being trained, main process only)."""

    every_steps: int = 0                        # 0: never during training
    at_end: bool = False                        # also after the last step
    split: str = "val"                          # of data.path's report / VQA data (the synthetic twin: its report part)
    limit: Optional[int] = None                 # the first N samples of the split (None: all)
    num_beams: int = 1
    max_new_tokens: int = 100
    batch_size: int = 16
    meteor: bool = False                        # METEOR starts a Java process per evaluation: opt in

    def __post_init__(self):
        require(self.every_steps >= 0, f"every_steps must be >= 0 (0: off), got {self.every_steps}")
        require(self.limit is None or self.limit >= 1, f"limit must be >= 1 or null, got {self.limit}")
        for name in ("num_beams", "max_new_tokens", "batch_size"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def enabled(self) -> bool:
        """Whether the run evaluates at all."""
        return self.every_steps > 0 or self.at_end


@dataclass
class TelemetrySection:
    """Logging: JSONL metrics, TensorBoard (when installed), progress bar, GPU sampling."""

    log_every: int = 10
    jsonl: bool = True
    tensorboard: bool = True                    # only when the tensorboard package is importable
    progress_bar: bool = True
    gpu_sample_interval_s: float = 1.0

    def __post_init__(self):
        require(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        require(self.gpu_sample_interval_s > 0,
                f"gpu_sample_interval_s must be > 0, got {self.gpu_sample_interval_s}")


@dataclass
class GuardSection:
    """What the run does when training goes wrong numerically (mrgfast.training.guards): checked on the device every
    step, read where the loop reads values anyway (each log record and checkpoint)."""

    # A step whose loss or gradient norm is NaN/inf never updates the weights. stop: the run then stops (exit code 4)
    # at the next log or checkpoint; skip: it goes on, and stops only after more than max_consecutive_skips such
    # steps in a row.
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_consecutive_skips: int = 10
    # Divergence: a gradient norm of exactly 0 for zero_grad_steps steps in a row (0: off), or a trainable weight
    # larger than max_abs_weight in magnitude (null: off). stop: the run stops (exit code 4); skip: a warning.
    zero_grad_steps: int = 5
    max_abs_weight: Optional[float] = 1.0e6

    def __post_init__(self):
        require(self.max_consecutive_skips >= 0,
                f"max_consecutive_skips must be >= 0, got {self.max_consecutive_skips}")
        require(self.zero_grad_steps >= 0, f"zero_grad_steps must be >= 0 (0: off), got {self.zero_grad_steps}")
        require(self.max_abs_weight is None or self.max_abs_weight > 0,
                f"max_abs_weight must be > 0 or null, got {self.max_abs_weight}")


@dataclass
class DistributedSection:
    """Data parallelism under torchrun: DDP or FSDP2 (fully_shard)."""

    strategy: Literal["ddp", "fsdp"] = "ddp"
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: NCCL on CUDA, gloo on CPU
    timeout_s: int = 1800
    # fsdp only. false: shard the frozen base, keep the trainable weights whole on every rank; true: shard the
    # trainable weights and their AdamW state too (large trainable sets: RAD3D's mapper, full fine-tuning).
    # Checkpoints have the same format either way.
    shard_trainable: bool = False

    def __post_init__(self):
        require(self.timeout_s >= 1, f"timeout_s must be >= 1, got {self.timeout_s}")
        require(not self.shard_trainable or self.strategy == "fsdp",
                f"distributed.shard_trainable=true needs distributed.strategy=fsdp (got strategy={self.strategy!r}); "
                "DDP keeps a whole copy of every weight on each rank")


@dataclass
class TrainConfig:
    """One training run: top-level switches plus one section per concern."""

    mode: Literal["sft", "dpo", "classify"] = "sft"  # classify: RAD3D-Prefix's classifier stage (train/classify.py)
    output_dir: str = "runs/demo"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    resume: str = "auto"                        # auto: latest checkpoint in output_dir if any; none; or a path
    # A resumed run keeps what it trains with (model, adapters, data, optimizer, schedule, mode, seed: README "Exit
    # codes and faults"); these dotted keys or sections may differ from the checkpoint's config anyway, e.g.
    # [schedule.max_steps] to extend a run, [optim.lr].
    resume_allow_changes: list[str] = field(default_factory=list)
    # SFT and DPO (dpo.layout=shared) on CUDA: pad every batch to one static shape (mrgfast.data.static_batch,
    # static_dpo) and capture forward + backward + AdamW in one CUDA graph, replayed every step. Off by default (its
    # GPU checks: tests/training/test_cuda_graph.py, tests/train/test_loop.py, tests/train/test_static_dpo.py); on CPU
    # the step runs eagerly either way.
    cuda_graphs: bool = False
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    lora: LoraSection = field(default_factory=LoraSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    telemetry: TelemetrySection = field(default_factory=TelemetrySection)
    guard: GuardSection = field(default_factory=GuardSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    eval: EvalSection = field(default_factory=EvalSection)
    classify: ClassifySection = field(default_factory=ClassifySection)

    def __post_init__(self):
        require(bool(self.output_dir), "output_dir must not be empty")
        require(bool(self.resume), "resume must be 'auto', 'none' or a checkpoint path")
        for key in self.resume_allow_changes:
            require(is_config_key(type(self), key),
                    f"resume_allow_changes: {key!r} is no config key or section{suggest_key(type(self), key)}")
        require(not (self.cuda_graphs and self.model.vision_cache != "off"),
                "cuda_graphs=true cannot use model.vision_cache: a captured graph would replay one batch's cache "
                "lookups")
        require(not (self.cuda_graphs and self.mode == "dpo" and self.dpo.layout != "shared"),
                "cuda_graphs=true with mode=dpo needs dpo.layout=shared: the padded layout's row count (two per pair) "
                "changes with every batch (mrgfast.data.static_dpo pads the shared layout)")
        vqa_source = None
        if self.data.dataset in ("vqa_rad", "slake"):
            vqa_source = self.data.dataset
        elif self.data.dataset == "synthetic" and self.synthetic_part() == "vqa":
            vqa_source = "the synthetic VQA"
        require(self.data.clean is None or vqa_source is None,
                f"data.clean is for report text; {vqa_source} answers are normalised at evaluation, "
                f"got clean={self.data.clean!r}")

        # Evaluation runs the model on the main process alone: FSDP2 shards need every rank in each forward.
        require(not (self.eval.enabled and self.distributed.strategy == "fsdp"),
                "eval.every_steps / eval.at_end cannot run with distributed.strategy=fsdp (a forward on one rank "
                "would wait for the others' shards): evaluate the checkpoints with python -m mrgfast.evaluate")
        require(not (self.eval.enabled and self.data.dataset == "preference"),
                "eval.every_steps / eval.at_end need report or VQA samples, and data.dataset=preference has only "
                "pairs: evaluate the checkpoints with python -m mrgfast.evaluate data.dataset=... instead")

        self.check_diagnostic_classifier()

    def check_diagnostic_classifier(self) -> None:
        """RAD3D-Prefix's classifier settings: the classify stage trains one; the prefix run names one (or random)."""
        m = self.model
        if self.mode == "classify":
            require(m.recipe == "rad3d_prefix",
                    f"mode=classify trains RAD3D-Prefix's diagnostic classifier: needs model.recipe=rad3d_prefix, got "
                    f"{m.recipe!r}")
            require(m.classifier_from is None and m.classifier == "trained",
                    "mode=classify trains the classifier from scratch: leave model.classifier_from and "
                    "model.classifier unset (they are the prefix run's)")
            require(self.data.dataset in ("synthetic", "ct_rate"),
                    f"mode=classify needs labelled CT volumes (data.dataset synthetic or ct_rate), got "
                    f"{self.data.dataset!r}")
            require(self.data.dataset != "ct_rate" or (self.data.labels_path is not None
                                                        and self.classify.val_path is not None
                                                        and self.classify.val_labels_path is not None),
                    "mode=classify on ct_rate needs data.labels_path, classify.val_path and classify.val_labels_path "
                    "(the training labels and the validation reports and labels CSVs)")
            require(self.resume in ("auto", "none"),
                    f"mode=classify trains in one go and writes no step checkpoints: resume must be auto or none, "
                    f"got {self.resume!r}")
            require(not self.cuda_graphs, "mode=classify has no captured step: cuda_graphs must be false")
            require(not self.eval.enabled, "mode=classify scores its validation split itself (classify.val_split): "
                    "eval.every_steps / eval.at_end are for report generation")
        elif m.recipe == "rad3d_prefix":
            require(m.classifier_from is not None or m.classifier == "random",
                    "model.classifier_from: RAD3D-Prefix needs its trained diagnostic classifier (the directory "
                    "`python -m mrgfast.train config=configs/rad3d_classifier.yaml` writes); model.classifier=random "
                    "builds a random one, for tests only")

    def synthetic_part(self) -> str:
        """Which part of the synthetic twin this run reads (with data.dataset=synthetic)."""
        if self.mode == "dpo":
            return "preference"
        if self.model.recipe == "rad3d_prefix":
            return "ct"
        return self.data.task


def load_config(path: Union[str, Path, None] = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """A TrainConfig from an optional YAML file (with `base:` inheritance) and `key=value` overrides."""
    data = read_yaml(Path(path)) if path is not None else {}
    try:
        # Keys and types first, so a mistake in the file is reported with the file's name.
        apply_mapping(TrainConfig, data, construct=False)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    for item in overrides:
        key, text = split_key_value(item)
        set_dotted(data, key, text, TrainConfig)
    return build(TrainConfig, data)


@dataclass
class TrainCommand:
    """What `python -m mrgfast.train` takes besides config keys: the YAML file (`base:` inheritance inside it)."""

    config: Optional[str] = None


def parse_cli(argv: Sequence[str]) -> TrainConfig:
    """The config from command-line arguments: `config=path.yaml` (at most once) and `key=value` overrides."""
    command, overrides = parse_command_line(argv, TrainCommand)
    return load_config(command.config, overrides)


def config_to_dict(config: TrainConfig) -> dict:
    """The config as nested plain dicts (YAML/JSON-ready)."""
    return to_plain(config)


def config_text(config: TrainConfig) -> str:
    """The resolved config as YAML text (what config.yaml holds)."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def save_resolved(config: TrainConfig, output_dir: Union[str, Path, None] = None, name: str = RESOLVED_NAME) -> Path:
    """Write the resolved config as `<output_dir>/<name>` (default config.yaml; atomically); returns the file."""
    directory = Path(output_dir if output_dir is not None else config.output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(directory / name, config_text(config), mode=0o644)
