"""Config -> decoder (mrgfast.assemble.model.build_decoder): the settings that reach the Decoder."""

import pytest

from mrgfast.assemble.model import build_decoder
from mrgfast.config import parse_cli


@pytest.mark.parametrize("mode", ["off", "triton", "compile"])
def test_fused_elementwise_reaches_the_decoder(mode):
    config = parse_cli(["model.hidden_size=16", "model.intermediate_size=24", f"model.fused_elementwise={mode}"])
    decoder = build_decoder(config, vocab_size=40)
    assert decoder.fused_elementwise == mode
    assert {layer.mlp.elementwise.mode for layer in decoder.model.layers} == {mode}


def test_fused_elementwise_is_off_by_default():
    assert build_decoder(parse_cli(["model.hidden_size=16"]), vocab_size=40).fused_elementwise == "off"
