"""The recipe configs train: each on its synthetic twin out of the box; PeFoMed stage 2 starts from stage 1; LDP's DPO
starts from the SFT adapter, both references agreeing. (That each parses with its paper's settings:
tests/config/test_recipes.py.)"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mrgfast.peft import adapter_state_dict
from mrgfast.train import train
from mrgfast.assemble import build_all
from mrgfast.training.checkpoint import read_checkpoint
from mrgfast.config import load_config
from tests.tiny_run import CONFIGS

RECIPES = ["demo", "pefomed_stage1", "mrgllm_promptwise", "mrgllm_promptbook", "ldp_sft", "rad3d_prefix"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Synthetic twins shared by the module's runs."""
    return tmp_path_factory.mktemp("recipe-cache")


def tiny(name: str, cache: Path, out: Path, *extra):
    """Recipe `name` shrunk to a few tiny steps on a 12-study synthetic twin, writing to `out`."""
    overrides = [f"output_dir={out}", f"data.cache_dir={cache}", "data.synthetic_n=12", "data.rows=1",
                 "schedule.max_steps=2", "schedule.warmup_ratio=0", "schedule.warmup_steps=0",
                 "checkpoint.every_steps=100", "telemetry.progress_bar=false", "telemetry.tensorboard=false",
                 "telemetry.log_every=1", "resume=none"]
    if name == "demo":
        overrides += ["model.hidden_size=32", "model.intermediate_size=64", "model.vision_dim=16",
                      "data.synthetic_size=32", "data.token_budget=256", "data.max_length=256"]
    if name == "rad3d_prefix":  # a random classifier (tests only) and a 2-layer mapper keep it tiny
        overrides += ["data.synthetic_volumes=6", "model.classifier=random", "model.mapper_layers=2"]
    return load_config(CONFIGS / f"{name}.yaml", overrides + list(extra))


# What each recipe trains (DESIGN.md): parameter-name prefixes of the trainable weights.
TRAINED = {
    "demo": ("decoder.", "adapters.image.proj."),
    "pefomed_stage1": ("decoder.", "adapters.image.proj."),
    "mrgllm_promptwise": ("vision.", "adapters.image.", "adapters.prompt."),
    "mrgllm_promptbook": ("vision.", "adapters.image.", "adapters.prompt."),
    "ldp_sft": ("decoder.",),
    "rad3d_prefix": ("adapters.prefix.",),
}


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_on_its_synthetic_twin(name, cache, tmp_path):
    result = train(tiny(name, cache, tmp_path))
    assert result.step == 2 and (tmp_path / "step-000002" / "manifest.json").is_file()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    trained = {n for n, p in result.model.named_parameters() if p.requires_grad}
    prefixes = TRAINED[name]
    assert trained and all(n.startswith(prefixes) for n in trained), sorted(trained)[:5]
    assert all(any(n.startswith(p) for n in trained) for p in prefixes)
    decoder_trained = [n for n in trained if n.startswith("decoder.")]
    assert all(".lora_A." in n or ".lora_B." in n for n in decoder_trained)  # the LLM itself stays frozen
    if name == "rad3d_prefix":
        assert not any("classifier" in n for n in trained)  # the diagnostic classifier is frozen


def test_pefomed_stage2_starts_from_stage1(cache, tmp_path):
    stage1 = train(tiny("pefomed_stage1", cache, tmp_path / "s1"))
    config = tiny("pefomed_stage2", cache, tmp_path / "s2", f"model.init_from={stage1.checkpoint}")
    pieces = build_all(config, torch.device("cpu"))
    saved = read_checkpoint(stage1.checkpoint).tensors["modules"]
    mine = pieces.model.trainable_state_dict()
    assert mine.keys() == saved.keys()
    assert all(torch.equal(mine[k], saved[k]) for k in saved)
    adapter = load_file(str(stage1.checkpoint / "adapter" / "adapter_model.safetensors"))
    loaded = adapter_state_dict(pieces.model.decoder)
    assert adapter.keys() == loaded.keys() and all(torch.equal(adapter[k], loaded[k]) for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # stage 1 did train the adapter
    result = train(config)
    assert result.step == 2


def test_ldp_dpo_from_sft_adapter_both_references_agree(cache, tmp_path):
    sft = train(tiny("ldp_sft", cache, tmp_path / "sft", "optim.lr=1e-2"))
    init = f"model.init_from={sft.checkpoint}"
    live = train(tiny("ldp_dpo", cache, tmp_path / "live", init, "optim.lr=1e-3"))
    pre = train(tiny("ldp_dpo", cache, tmp_path / "pre", init, "optim.lr=1e-3", "dpo.reference=precomputed"))
    live_losses = [r["loss"] for r in live.history]
    assert live_losses == pytest.approx([r["loss"] for r in pre.history], rel=1e-5, abs=1e-6)
    for key in ("rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert key in live.history[-1]
    reference = load_file(str(tmp_path / "pre" / "reference_logps.safetensors"))
    ids = {s.id for s in build_all(tiny("ldp_dpo", cache, tmp_path / "x", init), torch.device("cpu")).dataset.samples}
    assert set(reference) == ids and all(v.shape == (2,) for v in reference.values())
    # At step 1 the policy is the SFT adapter and the reference is the base: the logged log-ratios are not zero.
    assert live.history[0]["rewards/chosen"] != 0.0
