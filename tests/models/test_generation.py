"""generate against transformers' generate: greedy and beam search, batched with either padding side, Qwen2-VL."""

import pytest
import torch

from mrgfast.models import generate, load_decoder
from tests.models.tiny_hf import random_ids, vl_embeds_and_positions, vl_inputs

PAD = 127
PROMPT_LENGTHS = [3, 7, 5]


def until_eos(tokens, eos: int) -> list:
    """Tokens up to and including the first eos (transformers pads finished rows after it)."""
    tokens = [int(t) for t in tokens]
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


def hf_generate(model, eos: int, input_ids, attention_mask=None, **kwargs) -> list:
    """transformers' new tokens per row, without sampling, cut after eos."""
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, pad_token_id=PAD,
                         eos_token_id=eos, **kwargs)
    return [until_eos(row[input_ids.shape[1]:], eos) for row in out]


def prompts(seed=20) -> list:
    """Token-id lists of different lengths."""
    return [random_ids(n, seed=seed + i).tolist() for i, n in enumerate(PROMPT_LENGTHS)]


def padded(rows: list, side: str):
    """(input_ids, attention_mask) with the rows padded by PAD on `side`."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span], mask[i, span] = torch.tensor(row), 1
    return ids, mask


def eos_seen_in(decoder, prompt: list, step: int = 2) -> int:
    """A token greedy decoding produces at `step`: as eos it makes generation stop early."""
    return generate(decoder, [prompt], max_new_tokens=step + 1)[0][step]


@pytest.mark.parametrize("name", ["llama", "qwen2", "tied", "llama3"])
def test_greedy_matches_transformers(hf_model, name):
    model, path = hf_model(name)
    decoder = load_decoder(path)
    prompt = prompts()[1]
    eos = eos_seen_in(decoder, prompt, step=4)
    ours = generate(decoder, [prompt], max_new_tokens=10, eos_token_id=eos)
    assert ours == hf_generate(model, eos, torch.tensor([prompt]), max_new_tokens=10)
    assert ours[0][-1] == eos and len(ours[0]) <= 5


def test_batched_greedy_with_any_padding_matches_transformers(hf_model):
    model, path = hf_model("qwen2")
    decoder = load_decoder(path)
    rows = prompts()
    eos = eos_seen_in(decoder, rows[0])
    expected = [hf_generate(model, eos, torch.tensor([r]), max_new_tokens=8)[0] for r in rows]
    assert any(len(e) < 8 for e in expected) and any(len(e) == 8 for e in expected), "want finished and open rows"
    assert generate(decoder, rows, max_new_tokens=8, eos_token_id=eos) == expected
    for side in ("left", "right"):
        ids, mask = padded(rows, side)
        assert generate(decoder, ids, mask, max_new_tokens=8, eos_token_id=eos) == expected, side
    ids, mask = padded(rows, "left")  # transformers' own batched generation needs left padding
    assert hf_generate(model, eos, ids, mask, max_new_tokens=8) == expected


@pytest.mark.parametrize("num_beams, length_penalty, early_stopping", [
    (2, 1.0, False), (3, 1.0, False), (3, 0.5, True), (2, 2.0, False), (3, 0.0, False)])
def test_beam_search_matches_transformers(hf_model, num_beams, length_penalty, early_stopping):
    model, path = hf_model("llama")
    decoder = load_decoder(path)
    rows = prompts(seed=30)
    eos = eos_seen_in(decoder, rows[0], step=1)
    settings = dict(max_new_tokens=7, num_beams=num_beams, length_penalty=length_penalty,
                    early_stopping=early_stopping)
    ids, mask = padded(rows, "left")
    expected = hf_generate(model, eos, ids, mask, **settings)
    assert generate(decoder, ids, mask, eos_token_id=eos, **settings) == expected
    assert generate(decoder, rows, eos_token_id=eos, **settings) == expected


def test_beam_search_without_eos_runs_to_max_new_tokens(hf_model):
    model, path = hf_model("qwen2")
    decoder = load_decoder(path)
    prompt = prompts()[2]
    ours = generate(decoder, [prompt], max_new_tokens=6, num_beams=3)
    unused = next(t for t in range(128) if t not in ours[0])  # an eos that is never produced
    assert ours == hf_generate(model, unused, torch.tensor([prompt]), max_new_tokens=6, num_beams=3)
    assert len(ours[0]) == 6


def test_qwen2_vl_generation_with_an_image_matches_transformers(hf_model):
    model, path = hf_model("qwen2_vl")
    decoder = load_decoder(path)
    docs = [vl_inputs(prefix=2, suffix=3, grid=(1, 4, 4), seed=40), vl_inputs(prefix=5, suffix=2, grid=(1, 4, 6),
                                                                                seed=41)]
    embeds, positions = zip(*(vl_embeds_and_positions(model, d) for d in docs))
    eos = 7
    expected = [until_eos(model.generate(**d, max_new_tokens=6, do_sample=False, pad_token_id=PAD,
                                         eos_token_id=eos)[0, d["input_ids"].shape[1]:], eos) for d in docs]
    for prompt_embeds, prompt_positions, want in zip(embeds, positions, expected):
        assert generate(decoder, inputs_embeds=prompt_embeds, position_ids=prompt_positions, max_new_tokens=6,
                        eos_token_id=eos) == [want]
    # Both prompts in one right-padded batch, continuing each from its largest M-RoPE position + 1.
    width = max(e.shape[1] for e in embeds)
    batch_embeds = torch.zeros(2, width, 64)
    batch_positions = torch.zeros(3, 2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, (e, p) in enumerate(zip(embeds, positions)):
        batch_embeds[i, :e.shape[1]], batch_positions[:, i, :e.shape[1]], mask[i, :e.shape[1]] = e[0], p[:, 0], 1
    assert generate(decoder, inputs_embeds=batch_embeds, attention_mask=mask, position_ids=batch_positions,
                    max_new_tokens=6, eos_token_id=eos) == expected
    for beams in (2, 3):
        want = [until_eos(model.generate(**d, max_new_tokens=5, do_sample=False, num_beams=beams, pad_token_id=PAD,
                                         eos_token_id=eos)[0, d["input_ids"].shape[1]:], eos) for d in docs]
        assert generate(decoder, inputs_embeds=batch_embeds, attention_mask=mask, position_ids=batch_positions,
                        max_new_tokens=5, eos_token_id=eos, num_beams=beams) == want


def test_bad_arguments_raise(hf_model):
    _, path = hf_model("llama")
    decoder = load_decoder(path)
    ids = random_ids(1, 4)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int, got 0"):
        generate(decoder, ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="num_beams must be a positive int, got 0"):
        generate(decoder, ids, num_beams=0)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        generate(decoder)
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        generate(decoder, random_ids(2, 4), torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match=r"attention_mask must be \[1, 4\]"):
        generate(decoder, ids, torch.ones(1, 5))
    with pytest.raises(ValueError, match="attention_mask goes with a padded input_ids tensor"):
        generate(decoder, [[1, 2]], torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"position_ids must be \[1, 4\] or \[3, 1, 4\]"):
        generate(decoder, ids, position_ids=torch.arange(4))


def hf_filtered(logits, temperature, top_k, top_p):
    """transformers' own sampling warpers, in generate's order: temperature, top-k, top-p."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.5, 7, 0.6),
                                                     (1.0, 1, 1.0), (1.0, 0, 0.05), (1.0, 200, 0.999)])
def test_filter_logits_matches_transformers_warpers(temperature, top_k, top_p):
    from mrgfast.models.generation import filter_logits
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3))
    logits[1, :6] = 2.5  # ties at the k-th logit: transformers keeps them all
    ours, want = filter_logits(logits, temperature, top_k, top_p), hf_filtered(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(want))
    torch.testing.assert_close(ours[~torch.isinf(ours)], want[~torch.isinf(want)])
    assert (~torch.isinf(ours)).sum(-1).min() >= 1  # the most likely token always survives


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.8, 10, 0.9)])
def test_sampling_matches_transformers_with_the_same_seed(hf_model, temperature, top_k, top_p):
    # Both draw with torch.multinomial from the same global generator on the same probabilities, so the same
    # seed gives the same tokens; a wrong filter, temperature or token position would change them.
    model, path = hf_model("llama")
    decoder = load_decoder(path)
    prompt = prompts()[1]
    torch.manual_seed(11)
    want = model.generate(input_ids=torch.tensor([prompt]), do_sample=True, temperature=temperature, top_k=top_k,
                          top_p=top_p, max_new_tokens=12, pad_token_id=PAD, eos_token_id=None)[0, len(prompt):]
    torch.manual_seed(11)
    ours = generate(decoder, [prompt], max_new_tokens=12, do_sample=True, temperature=temperature, top_k=top_k,
                    top_p=top_p)
    assert ours == [want.tolist()]


def test_sampling_with_top_k_1_is_greedy_and_a_generator_makes_it_reproducible(hf_model):
    _, path = hf_model("qwen2")
    decoder = load_decoder(path)
    rows = prompts()
    assert generate(decoder, rows, max_new_tokens=8, do_sample=True, top_k=1) == generate(decoder, rows,
                                                                                          max_new_tokens=8)
    draws = [generate(decoder, rows, max_new_tokens=8, do_sample=True, temperature=2.0,
                      generator=torch.Generator().manual_seed(seed)) for seed in (5, 5, 6)]
    assert draws[0] == draws[1] and draws[0] != draws[2]


def test_sampled_first_tokens_follow_the_softmax(hf_model):
    _, path = hf_model("llama")
    decoder = load_decoder(path)
    prompt = prompts()[0]
    with torch.no_grad():
        probs = torch.softmax(decoder.compute_logits(decoder(torch.tensor([prompt]))[0, -1]).float() / 0.5, -1)
    n = 4000
    first = generate(decoder, [prompt] * n, max_new_tokens=1, do_sample=True, temperature=0.5,
                     generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(torch.tensor([row[0] for row in first]), minlength=probs.numel()).float()
    # Every token's count within 5 binomial standard deviations of n * p (plus one for p near 0).
    bound = 5 * (n * probs * (1 - probs)).sqrt() + 1
    assert ((counts - n * probs).abs() <= bound).all()


def test_bad_sampling_arguments_raise(hf_model):
    _, path = hf_model("llama")
    decoder = load_decoder(path)
    ids = random_ids(1, 4)
    for kwargs, message in (({"temperature": 0.0}, "temperature must be a number > 0"),
                            ({"top_k": -1}, "top_k must be an int >= 0"),
                            ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
                            ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
                            ({"num_beams": 2}, "do_sample draws one sequence per prompt: num_beams must be 1")):
        with pytest.raises(ValueError, match=message):
            generate(decoder, ids, do_sample=True, **kwargs)
