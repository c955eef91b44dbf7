"""Run config: YAML + dotted overrides typed by field, clear errors, base inheritance, resolved-config round trip."""

import pytest
import yaml

from mrgfast.config import (ConfigError, TrainConfig, config_to_dict, load_config, parse_cli,
                                     save_resolved)


def write(path, data):
    """Write `data` as YAML to `path`; returns the path."""
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_defaults_match_ecosystem_names():
    cfg = parse_cli([])
    assert cfg == TrainConfig()
    assert (cfg.lora.r, cfg.lora.lora_alpha, cfg.lora.target_modules) == (8, 8.0, ["q_proj", "v_proj"])
    assert (cfg.dpo.beta, cfg.dpo.loss_type, cfg.dpo.label_smoothing) == (0.1, "sigmoid", 0.0)
    lora = cfg.lora.to_lora_config()
    assert (lora.r, lora.lora_alpha, lora.target_modules, lora.bias) == (8, 8.0, ["q_proj", "v_proj"], "none")


def test_overrides_parse_by_field_type():
    cfg = parse_cli(["optim.lr=3e-5", "lora.target_modules=[q_proj,v_proj, k_proj]", "lora.r=64",
                     "lora.use_rslora=true", "optim.max_grad_norm=null", "mode=dpo", "dpo.beta=0.5",
                     "optim.betas=[0.9,0.95]", "--seed=7", "model.name_or_path='/ckpt/llama 2'"])
    assert cfg.optim.lr == 3e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.lora.target_modules == ["q_proj", "v_proj", "k_proj"]
    assert cfg.lora.r == 64 and cfg.lora.use_rslora is True
    assert cfg.optim.max_grad_norm is None
    assert cfg.mode == "dpo" and cfg.dpo.beta == 0.5 and cfg.seed == 7
    assert cfg.optim.betas == [0.9, 0.95]
    assert cfg.model.name_or_path == "/ckpt/llama 2"
    assert parse_cli(["optim.fused=false"]).optim.fused is False
    assert parse_cli(["optim.fused=auto"]).optim.fused == "auto"
    with pytest.raises(ConfigError, match="config key 'optim.fused': expected one of 'auto' or true or false"):
        parse_cli(["optim.fused=maybe"])


def test_yaml_file_then_overrides_win(tmp_path):
    path = write(tmp_path / "run.yaml", {"optim": {"lr": "1e-5", "grad_accum_steps": 4, "fused": True},
                                         "lora": {"r": 16, "lora_dropout": 0.05}})
    cfg = parse_cli([f"config={path}", "optim.lr=2e-5"])
    # PyYAML reads 1e-5 (no dot) as a string; the field type makes it a float.
    assert cfg.optim.lr == 2e-5 and cfg.optim.grad_accum_steps == 4 and cfg.optim.fused is True
    assert cfg.lora.r == 16 and cfg.lora.lora_dropout == 0.05
    assert load_config(path).optim.lr == 1e-5


def test_base_inheritance_merges_sections(tmp_path):
    write(tmp_path / "stage1.yaml", {"output_dir": "runs/s1", "optim": {"lr": 1e-5, "weight_decay": 0.1},
                                     "lora": {"r": 64, "lora_alpha": 16}})
    path = write(tmp_path / "stage2.yaml", {"base": "stage1.yaml", "output_dir": "runs/s2",
                                            "optim": {"lr": 3e-5}, "model": {"init_from": "runs/s1/step-000010"}})
    cfg = load_config(path)
    assert cfg.output_dir == "runs/s2" and cfg.optim.lr == 3e-5
    assert cfg.optim.weight_decay == 0.1 and cfg.lora.r == 64 and cfg.lora.lora_alpha == 16
    assert cfg.model.init_from == "runs/s1/step-000010"


def test_base_loop_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", {"base": "b.yaml"})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")


def test_rpo_is_a_list_of_loss_types_with_weights():
    cfg = parse_cli(["mode=dpo", "dpo.loss_type=[sigmoid, sft]", "dpo.loss_weights=[1, 0.5]"])
    assert (cfg.dpo.loss_type, cfg.dpo.loss_weights) == (["sigmoid", "sft"], [1.0, 0.5])


@pytest.mark.parametrize("argv, message", [
    (["optim.lrr=1e-4"], r"unknown config key 'optim.lrr'; did you mean 'optim.lr'\?.*valid keys here: lr,"),
    (["optimizer.lr=1e-4"], r"unknown config key 'optimizer'; did you mean 'optim'\?"),
    (["optim.lr=fast"], r"config key 'optim.lr': expected a number, got 'fast'"),
    (["mode=ppo"], r"config key 'mode': expected one of 'sft', 'dpo', 'classify', got 'ppo'"),
    (["lora.bias=some"], r"config key 'lora.bias': expected one of 'none', 'all', 'lora_only'"),
    (["lora.use_rslora=maybe"], r"config key 'lora.use_rslora': expected true or false"),
    (["lora.r=2.5"], r"config key 'lora.r': expected an integer"),
    (["lora=3"], r"config key 'lora' is a section"),
    (["optim.lr.x=1"], r"config key 'optim.lr' is a value, not a section"),
    (["optim.lr"], r"expected key=value"),
    (["optim.lr=-1"], r"config section 'optim': lr must be > 0"),
    (["dpo.loss_type=hinge", "dpo.label_smoothing=0.1"], r"config section 'dpo': label_smoothing=0.1"),
    (["schedule.warmup_steps=500", "schedule.max_steps=100"], r"config section 'schedule': warmup_steps"),
    (["dpo.loss_type=[sigmoid,sft]", "dpo.loss_weights=[1.0]"], r"config section 'dpo': loss_weights must give one"),
    (["dpo.loss_type=[sigmoid,kto]"], r"config key 'dpo.loss_type': expected one of 'sigmoid', .* or a list of"),
    (["dpo.loss_type=sft"], r"config section 'dpo': loss_type 'sft' alone is supervised fine-tuning"),
    (["config=a.yaml", "config=b.yaml"], r"config= given twice"),
    (["mode=dpo", "dpo.layout=padded", "cuda_graphs=true"], r"cuda_graphs=true with mode=dpo needs dpo.layout=shared"),
    (["model.vision_cache=memory", "cuda_graphs=true"], r"cuda_graphs=true cannot use model.vision_cache"),
    (["model.vision_cache=disk", "model.train_vision=true"], r"vision_cache needs a frozen vision encoder"),
    (["model.vision_cache=yes"], r"config key 'model.vision_cache': expected one of 'off', 'memory', 'disk'"),
    (["model.fused_elementwise=on"],
     r"config key 'model.fused_elementwise': expected one of 'off', 'triton', 'compile'"),
    (["data.clean=weird"], r"config key 'data.clean': expected one of 'iu_xray', 'mimic_cxr', 'pefomed', 'none'"),
    (["data.dataset=slake", "data.path=q.json", "data.clean=iu_xray"], r"clean is for report text; slake answers"),
])
def test_bad_keys_and_values_name_the_key(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_cli(argv)


def test_bad_yaml_names_the_file_and_key(tmp_path):
    typo = r"x\.yaml: unknown config key 'lora.lora_alph'; did you mean 'lora.lora_alpha'"
    with pytest.raises(ConfigError, match=typo):
        load_config(write(tmp_path / "x.yaml", {"lora": {"lora_alph": 8}}))
    with pytest.raises(ConfigError, match=r"y\.yaml: config key 'optim.grad_accum_steps': expected an integer"):
        load_config(write(tmp_path / "y.yaml", {"optim": {"grad_accum_steps": True}}))
    with pytest.raises(ConfigError, match=r"z\.yaml: config section 'optim': expected a mapping"):
        load_config(write(tmp_path / "z.yaml", {"optim": 3}))
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(write(tmp_path / "bad.yaml", "optim: [unclosed"))
    with pytest.raises(ConfigError, match=r"missing\.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_save_resolved_round_trips(tmp_path):
    cfg = parse_cli(["optim.lr=3e-5", "lora.target_modules=[q_proj]", "optim.max_grad_norm=null",
                     f"output_dir={tmp_path / 'run'}"])
    file = save_resolved(cfg)
    assert file == tmp_path / "run" / "config.yaml"
    assert yaml.safe_load(file.read_text()) == config_to_dict(cfg)
    assert load_config(file) == cfg
    assert [p.name for p in file.parent.iterdir()] == ["config.yaml"]  # no temp file left behind
