"""AffinePromptGenerator: identity at init, gradients to every part, book mixing, every backend, bad input."""

import pytest
import torch

from mrgfast.layers.affine_prompt import AffinePromptGenerator
from mrgfast.ops.affine_prompt import reference_affine_prompt
from tests.ops.op_cases import BACKENDS, GPU_BACKENDS, assert_close, use_backend

VISUAL, LLM, PROMPTS, BATCH, TOKENS = 12, 37, 5, 3, 7


def make_generator(book_size=1, per_token=False, perturbed=False, **kwargs):
    """A generator with fixed weights; `perturbed` gives its zero-initialised heads random values (a trained state)."""
    torch.manual_seed(0)
    generator = AffinePromptGenerator(VISUAL, LLM, PROMPTS, book_size=book_size, per_token=per_token,
                                      hidden_dim=16, **kwargs)
    if perturbed:
        with torch.no_grad():
            for head in (generator.film, generator.mixer):
                if head is not None:
                    head.weight.normal_(0.0, 0.3)
                    head.bias.normal_(0.0, 0.3)
    return generator


def visual_features(requires_grad=False):
    """A [B, N, visual_dim] batch of visual tokens."""
    features = torch.randn(BATCH, TOKENS, VISUAL, generator=torch.Generator().manual_seed(1))
    return features.requires_grad_(requires_grad)


def composed(generator, features):
    """The generator's output built by hand from its parts and the eager reference op."""
    gamma, beta, weights = generator.modulation(features)
    return reference_affine_prompt(generator.prompts, gamma, beta, weights)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("book_size", [1, 3])
@pytest.mark.parametrize("per_token", [False, True], ids=["per_image", "per_token"])
def test_initial_output_is_the_prompts(monkeypatch, backend, book_size, per_token):
    use_backend(monkeypatch, backend)
    generator = make_generator(book_size, per_token)
    out = generator(visual_features())
    expected = generator.prompts if book_size == 1 else generator.prompts.mean(0)  # uniform mix of the bank
    assert out.shape == (BATCH, PROMPTS, LLM)
    assert torch.allclose(out, expected.expand_as(out), atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("book_size", [1, 3])
@pytest.mark.parametrize("per_token", [False, True], ids=["per_image", "per_token"])
def test_gradients_reach_every_part(monkeypatch, backend, book_size, per_token):
    use_backend(monkeypatch, backend)
    generator = make_generator(book_size, per_token, perturbed=True)
    features = visual_features(requires_grad=True)
    grad = torch.randn(BATCH, PROMPTS, LLM, generator=torch.Generator().manual_seed(2))
    leaves = [features, *generator.parameters()]
    out = generator(features)
    got = torch.autograd.grad(out, leaves, grad)
    expected = composed(generator, features)
    want = torch.autograd.grad(expected, leaves, grad)
    assert_close(out, expected, torch.float32, "out")
    names = ["features"] + [name for name, _ in generator.named_parameters()]
    for name, g, w in zip(names, got, want):
        assert g.abs().sum() > 0, f"no gradient reached {name}"
        assert_close(g, w, torch.float32, f"d{name}")


def test_heads_get_gradients_at_init():
    generator = make_generator(book_size=3)
    generator(visual_features()).square().sum().backward()
    for head in (generator.film, generator.mixer):
        assert head.weight.grad.abs().sum() > 0
    assert generator.prompts.grad.abs().sum() > 0


def test_book_mixes_per_image():
    generator = make_generator(book_size=3, perturbed=True)
    features = visual_features()
    _, _, weights = generator.modulation(features)
    assert torch.allclose(weights.sum(-1), torch.ones(BATCH))
    assert not torch.allclose(weights[0], weights[1])  # image-dependent mixing
    assert_close(generator(features), composed(generator, features), torch.float32, "out")


@pytest.mark.parametrize("backend", BACKENDS)
def test_writes_into_the_embedding_buffer(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    generator = make_generator(book_size=2, perturbed=True)
    features = visual_features()
    text = torch.randn(BATCH, 10, LLM, requires_grad=True)
    buffer = text * 1.0  # an embedding sequence with room for the prompts
    offsets = torch.tensor([1, 0, 5])
    result = generator(features, out=buffer, offsets=offsets)
    assert result is buffer
    expected = composed(generator, features)
    for b, start in enumerate(offsets.tolist()):
        assert_close(result[b, start:start + PROMPTS], expected[b], torch.float32, "prompt rows")
    result.sum().backward()
    assert generator.prompts.grad.abs().sum() > 0 and text.grad[0, 0].eq(1).all() and not text.grad[0, 1].any()


@pytest.mark.parametrize("pool", ["mean", "max", "first"])
def test_pooling_and_pooled_input(pool):
    generator = make_generator(perturbed=True, pool=pool)
    features = visual_features()
    pooled = {"mean": features.mean(1), "max": features.amax(1), "first": features[:, 0]}[pool]
    assert torch.allclose(generator(features), generator(pooled), atol=1e-6)


def test_bf16_buffer_with_fp32_generator():
    generator = make_generator(book_size=2, perturbed=True)
    buffer = torch.zeros(BATCH, 8, LLM, dtype=torch.bfloat16)
    result = generator(visual_features(), out=buffer, offsets=2)
    assert result.dtype == torch.bfloat16
    assert_close(result[:, 2:7], composed(generator, visual_features()), torch.bfloat16, "prompt rows")


@pytest.mark.parametrize("kwargs,match", [
    (dict(visual_dim=0), "visual_dim"), (dict(llm_dim=2.5), "llm_dim"), (dict(n_prompts=-1), "n_prompts"),
    (dict(book_size=0), "book_size"), (dict(hidden_dim=0), "hidden_dim"), (dict(pool="cls"), "pool"),
])
def test_bad_constructor_arguments(kwargs, match):
    args = dict(visual_dim=VISUAL, llm_dim=LLM, n_prompts=PROMPTS)
    with pytest.raises(ValueError, match=match):
        AffinePromptGenerator(**{**args, **kwargs})


@pytest.mark.parametrize("shape", [(BATCH, TOKENS, VISUAL + 1), (BATCH, VISUAL + 1), (VISUAL,), (BATCH, 0, VISUAL)])
def test_bad_visual_features(shape):
    with pytest.raises(ValueError, match="visual_features"):
        make_generator()(torch.zeros(shape))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_generator_on_gpu_matches_reference_backend(monkeypatch, backend):
    torch.manual_seed(0)
    generator = AffinePromptGenerator(64, 256, 8, book_size=4, hidden_dim=32).cuda()
    with torch.no_grad():
        generator.film.weight.normal_(0.0, 0.1)
        generator.mixer.weight.normal_(0.0, 0.1)
    features = torch.randn(3, 10, 64, device="cuda", requires_grad=True)
    results = {}
    for name in ("reference", backend):
        monkeypatch.setenv("MRGFAST_BACKEND", name)
        out = generator(features)
        results[name] = [out, *torch.autograd.grad(out.square().sum(), [features, *generator.parameters()])]
    for got, want in zip(results[backend], results["reference"]):
        assert_close(got, want, torch.float32, "generator")
