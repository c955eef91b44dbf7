"""The recipe configs parse with their papers' settings. (That each trains: tests/integration/test_recipes.py.)"""

from mrgfast.config import load_config
from tests.tiny_run import CONFIGS


def test_configs_carry_the_papers_settings():
    stage1, stage2 = load_config(CONFIGS / "pefomed_stage1.yaml"), load_config(CONFIGS / "pefomed_stage2.yaml")
    for cfg in (stage1, stage2):
        assert cfg.model.recipe == "pefomed" and cfg.model.group_size == 4
        assert (cfg.lora.r, cfg.lora.lora_alpha, cfg.lora.lora_dropout) == (64, 16.0, 0.05)
        assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.lora.bias == "none"
    assert (stage1.data.task, stage2.data.task) == ("caption", "report")
    assert stage2.model.init_from == "runs/pefomed_stage1/step-000020" and stage2.optim.lr == 3e-5
    sft, dpo = load_config(CONFIGS / "ldp_sft.yaml"), load_config(CONFIGS / "ldp_dpo.yaml")
    assert sft.model.recipe == dpo.model.recipe == "ldp" and (sft.mode, dpo.mode) == ("sft", "dpo")
    assert dpo.dpo.reference == "disabled_adapters" and dpo.model.init_from == "runs/ldp_sft/step-000020"
    wise, book = load_config(CONFIGS / "mrgllm_promptwise.yaml"), load_config(CONFIGS / "mrgllm_promptbook.yaml")
    assert (wise.model.book_size, book.model.book_size) == (1, 4) and not wise.lora.enabled and wise.model.train_vision
    rad = load_config(CONFIGS / "rad3d_prefix.yaml")
    assert (rad.model.n_prefix, rad.model.n_labels, rad.optim.lr, rad.lora.enabled) == (10, 18, 2e-5, False)
    assert rad.model.mapper_layers == 8 and rad.model.classifier_from == "runs/rad3d_classifier"
    classify = load_config(CONFIGS / "rad3d_classifier.yaml")
    assert classify.mode == "classify" and classify.model.classifier_from is None
    assert classify.output_dir == rad.model.classifier_from  # stage 2 reads what stage 1 writes
    for key in ("vision_dim", "vision_depth", "vision_heads", "patch_size", "n_labels"):  # the same encoder and head
        assert getattr(classify.model, key) == getattr(rad.model, key)
    assert (classify.data, classify.seed) == (rad.data, rad.seed)
