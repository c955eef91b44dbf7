"""Tokenizers: the demo's own BPE tokenizer (round trip, determinism, transformers loads it) and load_tokenizer."""

import json

import pytest

from mrgfast.data.synthetic import demo_samples
from mrgfast.data.tokenizer import DEMO_MARKERS, DEMO_SPECIAL_TOKENS, build_demo_tokenizer, load_tokenizer

import transformers


def demo_texts(root) -> list:
    """Every report, question and answer of the demo's train split, in file order."""
    texts = []
    for part in ("report", "vqa", "preference"):
        for sample in demo_samples(root, part, "train"):
            texts += [sample.prompt, sample.answer] + ([sample.rejected] if sample.rejected else [])
    return texts


@pytest.fixture(scope="module")
def demo_tokenizer(demo_dir, tmp_path_factory):
    """The demo tokenizer trained on the session's demo dataset, and its directory."""
    out = tmp_path_factory.mktemp("tokenizer")
    return build_demo_tokenizer(demo_texts(demo_dir), out), out


def test_round_trips_reports_and_has_the_template_tokens(demo_tokenizer, demo_dir):
    tok, _ = demo_tokenizer
    for sample in demo_samples(demo_dir, "report", "test"):  # texts it was not trained on
        ids = tok.encode(sample.answer)
        assert tok.decode(ids) == sample.answer
        assert len(ids) < len(sample.answer) / 2  # merges learned: far fewer tokens than bytes
    for token in DEMO_SPECIAL_TOKENS + DEMO_MARKERS:
        assert tok.encode(token) == [tok.token_to_id(token)], token
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == tuple(
        tok.token_to_id(t) for t in ("<s>", "</s>", "<pad>"))
    assert tok.encode("the heart") == tok.encode("the heart")  # no bos/eos added on encode
    assert tok.decode(tok.encode("<s>no effusion</s>")) == "no effusion"
    assert tok.decode(tok.encode("<s>no effusion</s>"), skip_special_tokens=False) == "<s>no effusion</s>"


def test_is_deterministic(demo_tokenizer, demo_dir, tmp_path):
    _, first = demo_tokenizer
    build_demo_tokenizer(demo_texts(demo_dir), tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (first / name).read_bytes(), name


def test_transformers_loads_it_as_a_real_tokenizer(demo_tokenizer):
    tok, path = demo_tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(str(path))
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>is the heart enlarged?<|im_end|>\n"
    assert theirs.encode(text, add_special_tokens=False) == tok.encode(text)
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert len(theirs) == tok.vocab_size


def test_slow_only_directory_goes_through_transformers(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "heart", "is", "enlarged", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "pad_token": "[PAD]", "unk_token": "[UNK]", "sep_token": "[SEP]",
         "cls_token": "[CLS]", "do_lower_case": True}))
    tok = load_tokenizer(tmp_path)
    assert not tok.fast
    assert tok.encode("The heart is enlarged.") == [4, 5, 6, 7, 8]
    assert tok.decode([4, 5, 6, 7, 8]) == "the heart is enlarged."
    assert tok.pad_token_id == 0 and tok.bos_token_id is None
    assert tok.token_to_id("heart") == 5 and tok.token_to_id("lung") is None


def test_special_tokens_as_added_token_dicts_and_pad_falls_back_to_eos(demo_tokenizer, tmp_path):
    _, path = demo_tokenizer
    (tmp_path / "tokenizer.json").write_bytes((path / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>", "special": True}, "eos_token": {"content": "<|im_end|>"}}))
    tok = load_tokenizer(tmp_path)
    assert tok.bos_token_id == tok.token_to_id("<s>")
    assert tok.eos_token_id == tok.token_to_id("<|im_end|>") == tok.pad_token_id
    with pytest.raises(ValueError, match=r"has no token '<nope>' \(needed for a test\)"):
        tok.require_id("<nope>", "a test")


def test_bad_directories_raise(tmp_path):
    with pytest.raises(ValueError, match="tokenizer directory not found"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="no tokenizer files found; expected tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json: cannot be read as a tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="tokenizer_config.json: expected a JSON object"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="texts is empty"):
        build_demo_tokenizer([], tmp_path / "out")
