"""Prompt templates: ids as each recipe's own code builds them, answer-only label masks, placeholder spans."""

import pytest

from mrgfast.data import Sample
from mrgfast.data.prompts import PromptBuilder, PromptTemplate, Span
from mrgfast.data.tokenizer import Tokenizer, build_demo_tokenizer
from tests.data.test_tokenizer import demo_texts


@pytest.fixture(scope="module")
def tok(demo_dir, tmp_path_factory):
    """The demo tokenizer."""
    return build_demo_tokenizer(demo_texts(demo_dir), tmp_path_factory.mktemp("tokenizer"))


VQA = Sample(id="q1", task="vqa", prompt="is the heart enlarged?", answer="yes", image_paths=("a.png",))
PAIR = Sample(id="p1", task="report", prompt="describe the image.", answer="the heart is enlarged.",
              rejected="the heart is normal.", image_paths=("a.png",))


def test_pefomed_matches_minigpt_v2_segmentation(tok):
    out = PromptBuilder(tok, "pefomed", image_tokens=5)(VQA)
    image = tok.token_to_id("<ImageHere>")
    # MiniGPT-v2 encodes the text around <ImageHere> piece by piece (bos on the first) and the answer apart.
    prompt = ([tok.bos_token_id] + tok.encode("[INST] <Img>") + [image] * 5
              + tok.encode("</Img> [vqa] is the heart enlarged? [/INST]"))
    answer = tok.encode("yes") + [tok.eos_token_id]
    assert out.input_ids == prompt + answer
    assert out.label_mask == [False] * len(prompt) + [True] * len(answer)
    assert out.prompt_length == len(prompt) and out.sample_id == "q1"
    assert out.spans == (Span("image", 1 + len(tok.encode("[INST] <Img>")), 5),)
    assert tok.decode(out.input_ids, skip_special_tokens=False) == (
        "<s>[INST] <Img>" + "<ImageHere>" * 5 + "</Img> [vqa] is the heart enlarged? [/INST]yes</s>")


def test_qwen2_vl_chat_format_equals_tokenizing_the_rendered_chat(tok):
    out = PromptBuilder(tok, "qwen2_vl", image_tokens=(1, 2, 3))(VQA)
    rendered = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                + "<|image_pad|>" * 6 + "<|vision_end|>is the heart enlarged?<|im_end|>\n<|im_start|>assistant\n")
    assert out.input_ids == tok.encode(rendered + "yes<|im_end|>")  # the processor's expansion, then one encode
    answer = tok.encode("yes<|im_end|>")
    assert out.label_mask == [False] * (len(out) - len(answer)) + [True] * len(answer)
    (span,) = out.spans
    assert (span.kind, span.length, span.grid) == ("image", 6, (1, 2, 3))
    assert out.input_ids[span.start:span.start + 6] == [tok.token_to_id("<|image_pad|>")] * 6
    assert out.input_ids[span.start - 1] == tok.token_to_id("<|vision_start|>")
    custom = PromptBuilder(tok, "qwen2_vl", image_tokens=(1, 1, 2), fields={"system": "Be brief."})(VQA)
    assert tok.decode(custom.input_ids, skip_special_tokens=False).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_mrg_llm_prompt_tokens_follow_the_image_and_rad3d_prefix_follows_bos(tok):
    out = PromptBuilder(tok, "mrg_llm", image_tokens=4, prompt_tokens=3)(VQA)
    image, prompt = out.spans
    assert (image.kind, image.length, prompt.kind, prompt.length) == ("image", 4, "prompt", 3)
    assert prompt.start == image.start + 4 + 1 and out.input_ids[image.start + 4] == tok.token_to_id("</Img>")
    assert out.input_ids[prompt.start:prompt.start + 3] == [tok.token_to_id("<PromptHere>")] * 3
    report = Sample(id="ct1", task="report", prompt="findings:", answer="no nodule.", image_paths=("v.npz",),
                    modality="volume")
    out = PromptBuilder(tok, "rad3d", prefix_tokens=10)(report)
    assert out.spans == (Span("prefix", 1, 10),)
    assert out.input_ids[:11] == [tok.bos_token_id] + [tok.token_to_id("<PrefixHere>")] * 10
    assert out.input_ids[11:] == tok.encode("findings:") + tok.encode(" no nodule.") + [tok.eos_token_id]


def test_several_images_and_dataset_items(tok):
    builder = PromptBuilder(tok, "pefomed", image_tokens=[3, 2])
    item = {"id": "s9", "task": "report", "prompt": "describe the image.", "answer": "no effusion.", "index": 0}
    out = builder(item)
    first, second = out.spans
    assert (first.index, first.length, second.index, second.length) == (0, 3, 1, 2)
    assert out.input_ids[first.start + 3:second.start] == tok.encode("</Img><Img>")
    qwen = PromptBuilder(tok, "qwen2_vl", image_tokens=[(1, 2, 2), (1, 1, 3)])(item)
    assert [s.grid for s in qwen.spans] == [(1, 2, 2), (1, 1, 3)]


def test_preference_pair_shares_the_prompt(tok):
    builder = PromptBuilder(tok, "qwen2_vl", image_tokens=(1, 2, 2))
    pair = builder.pair(PAIR)
    chosen = builder(PAIR)
    assert pair.prompt_ids == chosen.input_ids[:chosen.prompt_length]
    assert pair.full("chosen").input_ids == chosen.input_ids
    assert pair.full("chosen").label_mask == chosen.label_mask
    assert pair.rejected_ids == tok.encode("the heart is normal.<|im_end|>")
    assert pair.spans == chosen.spans
    with pytest.raises(ValueError, match="'q1' is not a preference pair"):
        builder.pair(VQA)


def test_bad_arguments_raise(tok):
    with pytest.raises(ValueError, match="unknown prompt template 'llava'"):
        PromptBuilder(tok, "llava", image_tokens=4)
    with pytest.raises(ValueError, match="'pefomed' has an image placeholder: image_tokens must be given"):
        PromptBuilder(tok, "pefomed")
    with pytest.raises(ValueError, match="'rad3d' has no image placeholder: image_tokens must be left out"):
        PromptBuilder(tok, "rad3d", image_tokens=4, prefix_tokens=10)
    with pytest.raises(ValueError, match="'mrg_llm' has a prompt placeholder: prompt_tokens must be given"):
        PromptBuilder(tok, "mrg_llm", image_tokens=4)
    with pytest.raises(ValueError, match=r"uses M-RoPE: give each image's token grid \(t, h, w\)"):
        PromptBuilder(tok, "qwen2_vl", image_tokens=4)
    with pytest.raises(ValueError, match="each image needs at least one token"):
        PromptBuilder(tok, "pefomed", image_tokens=0)
    with pytest.raises(ValueError, match="image_block must contain {slot} exactly once"):
        PromptTemplate("bad", prompt="{images}", answer="{answer}", image_block="<img>")
    odd = PromptTemplate("odd", prompt="{bos}{images} {question}", answer="{answer}{eos}")
    with pytest.raises(ValueError, match=r"unknown field \{question\}"):
        PromptBuilder(tok, odd, image_tokens=2)(VQA)
    no_bos = Tokenizer(tok.backend, {"eos_token": "</s>"}, "no-bos")
    with pytest.raises(ValueError, match="tokenizer no-bos: has no bos token, which template 'pefomed' places"):
        PromptBuilder(no_bos, "pefomed", image_tokens=2)(VQA)
