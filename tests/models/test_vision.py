"""VisionTower against the HF models it wraps: tiny random CLIP / SigLIP / Qwen2-VL saved to disk and reloaded."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from mrgfast.data.images import ImageConfig, preprocess_image
from mrgfast.models.vision import (Qwen2VLMerger, VisionFeatures, VisionTower, blocks_to_rows, qwen2_vl_patchify)
from tests.models.tiny_hf import VISION
from tests.ops.op_cases import assert_close

import transformers

VISION_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28,
                    patch_size=7)
TEXT_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64,
                  bos_token_id=0, eos_token_id=1, pad_token_id=1)
SIDE = VISION_SIZES["image_size"] // VISION_SIZES["patch_size"]
QWEN_PATCH = VISION["patch_size"]


def build(name: str):
    """A tiny HF model by name; "clip"/"siglip" are whole two-tower models, "*_vision" the vision-only ones."""
    torch.manual_seed(0)
    if name == "clip_vision":
        return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION_SIZES))
    if name == "siglip_vision":
        return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION_SIZES))
    if name == "clip":
        config = transformers.CLIPConfig(vision_config=VISION_SIZES, text_config=TEXT_SIZES, projection_dim=16)
        return transformers.CLIPModel(config)
    config = transformers.SiglipConfig(vision_config=VISION_SIZES, text_config=TEXT_SIZES)
    return transformers.SiglipModel(config)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """saved(name) -> (HF model in eval mode, directory it was saved to); built once per module."""
    built = {}

    def get(name):
        if name not in built:
            model = build(name).eval()
            with torch.no_grad():  # LayerNorms away from 1/0, so a skipped or misplaced norm shows
                for module in model.modules():
                    if isinstance(module, torch.nn.LayerNorm):
                        module.weight.normal_(1.0, 0.2)
                        module.bias.normal_(0.0, 0.2)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            built[name] = (model, path)
        return built[name]
    return get


def vision_part(model):
    """The HF vision model inside a whole CLIPModel / SiglipModel (or the model itself)."""
    return getattr(model, "vision_model", model)


def images(batch=2, side=VISION_SIZES["image_size"], seed=0):
    """Random normalised images [batch, 3, side, side]."""
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


def hf_hidden(model, pixels, select_layer, post_layernorm=False):
    """HF's hidden_states[select_layer] of the vision model (after its post_layernorm when asked), no grad."""
    vision = vision_part(model)
    with torch.no_grad():
        hidden = vision(pixels, output_hidden_states=True).hidden_states[select_layer]
        return vision.post_layernorm(hidden) if post_layernorm else hidden


@pytest.mark.parametrize("name", ["clip_vision", "clip", "siglip_vision", "siglip"])
@pytest.mark.parametrize("select_layer,post_layernorm", [(-1, False), (-2, True), (0, False), (2, False)])
def test_features_match_hf_hidden_states(saved, name, select_layer, post_layernorm):
    model, path = saved(name)
    tower = VisionTower.from_pretrained(path, select_layer=select_layer, post_layernorm=post_layernorm)
    pixels = images()
    out = tower(pixels)
    expected = hf_hidden(model, pixels, select_layer, post_layernorm)
    if name.startswith("clip"):
        expected = expected[:, 1:]  # drop_cls=True by default
    assert out.grid == (SIDE, SIDE) and not out.cls
    assert out.features.shape == (2, SIDE * SIDE, VISION_SIZES["hidden_size"])
    assert_close(out.features, expected, torch.float32, f"{name} layer {select_layer}")
    # select_layer builds only the layers it needs
    kept = select_layer if select_layer >= 0 else VISION_SIZES["num_hidden_layers"] + 1 + select_layer
    assert len(tower.encoder.encoder.layers) == kept


def test_siglip_last_hidden_state_is_last_layer_with_post_layernorm(saved):
    model, path = saved("siglip_vision")
    pixels = images()
    with torch.no_grad():
        expected = model(pixels).last_hidden_state
    out = VisionTower.from_pretrained(path, post_layernorm=True)(pixels)
    assert_close(out.features, expected, torch.float32, "siglip last_hidden_state")


def test_clip_keeps_cls_when_asked(saved):
    model, path = saved("clip")
    pixels = images()
    out = VisionTower.from_pretrained(path, drop_cls=False)(pixels)
    expected = hf_hidden(model, pixels, -1)
    assert out.cls and out.features.shape == (2, 1 + SIDE * SIDE, VISION_SIZES["hidden_size"])
    assert_close(out.features, expected, torch.float32, "with CLS")
    assert_close(out.patches, expected[:, 1:], torch.float32, "patches")


def test_bf16_tower_close_to_fp32_hf(saved):
    model, path = saved("clip_vision")
    tower = VisionTower.from_pretrained(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in tower.parameters())
    out = tower(images())
    assert out.features.dtype == torch.bfloat16
    assert_close(out.features, hf_hidden(model, images(), -1)[:, 1:], torch.bfloat16, "bf16 features")


def test_frozen_tower_builds_no_graph_and_stays_in_eval(saved):
    _, path = saved("clip")
    tower = VisionTower.from_pretrained(path)
    assert tower.frozen and not any(p.requires_grad for p in tower.parameters())
    parent = torch.nn.ModuleDict({"tower": tower, "head": torch.nn.Linear(2, 2)}).train()
    assert parent["head"].training and tower.training
    assert not any(m.training for m in tower.encoder.modules())
    pixels = images().requires_grad_()
    out = tower(pixels)
    assert out.features.grad_fn is None and not out.features.requires_grad


def test_unfrozen_tower_gradients_match_hf(saved):
    model, path = saved("clip")
    tower = VisionTower.from_pretrained(path, frozen=False, select_layer=-2)
    tower.train()
    assert tower.encoder.training and all(p.requires_grad for p in tower.parameters())
    pixels = images().requires_grad_()
    hf_pixels = pixels.detach().clone().requires_grad_()
    grad = torch.randn(2, SIDE * SIDE, VISION_SIZES["hidden_size"], generator=torch.Generator().manual_seed(5))
    tower(pixels).features.backward(grad)
    vision = vision_part(model)
    vision.zero_grad()
    vision(hf_pixels, output_hidden_states=True).hidden_states[-2][:, 1:].backward(grad)
    assert_close(pixels.grad, hf_pixels.grad, torch.float32, "d pixels")
    theirs = dict(vision.named_parameters())
    compared = 0
    for name, param in tower.encoder.named_parameters():
        if theirs[name].grad is not None:  # the last layer and post_layernorm are not built by the tower
            assert_close(param.grad, theirs[name].grad, torch.float32, f"d {name}")
            compared += 1
    assert compared == len(list(tower.parameters())) > 0
    vision.zero_grad()


def test_gradient_checkpointing_same_gradients_and_recomputes(saved):
    _, path = saved("siglip")
    pixels = images()
    grads = []
    for checkpointing in (False, True):
        tower = VisionTower.from_pretrained(path, frozen=False, gradient_checkpointing=checkpointing).train()
        calls = []
        layer = tower.encoder.encoder.layers[0]
        mlp_forward = layer.mlp.forward  # counted by wrapping (hooks do not fire on recompute)
        layer.mlp.forward = lambda h: (calls.append(1), mlp_forward(h))[1]
        tower(pixels).features.square().sum().backward()
        assert len(calls) == 1 + checkpointing
        grads.append([p.grad for p in tower.parameters()])
    for plain, recomputed in zip(*grads):
        assert_close(recomputed, plain, torch.float32, "d parameter")


def test_sharded_checkpoint_loads(saved, tmp_path):
    model, _ = saved("clip")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    out = VisionTower.from_pretrained(tmp_path)(images())
    assert_close(out.features, hf_hidden(model, images(), -1)[:, 1:], torch.float32, "sharded")


def test_set_frozen_switches_back(saved):
    _, path = saved("siglip")
    tower = VisionTower.from_pretrained(path, frozen=False).set_frozen(True)
    tower.train()
    assert not tower.encoder.training and not any(p.requires_grad for p in tower.parameters())


@pytest.mark.parametrize("side", [30, 21])
def test_wrong_image_size_rejected(saved, side):
    _, path = saved("clip_vision")
    tower = VisionTower.from_pretrained(path)
    with pytest.raises(ValueError, match="divisible by the patch size" if side % 7 else "image_size"):
        tower(images(side=side))


def test_bad_options_rejected(saved):
    _, path = saved("clip_vision")
    with pytest.raises(ValueError, match="select_layer"):
        VisionTower.from_pretrained(path, select_layer=-5)
    with pytest.raises(ValueError, match="merger"):
        VisionTower.from_pretrained(path, merged=True)
    with pytest.raises(ValueError, match="channels|\\[batch, 3"):
        VisionTower.from_pretrained(path)(torch.randn(2, 1, 28, 28))


def test_unsupported_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32}))
    with pytest.raises(ValueError, match="'vit'.*clip.*qwen2_vl.*siglip"):
        VisionTower.from_pretrained(tmp_path)


def test_missing_vision_weight_named(saved, tmp_path):
    _, path = saved("clip_vision")
    weights = load_file(path / "model.safetensors")
    del weights["encoder.layers.1.mlp.fc1.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ValueError, match="encoder.layers.1.mlp.fc1.weight"):
        VisionTower.from_pretrained(tmp_path)


def test_legacy_vision_model_prefix_loads(saved, tmp_path):
    """A CLIPVisionModel saved by transformers < 5 keeps its weights under `vision_model.`."""
    model, path = saved("clip_vision")
    weights = {f"vision_model.{k}": v for k, v in load_file(path / "model.safetensors").items()}
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    out = VisionTower.from_pretrained(tmp_path)(images())
    assert_close(out.features, hf_hidden(model, images(), -1)[:, 1:], torch.float32, "legacy prefix")


# ---- image preprocessing parameters ----

def test_image_config_from_preprocessor_config(saved, tmp_path):
    _, path = saved("clip")
    for file in path.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "CLIPImageProcessor", "image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6],
         "resample": 2, "crop_size": {"height": 28, "width": 28}, "size": {"shortest_edge": 28}}))
    config = VisionTower.from_pretrained(tmp_path).image_config()
    assert config == ImageConfig(size=28, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), channels=3, resample="bilinear")
    assert VisionTower.from_pretrained(tmp_path).image_config(augment=True).augment
    # The config drives mrgfast.data's preprocessing, whose output the tower takes as is.
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    assert VisionTower.from_pretrained(tmp_path)(preprocess_image(image, config)[None]).features.shape == (1, 16, 32)
    with pytest.raises(ValueError, match="28x28"):
        VisionTower.from_pretrained(tmp_path).image_config(size=32)


def test_image_config_defaults_without_preprocessor_config(saved):
    _, path = saved("siglip")
    assert not (path / "preprocessor_config.json").exists()
    config = VisionTower.from_pretrained(path).image_config()
    assert (config.size, config.mean, config.std, config.resample) == (28, (0.5,) * 3, (0.5,) * 3, "bicubic")
    _, path = saved("clip_vision")
    assert VisionTower.from_pretrained(path).image_config().mean == (0.48145466, 0.4578275, 0.40821073)


def test_bad_preprocessor_config_named(saved, tmp_path):
    _, path = saved("clip_vision")
    for file in path.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5]}))
    with pytest.raises(ValueError, match="image_mean"):
        VisionTower.from_pretrained(tmp_path)


# ---- Qwen2-VL ----

def qwen_images(batch=2, height=56, width=84, seed=0):
    """Random normalised images whose sides are multiples of patch * merge (28)."""
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def test_patchify_matches_hf_image_processor():
    pixels = qwen_images()
    processor = transformers.Qwen2VLImageProcessor(do_resize=False, do_rescale=False, do_normalize=False,
                                                   patch_size=QWEN_PATCH, temporal_patch_size=2, merge_size=2)
    expected = processor(images=list(pixels), return_tensors="pt")
    patches, grid_thw = qwen2_vl_patchify(pixels, QWEN_PATCH, 2, 2)
    assert torch.equal(grid_thw, expected["image_grid_thw"])
    assert torch.equal(patches, expected["pixel_values"])


def test_qwen2_vl_features_match_hf_visual(hf_model):
    model, path = hf_model("qwen2_vl")
    pixels = qwen_images()
    patches, grid_thw = qwen2_vl_patchify(pixels, QWEN_PATCH, 2, 2)
    with torch.no_grad():
        hf = model.model.visual(patches, grid_thw=grid_thw)
        merged = torch.cat(model.get_image_features(patches, grid_thw).pooler_output)
    tower = VisionTower.from_pretrained(path)
    out = tower(pixels)
    assert out.grid == (4, 6) and out.features.shape == (2, 24, VISION["embed_dim"])
    assert_close(out.features, blocks_to_rows(hf.last_hidden_state, 2, 4, 6, 2), torch.float32, "before merger")
    # The same images given as the HF processor's flattened patches + grid_thw.
    assert_close(tower(patches, grid_thw=grid_thw).features, out.features, torch.float32, "flattened input")
    merged_tower = VisionTower.from_pretrained(path, merged=True)
    out_merged = merged_tower(pixels)
    assert out_merged.grid == (2, 3) and out_merged.features.shape == (2, 6, VISION["hidden_size"])
    assert_close(out_merged.features.reshape(12, -1), merged, torch.float32, "after merger")
    assert merged_tower.feature_dim == VISION["hidden_size"] and tower.feature_dim == VISION["embed_dim"]
    # Without merged=True the merger is not part of the tower (Qwen2VLMerger loads it as an adapter).
    assert not any("merger" in name for name, _ in tower.named_parameters())
    assert any("merger" in name for name, _ in merged_tower.named_parameters())


def test_qwen2_vl_grid_is_row_major(hf_model):
    """Layer 0 (the patch embedding) at grid (r, c) is the embedding of the image patch at row r, column c."""
    _, path = hf_model("qwen2_vl")
    tower = VisionTower.from_pretrained(path, select_layer=0)
    pixels = qwen_images(batch=1)
    out = tower(pixels)
    weight = tower.encoder.patch_embed.proj.weight.reshape(VISION["embed_dim"], -1)  # [D, C * t * p * p]
    p = QWEN_PATCH
    for r, c in [(0, 0), (0, 5), (1, 2), (3, 4)]:
        patch = pixels[0, :, r * p:(r + 1) * p, c * p:(c + 1) * p]
        vector = patch.unsqueeze(1).expand(3, 2, p, p).reshape(-1)  # the frame repeated over t = 2
        assert_close(out.features[0, r * 6 + c], weight @ vector, torch.float32, f"patch ({r}, {c})")


def test_qwen2_vl_merger_adapter_on_row_major_features(hf_model):
    _, path = hf_model("qwen2_vl")
    pixels = qwen_images()
    features = VisionTower.from_pretrained(path)(pixels)
    expected = VisionTower.from_pretrained(path, merged=True)(pixels)
    merger = Qwen2VLMerger.from_pretrained(path)
    assert all(p.requires_grad for p in merger.parameters())
    out = merger(features)
    assert out.grid == expected.grid
    assert_close(out.features, expected.features, torch.float32, "merger adapter")


def test_qwen2_vl_merger_gradients_match_hf_patch_merger(hf_model):
    model, path = hf_model("qwen2_vl")
    hf_merger = model.model.visual.merger
    merger = Qwen2VLMerger.from_pretrained(path)
    blocks = torch.randn(2 * 24, VISION["embed_dim"], generator=torch.Generator().manual_seed(2))  # HF's order
    ours_in, theirs_in = blocks.clone().requires_grad_(), blocks.clone().requires_grad_()
    out = merger(VisionFeatures(blocks_to_rows(ours_in, 2, 4, 6, 2), (4, 6))).features
    expected = hf_merger(theirs_in)
    assert_close(out.reshape(12, -1), expected, torch.float32, "merged")
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3))
    hf_merger.zero_grad()
    out.reshape(12, -1).backward(grad)
    expected.backward(grad)
    assert_close(ours_in.grad, theirs_in.grad, torch.float32, "d features")
    pairs = [(merger.group.norm, hf_merger.ln_q), (merger.group.proj, hf_merger.mlp[0]), (merger.out, hf_merger.mlp[2])]
    for ours, theirs in pairs:
        assert_close(ours.weight.grad, theirs.weight.grad, torch.float32, "d weight")
        assert_close(ours.bias.grad, theirs.bias.grad, torch.float32, "d bias")
    hf_merger.zero_grad()


def test_qwen2_vl_unfrozen_gradients_match_hf(hf_model):
    model, path = hf_model("qwen2_vl")
    tower = VisionTower.from_pretrained(path, frozen=False, merged=True)
    pixels = qwen_images()
    patches, grid_thw = qwen2_vl_patchify(pixels, QWEN_PATCH, 2, 2)
    grad = torch.randn(12, VISION["hidden_size"], generator=torch.Generator().manual_seed(1))
    tower(pixels).features.reshape(12, -1).backward(grad)
    visual = model.model.visual
    visual.zero_grad()
    visual(patches, grid_thw=grid_thw).pooler_output.backward(grad)
    theirs = dict(visual.named_parameters())
    for name, param in tower.encoder.named_parameters():
        assert_close(param.grad, theirs[name].grad, torch.float32, f"d {name}")
    visual.zero_grad()


def test_qwen2_vl_bad_inputs(hf_model):
    _, path = hf_model("qwen2_vl")
    tower = VisionTower.from_pretrained(path)
    with pytest.raises(ValueError, match="divisible by patch_size \\* merge_size = 28"):
        tower(qwen_images(height=42))
    patches, grid_thw = qwen2_vl_patchify(torch.cat([qwen_images(1), qwen_images(1)]), QWEN_PATCH, 2, 2)
    with pytest.raises(ValueError, match="same patch grid"):
        tower(patches, grid_thw=torch.tensor([[1, 4, 6], [1, 6, 4]]))
    with pytest.raises(ValueError, match="t=2"):
        tower(patches, grid_thw=torch.tensor([[2, 4, 6]]))
    with pytest.raises(ValueError, match="flattened pixel_values"):
        tower(patches[:-1], grid_thw=grid_thw)
    with pytest.raises(ValueError, match="\\[batch, 3, height, width\\]"):
        tower(torch.randn(1, 1, 56, 56))
    with pytest.raises(ValueError, match="grid_thw \\[B, 3\\]"):
        tower(patches)
    with pytest.raises(ValueError, match="post_layernorm"):
        VisionTower.from_pretrained(path, post_layernorm=True)
    with pytest.raises(ValueError, match="select_layer"):
        VisionTower.from_pretrained(path, merged=True, select_layer=-2)


def test_qwen2_vl_image_config(hf_model, tmp_path):
    _, path = hf_model("qwen2_vl")
    for file in path.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"min_pixels": 3136, "max_pixels": 112 * 112, "image_mean": [0.1, 0.2, 0.3], "image_std": [0.3, 0.2, 0.1],
         "resample": 3, "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}))
    tower = VisionTower.from_pretrained(tmp_path)
    assert tower.image_config(size=56) == ImageConfig(size=56, mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1))
    with pytest.raises(ValueError, match="max_pixels"):
        tower.image_config()  # the default 448 is above this checkpoint's 112 x 112
    with pytest.raises(ValueError, match="multiple of"):
        tower.image_config(size=60)
    assert VisionTower.from_pretrained(path).image_config().size == 448


def test_vision_features_patches_property():
    features = torch.randn(2, 5, 3)
    assert torch.equal(VisionFeatures(features, (2, 2), cls=True).patches, features[:, 1:])
    assert VisionFeatures(features, (1, 5)).patches is features
