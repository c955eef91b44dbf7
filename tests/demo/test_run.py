"""mrgfast.demo.run: the demo's demo.<key>=value options. (The whole demo run: tests/integration/test_demo.py.)"""

import pytest

from mrgfast.demo.run import parse_options


def test_options_parse_and_reject_unknown_keys():
    """demo.<key>=value arguments set DemoOptions; unknown keys and bad values raise naming them."""
    options = parse_options(["demo.fast=true", "demo.sft_steps=7", "demo.eval_limit=none", "demo.output_dir=x",
                             "demo.num_beams=4"])
    assert options.fast and options.sft_steps == 7 and options.eval_limit is None and options.output_dir == "x"
    assert options.num_beams == 4
    resolved = options.resolved()
    assert resolved.sft_steps == 3 and resolved.num_beams == 2 and not resolved.meteor
    with pytest.raises(ValueError, match="demo.nope=1"):
        parse_options(["demo.nope=1"])
    with pytest.raises(ValueError, match="sft_steps"):
        parse_options(["demo.sft_steps=many"])
    with pytest.raises(ValueError, match="true or false"):
        parse_options(["demo.fast=maybe"])
    with pytest.raises(ValueError, match="num_beams must be a positive integer"):
        parse_options(["demo.num_beams=0"])
