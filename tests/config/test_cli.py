"""mrgfast.config.cli: the one key=value parser of every CLI: a CLI's own fields converted by type (errors naming the
key), other keys passed on as training-config overrides or refused, prefixes, aliases, required fields, and the
options dataclass's own checks."""

import dataclasses
from typing import Optional

import pytest

from mrgfast.config import ConfigError, parse_command_line, split_key_value


@dataclasses.dataclass
class Options:
    """A CLI's options: one required field (with help), the others with defaults, and a check of its own."""

    checkpoint: str = dataclasses.field(metadata={"help": "a run's step-NNNNNN directory"})
    limit: Optional[int] = 10
    meteor: bool = True
    beams: int = 1
    names: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.beams < 1:
            raise ValueError(f"beams must be >= 1, got {self.beams}")
        if self.checkpoint == "forbidden":
            raise ConfigError("checkpoint: this one is refused as it is")


@dataclasses.dataclass
class TwoRequired:
    """Two required fields, only the first with help."""

    source: str = dataclasses.field(metadata={"help": "where to read"})
    target: str


def test_split_key_value():
    assert split_key_value("optim.lr=3e-5") == ("optim.lr", "3e-5")
    assert split_key_value("--seed=7") == ("seed", "7")
    assert split_key_value(" limit =none") == ("limit", "none")
    assert split_key_value("data.path=a=b") == ("data.path", "a=b")  # only the first '=' splits
    assert split_key_value("name=") == ("name", "")
    with pytest.raises(ConfigError, match=r"argument 'optim\.lr': expected key=value"):
        split_key_value("optim.lr")
    for item in ("=3", "--=3", " =3"):
        with pytest.raises(ConfigError, match="empty key before '='"):
            split_key_value(item)


def test_own_fields_are_converted_by_their_type():
    options, overrides = parse_command_line(["checkpoint='/runs/a b'", "limit=none", "meteor=no", "beams=3",
                                             "names=[x, y]"], Options)
    assert options == Options(checkpoint="/runs/a b", limit=None, meteor=False, beams=3, names=["x", "y"])
    assert isinstance(options.beams, int) and overrides == []
    defaults, _ = parse_command_line(["--checkpoint=c"], Options)
    assert defaults == Options(checkpoint="c") and defaults.names == []  # a default_factory field is not required
    assert parse_command_line(["checkpoint=c", "limit=5"], Options)[0].limit == 5


@pytest.mark.parametrize("argv, message", [
    (["checkpoint=c", "beams=many"], r"config key 'beams': expected an integer, got 'many'"),
    (["checkpoint=c", "meteor=flase"], r"config key 'meteor': expected true or false, got 'flase'"),
    (["checkpoint=c", "limit=all"], r"config key 'limit': expected an integer or null, got 'all'"),
])
def test_a_bad_value_names_its_key(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_command_line(argv, Options)


def test_other_keys_are_passed_on_as_overrides_in_order():
    options, overrides = parse_command_line(["optim.lr=1e-3", "checkpoint=c", "--model.dtype=float32", "lr=2"],
                                            Options)
    assert options.checkpoint == "c"
    assert overrides == ["optim.lr=1e-3", "model.dtype=float32", "lr=2"]  # text as given, the leading -- dropped


def test_without_overrides_an_unknown_key_is_refused_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"argument 'beam=2': expected <key>=value with key one of "
                                          r"\['beams', 'checkpoint', 'limit', 'meteor', 'names'\]; "
                                          r"did you mean 'beams'\?"):
        parse_command_line(["checkpoint=c", "beam=2"], Options, overrides=False)
    with pytest.raises(ConfigError, match=r"key one of \[.*\]$"):  # nothing close: no suggestion
        parse_command_line(["checkpoint=c", "optim.lr=1"], Options, overrides=False)


def test_prefix_sets_fields_with_or_without_it_and_names_keys_with_it():
    options, overrides = parse_command_line(["demo.checkpoint=c", "beams=2", "optim.lr=1"], Options, prefix="demo.")
    assert (options.checkpoint, options.beams, overrides) == ("c", 2, ["optim.lr=1"])
    with pytest.raises(ConfigError, match=r"config key 'demo\.beams': expected an integer"):
        parse_command_line(["demo.checkpoint=c", "beams=two"], Options, prefix="demo.")
    with pytest.raises(ConfigError, match=r"expected demo\.<key>=value with key one of .*; "
                                          r"did you mean 'demo\.meteor'\?"):
        parse_command_line(["demo.checkpoint=c", "demo.meteors=1"], Options, prefix="demo.", overrides=False)
    with pytest.raises(ConfigError, match=r"^demo\.checkpoint= required: a run's step-NNNNNN directory$"):
        parse_command_line(["demo.beams=2"], Options, prefix="demo.")


def test_aliases_become_config_overrides():
    aliases = {"data": "data.path", "checkpoint": "model.init_from"}
    options, overrides = parse_command_line(["checkpoint=c", "data=/d", "optim.lr=1"], Options, aliases=aliases)
    assert options.checkpoint == "c"  # an own field wins over an alias of the same name
    assert overrides == ["data.path=/d", "optim.lr=1"]
    # An alias is an override the CLI asked for: it passes even where free overrides are refused.
    assert parse_command_line(["checkpoint=c", "data=/d"], Options, overrides=False, aliases=aliases)[1] == \
        ["data.path=/d"]


def test_a_field_given_twice_is_an_error():
    with pytest.raises(ConfigError, match=r"^checkpoint= given twice \('a' and 'b'\)$"):
        parse_command_line(["checkpoint=a", "checkpoint=b"], Options)
    with pytest.raises(ConfigError, match=r"^beams= given twice \('1' and '2'\)$"):  # with and without the prefix
        parse_command_line(["demo.checkpoint=c", "demo.beams=1", "beams=2"], Options, prefix="demo.")


def test_missing_required_fields_are_listed_with_their_help():
    with pytest.raises(ConfigError, match=r"^checkpoint= required: a run's step-NNNNNN directory$"):
        parse_command_line(["beams=2"], Options)
    with pytest.raises(ConfigError, match=r"^source= required: where to read; target= required$"):
        parse_command_line([], TwoRequired)
    assert parse_command_line(["target=t", "source=s"], TwoRequired)[0] == TwoRequired("s", "t")


def test_the_dataclasss_own_checks_come_back_as_config_errors():
    with pytest.raises(ConfigError, match=r"^beams must be >= 1, got 0$") as info:
        parse_command_line(["checkpoint=c", "beams=0"], Options)
    assert type(info.value) is ConfigError and info.value.__cause__ is None
    with pytest.raises(ConfigError, match=r"^checkpoint: this one is refused as it is$"):
        parse_command_line(["checkpoint=forbidden"], Options)
