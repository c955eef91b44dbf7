"""RAD3D-Prefix's diagnostic classifier in the built model (mrgfast.assemble.diagnostic): loaded from
model.classifier_from, its logits fed to DiagnosticPrefix detached; random only when asked; mismatches named."""

import pytest
import torch

from mrgfast.assemble.model import build_adapters, build_vision
from mrgfast.config import ConfigError, load_config
from mrgfast.models.classifier_io import CLASSIFIER_CONFIG, module_digest, save_classifier
from tests.tiny_run import CONFIGS

SMALL = ["model.mapper_layers=1", "model.vision_dim=16", "model.hidden_size=32", "model.intermediate_size=64"]


def rad3d(*extra):
    return load_config(CONFIGS / "rad3d_prefix.yaml", SMALL + list(extra))


def saved_classifier(directory, config, seed=0):
    """A classifier file for `config`'s encoder (random weights: what matters here is what the model does with them)."""
    encoder, dim, _ = build_vision(config)
    torch.manual_seed(seed + 100)
    head = torch.nn.Linear(dim, config.model.n_labels)
    save_classifier(head, directory, [f"label {i}" for i in range(config.model.n_labels)], module_digest(encoder))
    return head


def test_the_prefix_run_needs_a_classifier_or_an_explicit_random_one():
    with pytest.raises(ConfigError, match="model.classifier_from: RAD3D-Prefix needs its trained diagnostic "
                                          "classifier .* model.classifier=random builds a random one, for tests only"):
        rad3d("model.classifier_from=null")
    with pytest.raises(ConfigError, match="recipe 'demo' has none"):
        load_config(CONFIGS / "demo.yaml", ["model.classifier=random"])


def test_random_classifier_says_it_is_for_tests(capsys):
    config = rad3d("model.classifier=random")
    vision, dim, _ = build_vision(config)
    prefix = build_adapters(config, dim, 32, vision)["prefix"]
    err = capsys.readouterr().err
    assert "RANDOM (model.classifier=random; model.classifier_from=runs/rad3d_classifier not loaded): for tests only" \
        in err
    assert not any(p.requires_grad for p in prefix.classifier.parameters())


def test_trained_classifier_is_loaded_and_its_detached_logits_feed_the_prefix(tmp_path, capsys):
    config = rad3d(f"model.classifier_from={tmp_path}")
    head = saved_classifier(tmp_path, config)
    vision, dim, _ = build_vision(config)
    prefix = build_adapters(config, dim, 32, vision)["prefix"]
    assert f"trained, from {tmp_path} (16 -> 18 labels)" in capsys.readouterr().err
    assert torch.equal(prefix.classifier.weight, head.weight) and torch.equal(prefix.classifier.bias, head.bias)
    pooled = torch.randn(3, dim, requires_grad=True)
    out, logits = prefix(pooled, return_logits=True)
    assert torch.allclose(logits, head(pooled), atol=1e-6) and not logits.requires_grad
    out.sum().backward()
    assert all(p.grad is None for p in prefix.classifier.parameters())  # frozen, no graph through it
    assert prefix.input_proj.weight.grad is not None


def test_random_and_trained_runs_start_the_mapper_from_the_same_weights(tmp_path):
    trained = rad3d(f"model.classifier_from={tmp_path}")
    saved_classifier(tmp_path, trained)
    states = []
    for config in (trained, rad3d("model.classifier=random")):
        torch.manual_seed(0)
        vision, dim, _ = build_vision(config)
        states.append({k: v for k, v in build_adapters(config, dim, 32, vision)["prefix"].state_dict().items()
                       if not k.startswith("classifier.")})
    assert states[0].keys() == states[1].keys() and all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_the_encoder_does_not_depend_on_what_was_built_before():
    config = rad3d("model.classifier=random")
    torch.manual_seed(5)
    first = module_digest(build_vision(config)[0])
    torch.randn(1000)
    assert module_digest(build_vision(config)[0]) == first
    assert module_digest(build_vision(rad3d("model.classifier=random", "seed=1"))[0]) != first


@pytest.mark.parametrize("override,field,detail", [
    ("model.vision_dim=8", "input_dim", "field 'input_dim' is 16, but this model's volume encoder gives 8 features"),
    ("model.n_labels=4", "labels", "field 'labels' has 18 names (label 0, label 1, label 2, ...), but "
                                   "model.n_labels=4"),
    ("seed=3", "encoder_sha256", "is not this run's volume encoder"),
])
def test_a_classifier_for_another_model_is_refused_naming_the_file_and_field(tmp_path, override, field, detail):
    saved_classifier(tmp_path, rad3d(f"model.classifier_from={tmp_path}"))
    config = rad3d(f"model.classifier_from={tmp_path}", override)
    vision, dim, _ = build_vision(config)
    with pytest.raises(ConfigError) as caught:
        build_adapters(config, dim, 32, vision)
    message = str(caught.value)
    assert message.startswith(f"model.classifier_from: {tmp_path / CLASSIFIER_CONFIG}: field '{field}'")
    assert detail in message


def test_a_missing_classifier_is_a_config_error_naming_it(tmp_path):
    config = rad3d(f"model.classifier_from={tmp_path / 'nowhere'}")
    vision, dim, _ = build_vision(config)
    with pytest.raises(ConfigError, match=r"model.classifier_from: .*nowhere/classifier.json not found"):
        build_adapters(config, dim, 32, vision)
