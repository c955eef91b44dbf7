"""EVA ViT towers against timm's own Eva: tiny random EVA-g-shaped models saved in timm's layout (save_for_hf) and in
LAVIS's (a plain state dict .pth), reloaded through VisionTower.from_pretrained."""

import ast
import json
import sys
from pathlib import Path

import pytest
import torch

from mrgfast.models.eva import (BLIP2_SELECT_LAYER, LAVIS_ARCHITECTURE, LAVIS_FILE, _timm, eva_shapes, find_eva,
                                interpolate_pos_embed, lavis_model_args)
from mrgfast.models.vision import VisionTower

try:  # the `eva` extra; CI installs it (torch 2.14.1 + torchvision 0.29.1 + timm)
    import timm
    from timm.layers import resample_abs_pos_embed
    from timm.models import save_for_hf
except ImportError:
    timm = None
needs_timm = pytest.mark.skipif(timm is None, reason="timm (the `eva` extra) is not installed")

ARCH = "eva_giant_patch14_224"
SIZE, PATCH = 56, 14  # a 4x4 patch grid
ARGS = dict(embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0, img_size=SIZE)
ROOT = Path(__file__).resolve().parents[2] / "mrgfast"


def tiny_eva(seed: int = 0, **overrides):
    """A random timm EVA-g with tiny sizes (non-trivial biases and norms, so a wrong mapping shows)."""
    torch.manual_seed(seed)
    args = dict(ARGS, **overrides)
    model = timm.create_model(ARCH, pretrained=False, **args).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("bias", "norm1.weight", "norm2.weight")) or "gamma" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model, args


def lavis_state(model) -> dict:
    """timm's state dict in LAVIS's layout: LAVIS's VisionTransformer has the same names but no final norm,
    fc_norm or head."""
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(("norm.", "fc_norm.", "head."))}


def block_output(model, images, layer: int):
    """timm's own tokens (class token first) after `layer` blocks: forward_intermediates, no final norm."""
    if layer == 0:
        tokens, _ = model._pos_embed(model.patch_embed(images))
        return tokens
    out = model.forward_intermediates(images, indices=[layer - 1], return_prefix_tokens=True, norm=False,
                                      output_fmt="NLC", intermediates_only=True)
    patches, prefix = out[0]
    return torch.cat([prefix, patches], dim=1)


@pytest.fixture(scope="module")
def timm_dir(tmp_path_factory):
    """(timm model, save_for_hf directory)."""
    model, args = tiny_eva()
    path = tmp_path_factory.mktemp("eva-timm")
    save_for_hf(model, path, model_args=args, safe_serialization=True)
    return model, path


def write_lavis(tmp_path, model, heads=None, name=LAVIS_FILE) -> Path:
    """The model's weights as LAVIS's eva_vit_g.pth in tmp_path (config.json with num_heads when given)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.save(lavis_state(model), tmp_path / name)
    if heads is not None:
        (tmp_path / "config.json").write_text(json.dumps({"model_args": {"num_heads": heads}}))
    return tmp_path / name


@needs_timm
@pytest.mark.parametrize("select_layer, blocks", [(None, 2), (-1, 3), (-2, 2), (1, 1), (0, 0), (-4, 0)])
def test_timm_layout_features_are_timm_block_outputs(timm_dir, select_layer, blocks):
    model, path = timm_dir
    tower = VisionTower.from_pretrained(path, select_layer=select_layer)
    assert len(tower.encoder.model.blocks) == blocks  # later blocks neither built nor loaded
    assert tower.select_layer == (BLIP2_SELECT_LAYER if select_layer is None else select_layer)
    images = torch.randn(3, 3, SIZE, SIZE)
    out = tower(images)
    with torch.no_grad():
        expected = block_output(model, images, blocks)
    assert out.grid == (4, 4) and not out.cls and out.features.shape == (3, 16, 64)
    torch.testing.assert_close(out.features, expected[:, 1:], atol=1e-5, rtol=0)


@needs_timm
def test_class_token_kept_when_asked(timm_dir):
    model, path = timm_dir
    tower = VisionTower.from_pretrained(path, drop_cls=False)
    images = torch.randn(2, 3, SIZE, SIZE)
    out = tower(images)
    with torch.no_grad():
        expected = block_output(model, images, 2)
    assert out.cls and out.features.shape == (2, 17, 64)
    torch.testing.assert_close(out.features, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.patches, expected[:, 1:], atol=1e-5, rtol=0)


@needs_timm
def test_bf16_tower_is_close_to_fp32(timm_dir):
    model, path = timm_dir
    tower = VisionTower.from_pretrained(path, dtype=torch.bfloat16)
    assert tower.encoder.model.pos_embed.dtype == torch.bfloat16
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = block_output(model, images, 2)[:, 1:]
    out = tower(images).features
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)


@needs_timm
def test_unfrozen_tower_gradients_equal_timm(timm_dir):
    model, path = timm_dir
    tower = VisionTower.from_pretrained(path, frozen=False, select_layer=-1)
    images = torch.randn(2, 3, SIZE, SIZE)
    weights = torch.randn(2, 16, 64)
    (tower(images).features * weights).sum().backward()
    reference = timm.create_model(ARCH, pretrained=False, **ARGS).eval()
    reference.load_state_dict(model.state_dict())
    (block_output(reference, images, 3)[:, 1:] * weights).sum().backward()
    theirs = dict(reference.named_parameters())
    ours = dict(tower.encoder.model.named_parameters())
    assert ours.keys() <= theirs.keys() and ours
    for name, param in ours.items():
        torch.testing.assert_close(param.grad, theirs[name].grad, atol=1e-5, rtol=1e-4, msg=name)


@needs_timm
def test_gradient_checkpointing_keeps_features(timm_dir):
    model, path = timm_dir
    tower = VisionTower.from_pretrained(path, frozen=False, gradient_checkpointing=True)
    assert tower.encoder.model.grad_checkpointing
    images = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = block_output(model, images, 2)[:, 1:]
    torch.testing.assert_close(tower(images).features.detach(), expected, atol=1e-5, rtol=0)


@needs_timm
def test_lavis_layout_loads_to_the_same_features(timm_dir, tmp_path):
    model, timm_path = timm_dir
    file = write_lavis(tmp_path / "lavis", model, heads=ARGS["num_heads"])
    images = torch.randn(2, 3, SIZE, SIZE)
    reference = VisionTower.from_pretrained(timm_path)(images).features
    for path in (file.parent, file):  # the directory holding eva_vit_g.pth, or the file itself
        assert find_eva(path) == ("lavis", file)
        tower = VisionTower.from_pretrained(path)
        assert len(tower.encoder.model.blocks) == 2 and tower.feature_dim == 64
        torch.testing.assert_close(tower(images).features, reference, atol=1e-5, rtol=0)


@needs_timm
@pytest.mark.parametrize("layer_scale", [False, True])
def test_lavis_heads_from_the_vit_g_head_width(tmp_path, layer_scale):
    # No config.json: width 176 = 2 x 88, so 2 heads, as 1408 -> 16 for the real ViT-g; MLP width from fc1.
    extra = dict(init_values=0.5) if layer_scale else {}
    model, _ = tiny_eva(seed=1, embed_dim=176, num_heads=2, mlp_ratio=3.0, **extra)
    file = write_lavis(tmp_path, model, name="weights.pth")
    assert ("blocks.0.gamma_1" in lavis_state(model)) == layer_scale
    tower = VisionTower.from_pretrained(file, select_layer=-1)
    attention = tower.encoder.model.blocks[0].attn
    assert attention.num_heads == 2 and attention.head_dim == 88
    assert tower.encoder.model.blocks[0].mlp.fc1.out_features == 528
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = block_output(model, images, 3)[:, 1:]
    torch.testing.assert_close(tower(images).features, expected, atol=1e-5, rtol=0)


@needs_timm
def test_full_size_vit_g_architecture_from_its_shapes():
    # The real eva_vit_g.pth's tensors (40 blocks, width 1408, 224 px), built on the meta device: the shapes alone
    # give timm's EVA-g (16 heads of 88, MLP 6144), and LAVIS's 39-block cut has exactly its tensors' shapes.
    full = timm.create_model(LAVIS_ARCHITECTURE, pretrained=False, device="meta", num_classes=0)
    state = lavis_state(full)
    shapes = eva_shapes(state, Path("eva_vit_g.pth"))
    assert shapes == dict(width=1408, depth=40, patch=14, channels=3, grid=16)
    args = lavis_model_args(state, shapes, Path("eva_vit_g.pth"))
    assert args == dict(embed_dim=1408, num_heads=16, mlp_ratio=6144 / 1408, patch_size=14, in_chans=3)
    cut = timm.create_model(LAVIS_ARCHITECTURE, pretrained=False, device="meta", **args, depth=39, num_classes=0,
                            global_pool="", use_fc_norm=False, use_post_transformer_norm=False)
    assert cut.blocks[0].attn.head_dim == 88 and cut.blocks[0].mlp.fc1.out_features == 6144
    kept = {k: v.shape for k, v in state.items() if not k.startswith("blocks.39.")}
    assert {k: v.shape for k, v in cut.state_dict().items()} == kept


@needs_timm
def test_position_interpolation_matches_timm_resampling():
    torch.manual_seed(0)
    for old, new in ((4, 8), (16, 32), (5, 3), (4, 4)):
        pos = torch.randn(1, 1 + old * old, 24)
        ours = interpolate_pos_embed(pos, new)
        theirs = resample_abs_pos_embed(pos, new_size=[new, new], num_prefix_tokens=1, interpolation="bicubic",
                                        antialias=False)
        assert ours.shape == (1, 1 + new * new, 24)
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
        torch.testing.assert_close(ours[:, 0], pos[:, 0], atol=0, rtol=0)  # the class token is kept
    # timm's own checkpoint_filter_fn resamples with antialias=True, whose bicubic kernel (PIL's, a=-0.5) differs
    # from LAVIS's F.interpolate(align_corners=False) (a=-0.75) even when upsampling: PeFoMed's 448-px tower follows
    # LAVIS, not timm's default.
    pos = torch.randn(1, 1 + 16 * 16, 8)
    antialiased = resample_abs_pos_embed(pos, new_size=[32, 32], num_prefix_tokens=1)
    assert (interpolate_pos_embed(pos, 32) - antialiased).abs().max() > 1e-2


@needs_timm
@pytest.mark.parametrize("layout", ["timm", "lavis"])
def test_larger_input_resamples_position_embeddings(timm_dir, tmp_path, layout):
    model, path = timm_dir
    if layout == "lavis":
        path = write_lavis(tmp_path, model, heads=ARGS["num_heads"])
    tower = VisionTower.from_pretrained(path, image_size=2 * SIZE, select_layer=-1)
    assert tower.image_size == 2 * SIZE and tower.image_config().size == 2 * SIZE
    resized = timm.create_model(ARCH, pretrained=False, **dict(ARGS, img_size=2 * SIZE)).eval()
    state = model.state_dict()
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=[8, 8], num_prefix_tokens=1,
                                                antialias=False)
    resized.load_state_dict(state)
    images = torch.randn(2, 3, 2 * SIZE, 2 * SIZE)
    out = tower(images)
    with torch.no_grad():
        expected = block_output(resized, images, 3)[:, 1:]
    assert out.grid == (8, 8)
    torch.testing.assert_close(out.features, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="must be 112x112"):
        tower(torch.randn(1, 3, SIZE, SIZE))


@needs_timm
def test_image_config_from_the_checkpoint(timm_dir, tmp_path):
    model, path = timm_dir
    config = VisionTower.from_pretrained(path).image_config()
    assert config.size == SIZE and config.resample == "bicubic"
    assert config.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))  # timm's EVA-g pretrained_cfg
    lavis = VisionTower.from_pretrained(write_lavis(tmp_path, model, heads=4)).image_config()
    assert (lavis.mean, lavis.std, lavis.resample) == (config.mean, config.std, "bicubic")  # BLIP-2's processor
    with pytest.raises(ValueError, match="takes 56x56"):
        VisionTower.from_pretrained(path).image_config(64)


@needs_timm
def test_eva_options_it_does_not_have(timm_dir):
    _, path = timm_dir
    with pytest.raises(ValueError, match="without a final norm"):
        VisionTower.from_pretrained(path, post_layernorm=True)
    with pytest.raises(ValueError, match="merger"):
        VisionTower.from_pretrained(path, merged=True)
    with pytest.raises(ValueError, match=r"select_layer must be an int in \[-4, 3\]"):
        VisionTower.from_pretrained(path, select_layer=4)
    with pytest.raises(ValueError, match="not a multiple of the EVA patch size 14"):
        VisionTower.from_pretrained(path, image_size=60)


def test_image_size_is_refused_for_hf_towers():
    with pytest.raises(ValueError, match="only EVA towers take another input size"):
        VisionTower.from_pretrained(Path("/nonexistent-clip"), image_size=224)


def corrupt(tmp_path, model, change) -> Path:
    """A LAVIS file whose state dict `change` edited in place."""
    state = lavis_state(model)
    change(state)
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.save(state, tmp_path / LAVIS_FILE)
    (tmp_path / "config.json").write_text(json.dumps({"model_args": {"num_heads": 4}}))
    return tmp_path / LAVIS_FILE


@needs_timm
def test_bad_lavis_files_name_the_file_and_keys(timm_dir, tmp_path):
    model, _ = timm_dir

    def drop(state):
        for key in [k for k in state if k.startswith("blocks.1.attn.")]:
            del state[key]
    file = corrupt(tmp_path / "missing", model, drop)
    with pytest.raises(ValueError, match=r"eva_vit_g\.pth.*missing 5 weight\(s\): blocks\.1\.attn\.proj\.bias"):
        VisionTower.from_pretrained(file)

    many = corrupt(tmp_path / "unexpected", model,
                   lambda s: s.update({f"blocks.0.attn.extra{i}": torch.zeros(1) for i in range(10)}))
    with pytest.raises(ValueError, match=r"10 unexpected weight\(s\): blocks\.0\.attn\.extra0, .*\(10 in all\)"):
        VisionTower.from_pretrained(many)

    shape = corrupt(tmp_path / "shape", model, lambda s: s.update({"blocks.0.mlp.fc1.bias": torch.zeros(7)}))
    with pytest.raises(ValueError, match=r"shape.*blocks\.0\.mlp\.fc1\.bias \(7,\) \(expected \(128,\)\)"):
        VisionTower.from_pretrained(shape)

    gap = corrupt(tmp_path / "gap", model,
                  lambda s: [s.pop(k) for k in [k for k in s if k.startswith("blocks.1.")]])
    with pytest.raises(ValueError, match=r"gap/eva_vit_g\.pth: blocks \[1\] are missing"):
        VisionTower.from_pretrained(gap)

    torch.save({"model": lavis_state(model), "epoch": 3}, tmp_path / "nested.pth")
    with pytest.raises(ValueError, match=r"nested\.pth: expected a plain state dict"):
        VisionTower.from_pretrained(tmp_path / "nested.pth")

    torch.save({"cls_token": torch.zeros(1, 1, 8)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth: not an EVA ViT state dict; it lacks patch_embed\.proj\.weight"):
        VisionTower.from_pretrained(tmp_path / "other.pth")

    odd = write_lavis(tmp_path / "odd", model)  # width 64, no config.json: no head count to infer
    with pytest.raises(ValueError, match=r"odd/eva_vit_g\.pth: width 64 is not a multiple of ViT-g's head width 88"):
        VisionTower.from_pretrained(odd)


@needs_timm
def test_bad_timm_directories_name_the_file(timm_dir, tmp_path):
    model, path = timm_dir
    config = json.loads((path / "config.json").read_text())

    def timm_copy(name: str, config: dict, weights: bool = True):
        """A timm directory `name` with this config.json and (unless not `weights`) the fixture's weights."""
        directory = tmp_path / name
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(config))
        if weights:
            (directory / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
        return directory

    unknown = timm_copy("unknown", dict(config, architecture="eva_nonexistent_patch14"))
    with pytest.raises(ValueError, match=r"unknown/model\.safetensors: timm cannot build architecture "
                                         r"'eva_nonexistent_patch14'"):
        VisionTower.from_pretrained(unknown)

    newer = timm_copy("newer", dict(config, model_args=dict(config["model_args"], warp_factor=9)))
    with pytest.raises(ValueError, match=r"newer/model\.safetensors: timm cannot build .*warp_factor"):
        VisionTower.from_pretrained(newer)

    deeper = timm_copy("deeper", dict(config, model_args=dict(config["model_args"], depth=5)))
    with pytest.raises(ValueError, match=r"deeper/config\.json: model_args depth=5, but .* holds 3 blocks"):
        VisionTower.from_pretrained(deeper)

    empty = timm_copy("empty", config, weights=False)
    with pytest.raises(FileNotFoundError, match=r"empty/model\.safetensors not found"):
        VisionTower.from_pretrained(empty)


def test_missing_timm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match=r"mrgfast\[eva\]"):
        _timm()


def test_only_the_eva_module_imports_timm():
    importers = []
    for file in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "timm" or n.startswith("timm.") for n in names):
                importers.append(file.relative_to(ROOT).as_posix())
    assert sorted(set(importers)) == ["models/eva.py"]


@needs_timm
def test_meta_build_fills_every_tensor(timm_dir, monkeypatch):
    """The tower is built on the meta device: every value must come from the checkpoint or timm's buffer init,
    none from fresh storage (made NaN here, as uninitialised memory may hold anything)."""
    model, path = timm_dir
    to_empty = torch.nn.Module.to_empty

    def dirty_to_empty(module, *, device, recurse=True):
        module = to_empty(module, device=device, recurse=recurse)
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                if tensor.is_floating_point():
                    tensor.fill_(float("nan"))
        return module

    monkeypatch.setattr(torch.nn.Module, "to_empty", dirty_to_empty)
    tower = VisionTower.from_pretrained(path, select_layer=-1)
    tensors = dict(tower.encoder.model.named_parameters()) | dict(tower.encoder.model.named_buffers())
    assert not [name for name, t in tensors.items() if t.is_meta or (t.is_floating_point() and t.isnan().any())]
    images = torch.randn(2, 3, SIZE, SIZE)
    torch.testing.assert_close(tower(images).features, block_output(model, images, 3)[:, 1:], atol=1e-5, rtol=0)


@needs_timm
def test_meta_build_refuses_buffers_timm_cannot_fill(tmp_path):
    """A module with a non-persistent buffer and no init_non_persistent_buffers cannot be materialised: error."""
    from mrgfast.models.eva import materialize

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.empty(3, device="meta"), persistent=False)

    with pytest.raises(ValueError, match=r"eva_vit_g\.pth.*Odd"):
        materialize(Odd(), {}, torch.device("cpu"), tmp_path / "eva_vit_g.pth")
