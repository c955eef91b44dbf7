"""The suite's parts: what each one runs, its default share of the time budget, the optional packages it needs."""

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO_ROOT / "benchmarks"

# Optional packages a part may need, by import name -> pip name: missing, the part is skipped with the pip name.
OPTIONAL_PACKAGES = {"flash_attn": "flash-attn", "trl": "trl", "liger_kernel": "liger-kernel"}

# Default seconds per part: they add up to the 9-minute default budget on one H100/H200 (a larger or smaller
# --budget scales them). The test part stays under 3 minutes.
DEFAULT_SECONDS = {
    "tests": 120,
    # kernel benchmarks (160 s); the three elementwise regions each compile a torch.compile variant first
    "lora_linear": 30, "linear_cross_entropy": 45, "grouped_projection": 20, "group_tokens": 10, "affine_prompt": 10,
    "rms_norm": 15, "rope": 15, "swiglu": 15,
    # end-to-end benchmarks (110 s)
    "e2e_sft": 45, "e2e_dpo": 35, "hf_patch": 15, "feature_cache": 10, "cost_model": 5,
    # training runs (135 s): the 0.55B CUDA-graph run, then the 1B and 7B MFU runs
    "train_cuda_graphs": 25, "train_1b": 45, "train_7b": 65,
    "profile": 15,
}
NEW_BENCHMARK_SECONDS = 20  # a benchmark file added later, until it is given its own share
# Most telling first, so that a budget cut short loses the least: then any others, by name.
KERNEL_ORDER = ["lora_linear", "linear_cross_entropy", "grouped_projection", "group_tokens", "affine_prompt",
                "rms_norm", "rope", "swiglu"]
E2E_ORDER = ["e2e_sft", "e2e_dpo", "hf_patch", "feature_cache", "cost_model"]
DEFAULT_BUDGET = 540.0   # seconds: 9 minutes on the GPU
SMOKE_BUDGET = 900.0     # --cpu-smoke on 2 shared CI cores: generous, it proves the parts run rather than their speed

# Shapes at which the benchmarks run on the GPU (`--set` on top of their FULL shapes): those of the first H200 run
# (shared/gpu-runs/2026-12-04), warm-up long enough to cover compilation and tuning, repeats for a stable median.
GPU_SHAPES = {
    # Qwen2-7B's head; few repeats: the naive path takes ~0.7 s a step there, and the Liger peer cases follow.
    "linear_cross_entropy": dict(tokens=16384, hidden=3584, vocab=152064, warmup=1, repeats=5),
    # The elementwise regions at their full (1B-class) shapes: 16,384 tokens, hidden 2048, intermediate 8192.
    "rms_norm": dict(warmup=5, repeats=30),
    "rope": dict(warmup=5, repeats=30),
    "swiglu": dict(warmup=5, repeats=30),
}
# These run at their own `--scale gpu` shapes: the end-to-end benchmarks (a 0.75B decoder, 8192 tokens per step);
# lora_linear (issue 20's layers: 8192 tokens, 4096 x 4096 at r=16 and 64, 4096 <-> 11008, adapters in the base dtype;
# it writes its report after every layer, so a cut time box keeps the layers done); and the routed ops' benchmarks
# (the issue's training sizes, then a size sweep cut by each preset's deadline_s to fit its share above: their cases'
# "kernels" and "routing" figures make the suite's routing_table.txt).
GPU_SCALE = ("e2e_sft", "e2e_dpo", "lora_linear", "grouped_projection", "group_tokens", "affine_prompt")
# --cpu-smoke: every benchmark at its quick shapes, one untimed-warm-up-free repeat: it proves the part runs.
SMOKE_SHAPES = dict(warmup=0, repeats=1)
# Benchmarks whose shapes sweep sizes until a deadline: under --cpu-smoke a deadline of 0 runs their first case only.
SWEEPS = ("grouped_projection", "group_tokens", "affine_prompt")

# The training runs: PeFoMed stage 1 with the first H200 run's 0.55B-class decoder (hidden 2048, 8 layers of 16
# heads, intermediate 5632, a 384-wide 6-deep ViT), bf16, 4 rows of 2048 tokens; under --cpu-smoke the config's own
# tiny model on the CPU (cuda_graphs=true runs eagerly there).
GPU_RUN = ["config=configs/pefomed_stage1.yaml", "device=cuda", "model.dtype=bfloat16", "model.hidden_size=2048",
           "model.intermediate_size=5632", "model.num_hidden_layers=8", "model.num_attention_heads=16",
           "model.num_key_value_heads=16", "model.vision_dim=384", "model.vision_depth=6", "model.vision_heads=6",
           "data.token_budget=2048", "data.rows=4", "data.synthetic_n=400"]
SMOKE_RUN = ["config=configs/pefomed_stage1.yaml", "device=cpu", "data.synthetic_n=8"]
RUN_QUIET = ["telemetry.progress_bar=false", "telemetry.tensorboard=false", "checkpoint.save_at_end=false",
             "checkpoint.every_steps=1000000", "resume=none"]
TRAIN_STEPS = {False: 30, True: 3}  # by smoke

# The MFU runs (issue 21's targets: >= 40% at 1B, >= 55% at 7B): LoRA SFT (r=64 on q, v) with CUDA graphs on random
# decoders of Llama-3.2-1B's and Qwen2-VL-7B's language-model shapes, real vocabularies, made on the GPU, bf16, 4 rows
# of 4096 tokens of synthetic reports (two 224-px views each, 64 tokens per view after grouping).
MFU_DECODERS = {
    "train_1b": ["model.hidden_size=2048", "model.num_hidden_layers=16", "model.num_attention_heads=32",
                 "model.num_key_value_heads=8", "model.intermediate_size=8192", "model.vocab_size=128256"],
    "train_7b": ["model.hidden_size=3584", "model.num_hidden_layers=28", "model.num_attention_heads=28",
                 "model.num_key_value_heads=4", "model.intermediate_size=18944", "model.vocab_size=152064"],
}
MFU_DATA = ["config=configs/pefomed_stage1.yaml", "device=cuda", "model.dtype=bfloat16", "data.task=report",
            "model.vision_dim=384", "model.vision_depth=6", "model.vision_heads=6", "model.patch_size=14",
            "data.synthetic_size=224", "data.synthetic_n=300", "data.token_budget=4096", "data.rows=4",
            "data.max_length=4096"]
MFU_STEPS = {"train_1b": 15, "train_7b": 10}
PROFILE_SKIP = {False: 3, True: 1}  # steps before the profiled one (compilation, tuning, allocator warm-up)


@dataclass(frozen=True)
class Part:
    """One part of the suite: a command run in its own process under a time box, and how its figures are read."""

    name: str
    group: str          # tests | kernels | e2e | train | profile: `--only` takes group names too
    seconds: float      # default share of the budget
    argv: tuple         # the command: "{json}" stands for the part's report file, "{work}" for its work folder
    reader: str         # how its report is read: json (the {json} it wrote) | pytest ({work}/junit.xml) | train
                        # ({work}/run/metrics.jsonl)
    requires: tuple = ()  # optional packages (import names) it cannot run without
    env: tuple = ()     # (name, value) environment settings of its process

    def missing(self) -> list:
        """pip names of the optional packages this part needs and this environment lacks."""
        return [OPTIONAL_PACKAGES.get(name, name) for name in self.requires if importlib.util.find_spec(name) is None]


def benchmark_names() -> list:
    """Every benchmark script of benchmarks/ (a module that opens its run with harness.open_run; helpers do not),
    and the end-to-end ones named in E2E_ORDER wherever their file exists."""
    found = {path.stem for path in BENCHMARKS.glob("[a-z]*.py") if "harness.open_run(" in path.read_text(encoding="utf-8")}
    return sorted(found | {name for name in E2E_ORDER if (BENCHMARKS / f"{name}.py").exists()})


def is_kernel_benchmark(name: str) -> bool:
    """A kernel benchmark measures one op and is named after it (mrgfast/ops/<op>.py)."""
    return (REPO_ROOT / "mrgfast" / "ops" / f"{name}.py").exists()


def benchmark_part(name: str, smoke: bool) -> Part:
    """A benchmark script run at GPU shapes (or, smoking, at its quick shapes once)."""
    if smoke:
        shapes = {**SMOKE_SHAPES, **(dict(deadline_s=0) if name in SWEEPS else {})}
    else:
        shapes = GPU_SHAPES.get(name, {})
    argv = [sys.executable, "-m", f"benchmarks.{name}", "--out", "{json}"] + (["--quick"] if smoke else [])
    if name in GPU_SCALE and not smoke:
        argv += ["--scale", "gpu"]
    for key, value in shapes.items():
        argv += ["--set", f"{key}={value}"]
    group = "kernels" if is_kernel_benchmark(name) else "e2e"
    requires = ("trl",) if name == "e2e_dpo" else ()  # its baseline is TRL's DPOTrainer
    return Part(name, group, DEFAULT_SECONDS.get(name, NEW_BENCHMARK_SECONDS), tuple(argv), "json", requires)


def tests_part() -> Part:
    """The GPU tests (`pytest -m gpu`), each Triton kernel at one fixed config so that compiling, not tuning, is
    what they wait for."""
    argv = (sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--junitxml={work}/junit.xml")
    return Part("tests", "tests", DEFAULT_SECONDS["tests"], argv, "pytest",
                env=(("MRGFAST_TRITON_AUTOTUNE", "off"),))


def run_args(smoke: bool) -> list:
    """The training run's key=value arguments (model, data, quiet logging), without steps and output folder."""
    return (SMOKE_RUN if smoke else GPU_RUN) + RUN_QUIET


def train_part(smoke: bool) -> Part:
    """The CUDA-graph training run, as a user starts it: `python -m mrgfast.train ... cuda_graphs=true`."""
    steps = TRAIN_STEPS[smoke]
    argv = [sys.executable, "-m", "mrgfast.train", *run_args(smoke), "cuda_graphs=true", f"schedule.max_steps={steps}",
            f"telemetry.log_every={1 if smoke else 5}", "output_dir={work}/run"]
    return Part("train_cuda_graphs", "train", DEFAULT_SECONDS["train_cuda_graphs"], tuple(argv), "train")


def mfu_part(name: str, smoke: bool) -> Part:
    """One MFU run at 1B or 7B scale (under --cpu-smoke: the smoke run's tiny model, 2 steps, on the CPU)."""
    steps = 2 if smoke else MFU_STEPS[name]
    model = (SMOKE_RUN + ["model.vocab_size=512"]) if smoke else (MFU_DATA + MFU_DECODERS[name])
    argv = [sys.executable, "-m", "mrgfast.train", *model, *RUN_QUIET, "cuda_graphs=true",
            f"schedule.max_steps={steps}", f"telemetry.log_every={1 if smoke else 5}", "output_dir={work}/run"]
    return Part(name, "train", DEFAULT_SECONDS[name], tuple(argv), "train")


def profile_part(smoke: bool) -> Part:
    """One eager training step of the same run under torch.profiler: the kernels it spends its time in."""
    argv = [sys.executable, "-m", "benchmarks.gpu_suite.profile_step", "--out", "{json}", "--skip",
            str(PROFILE_SKIP[smoke]), *run_args(smoke), "output_dir={work}/run"]
    return Part("profile", "profile", DEFAULT_SECONDS["profile"], tuple(argv), "json")


def all_parts(smoke: bool) -> list:
    """Every part in the order the suite runs them: tests, kernel benchmarks, end-to-end, training, profile."""
    def ordered(names, order):
        return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))

    names = benchmark_names()
    kernels = ordered([n for n in names if is_kernel_benchmark(n)], KERNEL_ORDER)
    others = ordered([n for n in names if not is_kernel_benchmark(n)], E2E_ORDER)
    return ([tests_part()] + [benchmark_part(n, smoke) for n in kernels + others]
            + [train_part(smoke)] + [mfu_part(name, smoke) for name in MFU_DECODERS] + [profile_part(smoke)])


def select(parts: list, only: str) -> list:
    """The parts `--only` names (comma-separated part or group names), in the suite's order; unknown names are an
    error that lists the choices."""
    if not only:
        return list(parts)
    wanted = [item.strip() for item in only.split(",") if item.strip()]
    known = {p.name for p in parts} | {p.group for p in parts}
    unknown = [item for item in wanted if item not in known]
    if unknown or not wanted:
        raise ValueError(f"--only {only!r}: unknown {', '.join(unknown) or 'empty list'}; choose from parts "
                         f"{', '.join(p.name for p in parts)} or groups {', '.join(dict.fromkeys(p.group for p in parts))}")
    return [p for p in parts if p.name in wanted or p.group in wanted]


def shares(parts: list, budget: float) -> dict:
    """Each part's time box before carry-over: its default seconds, all scaled down together when they add up to
    more than `budget`."""
    total = sum(p.seconds for p in parts)
    scale = min(1.0, budget / total) if total else 1.0
    return {p.name: p.seconds * scale for p in parts}
