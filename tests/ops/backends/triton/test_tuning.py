"""The Triton tuner: token counts bucketed in the key, one tuning per bucket, choices kept on disk, the fixed mode."""

import json

import pytest
import torch

from mrgfast.ops.backend import triton_interpreting
from mrgfast.ops.backends.triton import tuning
from mrgfast.ops.backends.triton.tuning import Tuned, token_bucket

triton = pytest.importorskip("triton")


def test_token_bucket_is_the_power_of_two_at_or_above():
    assert [token_bucket(n) for n in (0, 1, 2, 3, 1000, 1024, 1025, 2048, 2049, 4000)] == \
        [0, 1, 2, 4, 1024, 1024, 2048, 2048, 4096, 4096]


def lora_forward_args(tokens: int) -> tuple:
    """Arguments of lora_forward_kernel as lora_forward passes them, for `tokens` rows (tiny placeholder tensors)."""
    t = torch.empty(1)
    return (t, t, t, t, t, t, t, tokens, 4096, 4096, 16, *([1] * 10), 2.0, 0.05, 7)


def test_lora_key_maps_every_token_count_of_a_bucket_to_one_key():
    from mrgfast.ops.backends.triton.lora_fused import _tuned_forward

    tuned = _tuned_forward(False)
    flags = dict(HAS_BIAS=False, HAS_DROPOUT=True, R=16, GROUP_M=8, DOT_FP32=False, PRECISION="ieee")
    keys = {tuned.key_of(lora_forward_args(n), flags) for n in range(1025, 2049)}
    assert len(keys) == 1
    assert tuned.key_of(lora_forward_args(1024), flags) not in keys
    assert tuned.key_of(lora_forward_args(2049), flags) not in keys
    # What the key is made of: the bucket and the fixed dims, the dtypes, every flag.
    assert tuned.key_of(lora_forward_args(2049), {**flags, "HAS_DROPOUT": False}) != \
        tuned.key_of(lora_forward_args(2049), flags)


MASK_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_K": k}, num_warps=4, num_stages=2)
                for m, k in ((16, 16), (32, 16), (16, 32))]


def mask_tuner(timings: dict, calls: list) -> Tuned:
    """keep_mask_kernel (the interpreter runs it) under a tuner whose benchmark returns `timings` by BLOCK_M,
    BLOCK_K and records each candidate it measured in `calls`."""
    from mrgfast.ops.backends.triton.common import keep_mask_kernel

    def bench(fn):
        fn()  # the candidate really runs
        config = MASK_CONFIGS[len(calls) % len(MASK_CONFIGS)]
        calls.append(config)
        return timings[(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_K"])]

    return Tuned(keep_mask_kernel, MASK_CONFIGS, key=["M", "K"], buckets=["M"], bench=bench)


def launch_mask(tuned: Tuned, rows: int, cols: int = 20) -> torch.Tensor:
    """Run the tuned mask kernel on [rows, cols] and return its int8 mask."""
    out = torch.full((rows, cols), -1, dtype=torch.int8)
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(cols, meta["BLOCK_K"]))  # noqa: E731
    tuned(grid, out, rows, cols, 0.3, 11)
    return out


@pytest.mark.triton
def test_tunes_once_per_bucket_and_runs_the_fastest_config(tuner_env):
    if not triton_interpreting():
        pytest.skip("runs the kernel in the Triton interpreter (TRITON_INTERPRET=1)")
    from mrgfast.ops.backends.triton.common import triton_keep_mask

    calls = []
    tuned = mask_tuner({(16, 16): 3.0, (32, 16): 1.0, (16, 32): 2.0}, calls)
    for rows in (33, 40, 50, 64):  # one bucket: 64
        got = launch_mask(tuned, rows)
        assert torch.equal(got.bool(), triton_keep_mask(rows, 20, 0.3, 11, "cpu")), rows
    assert len(tuner_env) == 1 and len(calls) == len(MASK_CONFIGS)
    assert tuner_env[0].kernel == "keep_mask_kernel" and "BLOCK_M=32" in tuner_env[0].config
    launch_mask(tuned, 65)  # the next bucket tunes again
    assert len(tuner_env) == 2


@pytest.mark.triton
def test_a_new_process_reads_the_choice_from_disk(tuner_env, monkeypatch, tmp_path):
    if not triton_interpreting():
        pytest.skip("runs the kernel in the Triton interpreter (TRITON_INTERPRET=1)")
    calls = []
    tuned = mask_tuner({(16, 16): 3.0, (32, 16): 1.0, (16, 32): 2.0}, calls)
    launch_mask(tuned, 40)
    files = list((tmp_path / "tuning").glob("keep_mask_kernel-*.json"))
    assert len(files) == 1
    stored = json.loads(files[0].read_text())
    assert stored["device"] == "cpu" and len(stored["choices"]) == 1

    tuning.forget()  # as a second process starts
    launch_mask(tuned, 50)
    assert len(tuner_env) == 1 and len(calls) == len(MASK_CONFIGS)

    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path / "elsewhere"))  # the user moved the cache: tune again
    tuning.forget()
    launch_mask(tuned, 50)
    assert len(tuner_env) == 2


@pytest.mark.triton
def test_a_stored_choice_for_other_configs_is_ignored(tuner_env, tmp_path):
    if not triton_interpreting():
        pytest.skip("runs the kernel in the Triton interpreter (TRITON_INTERPRET=1)")
    tuned = mask_tuner({(16, 16): 3.0, (32, 16): 1.0, (16, 32): 2.0}, [])
    launch_mask(tuned, 40)
    (path,) = (tmp_path / "tuning").glob("*.json")
    stored = json.loads(path.read_text())
    for entry in stored["choices"].values():
        entry["config"] = "BLOCK_M=999"
    path.write_text(json.dumps(stored))
    tuning.forget()
    launch_mask(tuned, 40)
    assert len(tuner_env) == 2


class AddingKernel:
    """A stand-in kernel that adds 1 into C and records the config of each launch; configs listed in `broken`
    fail to launch, as one needing more shared memory than the device has would."""

    arg_names = ["C", "M"]

    def __init__(self, broken=()):
        self.launches, self.broken = [], set(broken)
        self.fn = self.launch_kernel

    def launch_kernel(self):
        """Only here for its name."""

    def __getitem__(self, grid):
        def launch(c, m, BLOCK, num_warps, num_stages):  # noqa: N803 - Triton's naming
            if BLOCK in self.broken:
                raise RuntimeError(f"out of resources: BLOCK={BLOCK}")
            self.launches.append(BLOCK)
            c += 1
        return launch


ADD_CONFIGS = [triton.Config({"BLOCK": b}, num_warps=4, num_stages=3) for b in (64, 128, 256)]


def test_tuning_restores_what_the_kernel_adds_into(tuner_env):
    kernel = AddingKernel(broken={128})
    tuned = Tuned(kernel, ADD_CONFIGS, key=["M"], buckets=["M"], restore=["C"],
                  bench=lambda fn: (fn(), float(len(kernel.launches)))[1])
    c = torch.zeros(3)
    tuned((1,), c, 100)
    assert torch.equal(c, torch.ones(3))  # the candidates' additions undone, then one real launch
    assert kernel.launches == [64, 256, 64]  # the broken config was skipped; 64 measured fastest
    assert len(tuner_env) == 1


def test_no_config_runs_is_an_error(tuner_env):
    tuned = Tuned(AddingKernel(broken={64, 128, 256}), ADD_CONFIGS, key=["M"], bench=lambda fn: fn() or 1.0)
    with pytest.raises(RuntimeError, match="no config could run"):
        tuned((1,), torch.zeros(1), 5)


def test_fixed_mode_runs_the_first_config_that_fits_and_tunes_nothing(tuner_env, monkeypatch):
    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "off")
    kernel = AddingKernel(broken={64})
    benched = []
    tuned = Tuned(kernel, ADD_CONFIGS, key=["M"], bench=benched.append)
    c = torch.zeros(1)
    for m in (10, 10, 11):  # the second launch of a key reuses its config; a new key tries again
        tuned((1,), c, m)
    assert kernel.launches == [128, 128, 128] and c.item() == 3.0
    assert benched == [] and tuner_env == []
    with pytest.raises(RuntimeError, match="out of resources"):
        Tuned(AddingKernel(broken={64, 128, 256}), ADD_CONFIGS, key=["M"])((1,), c, 1)


def test_key_names_must_be_kernel_arguments():
    with pytest.raises(ValueError, match="TOKENS: not arguments of launch_kernel"):
        Tuned(AddingKernel(), ADD_CONFIGS, key=["M"], buckets=["TOKENS"])


def test_cache_dir_is_user_settable(monkeypatch, tmp_path):
    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path))
    assert tuning.cache_dir() == tmp_path
    monkeypatch.delenv(tuning.CACHE_ENV)
    assert tuning.cache_dir().parts[-3:] == (".cache", "mrgfast", "triton-tuning")


@pytest.mark.gpu
def test_twenty_token_counts_tune_at_most_three_times_and_a_new_process_none(tuner_env):
    # Forward calls only: each tuning compiles and times every candidate, and this runs in the GPU suite's time box
    # (the backward kernels' keys are checked in the interpreter, tests/ops/backends/triton/test_tuned_launch.py).
    # With dropout: the default (split) design runs no Triton kernel without it (cuBLAS only), and with it tunes
    # lora_down_kernel, the one kernel of its forward.
    from mrgfast.ops import lora_linear

    g = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(1024, 1024, device="cuda", generator=g, dtype=torch.bfloat16) / 32
    lora_a = torch.randn(16, 1024, device="cuda", generator=g, dtype=torch.bfloat16) / 32
    lora_b = torch.randn(1024, 16, device="cuda", generator=g, dtype=torch.bfloat16) / 4
    counts = torch.linspace(1000, 4000, 20).round().int().tolist()
    assert len(set(counts)) == 20

    def forward_calls():
        for tokens in counts:
            x = torch.randn(tokens, 1024, device="cuda", generator=g, dtype=torch.bfloat16)
            lora_linear(x, weight, None, lora_a, lora_b, 2.0, dropout_p=0.05, training=True, seed=tokens)
        torch.cuda.synchronize()

    forward_calls()
    assert 1 <= len(tuner_env) <= 3, [event.key for event in tuner_env]  # buckets 1024, 2048, 4096
    tuning.forget()  # a second process with the same cache directory tunes nothing
    forward_calls()
    assert len(tuner_env) <= 3
