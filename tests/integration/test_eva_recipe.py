"""PeFoMed stage 1 end to end on a tiny EVA-g tower (timm's layout and LAVIS's, at its own size and resampled to
twice it, as PeFoMed runs the 224-px EVA-CLIP-g at 448): the tower BLIP-2's way (block outputs before the last
block, no final norm, class token dropped) feeding the projector's ln_vision, sized from the tower."""

import json

import pytest
import torch

from mrgfast.models import VisionTower
from mrgfast.train import train
from tests.integration.test_recipes import tiny

try:  # the `eva` extra
    import timm
    from timm.models import save_for_hf
except ImportError:
    timm = None

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(timm is None, reason="timm (the `eva` extra) is not installed")]

ARGS = dict(embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0, img_size=56)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The synthetic twin shared by the module's runs."""
    return tmp_path_factory.mktemp("eva-recipe-cache")


def tiny_eva_dir(path, layout: str):
    """A random tiny EVA-g saved as timm's save_for_hf directory or as LAVIS's eva_vit_g.pth (+ its head count)."""
    torch.manual_seed(0)
    model = timm.create_model("eva_giant_patch14_224", pretrained=False, **ARGS)
    path.mkdir()
    if layout == "timm":
        save_for_hf(model, path, model_args=ARGS, safe_serialization=True)
    else:
        state = {k: v for k, v in model.state_dict().items() if not k.startswith(("norm.", "fc_norm.", "head."))}
        torch.save(state, path / "eva_vit_g.pth")
        (path / "config.json").write_text(json.dumps({"model_args": {"num_heads": ARGS["num_heads"]}}))
    return path


@pytest.mark.parametrize("layout, size", [("timm", None), ("lavis", 112)])
def test_pefomed_stage1_trains_on_a_tiny_eva(cache, tmp_path, layout, size):
    eva = tiny_eva_dir(tmp_path / "eva", layout)
    extra = [f"model.vision_name_or_path={eva}"] + ([f"data.image_size={size}"] if size else [])
    result = train(tiny("pefomed_stage1", cache, tmp_path / "run", *extra))
    assert result.step == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    tower, projector = result.model.vision, result.model.adapters["image"]
    assert isinstance(tower, VisionTower) and tower.family == "eva" and tower.frozen
    assert tower.select_layer == -2 and len(tower.encoder.model.blocks) == 2  # BLIP-2: the last block dropped
    side = (size or 56) // 14
    assert tower.image_size == side * 14 and tower.drop_cls
    # ln_vision and the 4-token grouping are sized from the tower's width; ln_vision stays frozen.
    assert projector.norm.normalized_shape == (64,) and projector.proj.in_features == 4 * 64
    assert not projector.norm.weight.requires_grad and projector.proj.weight.requires_grad
    trained = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("decoder.", "adapters.image.proj.")) for n in trained)
    assert result.model.slot_tokens("image") == side * side // 4


def test_vision_select_layer_reaches_the_tower(cache, tmp_path):
    eva = tiny_eva_dir(tmp_path / "eva", "timm")
    config = tiny("pefomed_stage1", cache, tmp_path / "run", f"model.vision_name_or_path={eva}",
                  "model.vision_select_layer=-1", "schedule.max_steps=1")
    result = train(config)
    assert result.model.vision.select_layer == -1 and len(result.model.vision.encoder.model.blocks) == 3
