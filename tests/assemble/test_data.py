"""Building a run's samples from its config: data.clean reaches the readers that clean report text."""

import pytest

from mrgfast.data.synthetic import generate_demo, read_manifest
from mrgfast.assemble import read_samples
from mrgfast.config import ConfigError, parse_cli


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """A tiny synthetic demo (6 studies, no CT)."""
    root = tmp_path_factory.mktemp("demo")
    generate_demo(root, seed=1, n=6, size=32, n_volumes=0)
    return root


def preference_config(root, *extra):
    """A DPO config reading the demo's train pairs as a user's preference JSONL."""
    return parse_cli(["mode=dpo", "data.dataset=preference", f"data.path={root / 'preference' / 'train.jsonl'}",
                      f"data.image_dir={root / 'iu_xray' / 'images'}", *extra])


def test_data_clean_reaches_the_preference_reader(demo_root):
    raw = read_samples(preference_config(demo_root), None)
    cleaned = read_samples(preference_config(demo_root, "data.clean=iu_xray"), None)
    report_config = parse_cli(["data.dataset=iu_xray", f"data.path={demo_root / 'iu_xray' / 'annotation.json'}",
                               f"data.image_dir={demo_root / 'iu_xray' / 'images'}"])
    reports = {s.id: s.answer for s in read_samples(report_config, None)}
    assert [s.answer for s in raw] != [s.answer for s in cleaned]
    # The text the SFT stage trained on, except the train reports written with the habit (their pairs' chosen
    # report is the faithful one).
    habit = read_manifest(demo_root)["iu_xray"]["habit_reports"]
    assert habit >= 1 and sum(s.answer != reports[s.id] for s in cleaned) == habit


def test_data_clean_on_synthetic_vqa_is_an_error(demo_root):
    with pytest.raises(ConfigError, match="data.clean is for report text; the synthetic VQA answers"):
        parse_cli(["data.task=vqa", "data.clean=iu_xray", f"data.path={demo_root}"])
