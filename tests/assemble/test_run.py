"""Building a run from its config (mrgfast.assemble.build_all): bad settings are refused naming them."""

import pytest
import torch

from mrgfast.assemble import build_all
from tests.tiny_run import cache  # noqa: F401 (a fixture)
from tests.tiny_run import tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def test_build_rejects_bad_settings_naming_them(cache, tmp_path):
    from mrgfast.config import ConfigError
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match=r"data.max_length: sample 'synth\d+' .* has \d+ tokens, more than "
                                          r"max_length=20"):
        build_all(tiny(cache, tmp_path, "data.max_length=20"), cpu)
    with pytest.raises(ConfigError, match="dpo.reference: 'disabled_adapters' needs lora.enabled=true"):
        build_all(tiny(cache, tmp_path, "mode=dpo", "lora.enabled=false"), cpu)
    with pytest.raises(ConfigError, match="data.path: .* holds no manifest.json"):
        build_all(tiny(cache, tmp_path, f"data.path={tmp_path}"), cpu)
