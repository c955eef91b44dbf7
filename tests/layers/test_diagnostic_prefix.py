"""DiagnosticPrefix against a hand-written ClipCap mapper; classifier freezing, gradient flow and bad input."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mrgfast.layers.diagnostic_prefix import DiagnosticPrefix

EMBED, LABELS, LLM, PREFIX = 12, 5, 24, 3


def manual_block(block, x):
    """One pre-norm mapper block written out: multi-head softmax attention and a ReLU MLP."""
    batch, tokens, dim = x.shape
    heads = block.attn.num_heads
    normed = F.layer_norm(x, (dim,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
    q, k, v = (normed @ w.T + b for w, b in zip(block.attn.in_proj_weight.chunk(3), block.attn.in_proj_bias.chunk(3)))
    split = lambda t: t.view(batch, tokens, heads, dim // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim // heads), dim=-1)
    attended = (weights @ v).transpose(1, 2).reshape(batch, tokens, dim)
    x = x + attended @ block.attn.out_proj.weight.T + block.attn.out_proj.bias
    normed = F.layer_norm(x, (dim,), block.norm2.weight, block.norm2.bias, block.norm2.eps)
    first, second = block.mlp[0], block.mlp[3]
    return x + torch.relu(normed @ first.weight.T + first.bias) @ second.weight.T + second.bias


def manual_prefix(layer, embedding, logits):
    """The RAD3D-Prefix mapping by hand: [embedding ⊕ logits] -> tokens, append constants, blocks, last n_prefix."""
    features = torch.cat([embedding, logits], dim=-1) @ layer.input_proj.weight.T + layer.input_proj.bias
    tokens = torch.cat([features.view(len(embedding), layer.n_inputs, layer.mapper_dim),
                        layer.constants.expand(len(embedding), -1, -1)], dim=1)
    for block in layer.blocks:
        tokens = manual_block(block, tokens)
    out = tokens[:, layer.n_inputs:]
    if isinstance(layer.output_proj, nn.Linear):
        out = out @ layer.output_proj.weight.T + layer.output_proj.bias
    return out


@pytest.mark.parametrize("mapper_dim,n_inputs", [(None, None), (16, 4)])
def test_prefix_matches_a_hand_written_clipcap_mapper(mapper_dim, n_inputs):
    torch.manual_seed(0)
    layer = DiagnosticPrefix(EMBED, LABELS, LLM, n_prefix=PREFIX, mapper_layers=2, mapper_dim=mapper_dim, n_heads=4,
                             n_inputs=n_inputs).eval()
    embedding, logits = torch.randn(3, EMBED), torch.randn(3, LABELS)
    prefix = layer(embedding, logits)
    assert prefix.shape == (3, PREFIX, LLM)
    torch.testing.assert_close(prefix, manual_prefix(layer, embedding, logits), rtol=1e-5, atol=1e-5)


def test_the_logits_change_the_prefix():
    torch.manual_seed(0)
    layer = DiagnosticPrefix(EMBED, LABELS, LLM, n_prefix=PREFIX, mapper_layers=1, n_heads=4).eval()
    embedding, logits = torch.randn(2, EMBED), torch.randn(2, LABELS)
    flipped = logits.clone()
    flipped[:, 0] = -flipped[:, 0]
    assert not torch.allclose(layer(embedding, logits), layer(embedding, flipped))


def test_frozen_classifier_is_detached_and_the_mapper_trains():
    torch.manual_seed(0)
    classifier = nn.Sequential(nn.Linear(EMBED, LABELS), nn.Dropout(0.5))
    layer = DiagnosticPrefix(EMBED, LABELS, LLM, n_prefix=PREFIX, mapper_layers=1, n_heads=4, classifier=classifier)
    layer.train()
    embedding = torch.randn(2, EMBED, requires_grad=True)
    prefix, logits = layer(embedding, return_logits=True)
    prefix.square().sum().backward()
    assert not logits.requires_grad
    torch.testing.assert_close(logits, classifier[0](embedding).detach())  # eval mode: no dropout in the logits
    assert classifier.training, "the classifier's own mode is restored"
    assert all(p.grad is None and not p.requires_grad for p in classifier.parameters())
    assert layer.constants.grad is not None and layer.input_proj.weight.grad.abs().sum() > 0
    assert embedding.grad is not None


def test_trained_classifier_gets_gradients():
    torch.manual_seed(0)
    classifier = nn.Linear(EMBED, LABELS)
    layer = DiagnosticPrefix(EMBED, LABELS, LLM, n_prefix=PREFIX, mapper_layers=1, n_heads=4, classifier=classifier,
                             train_classifier=True)
    layer(torch.randn(2, EMBED)).sum().backward()
    assert classifier.weight.grad is not None and classifier.weight.grad.abs().sum() > 0


def test_given_logits_are_detached_unless_the_classifier_trains():
    torch.manual_seed(0)
    layer = DiagnosticPrefix(EMBED, LABELS, LLM, n_prefix=PREFIX, mapper_layers=1, n_heads=4)
    logits = torch.randn(2, LABELS, requires_grad=True)
    layer(torch.randn(2, EMBED), logits).sum().backward()
    assert logits.grad is None


def test_classifier_input_feeds_the_classifier():
    torch.manual_seed(0)
    classifier = nn.Linear(7, LABELS)
    layer = DiagnosticPrefix(EMBED, LABELS, LLM, n_prefix=PREFIX, mapper_layers=1, n_heads=4, classifier=classifier)
    volume_features = torch.randn(2, 7)
    _, logits = layer(torch.randn(2, EMBED), classifier_input=volume_features, return_logits=True)
    torch.testing.assert_close(logits, classifier(volume_features).detach())


@pytest.mark.parametrize("embedding,logits,message", [
    (torch.randn(2, EMBED + 1), torch.randn(2, LABELS), "embedding must be"),
    (torch.randn(2, EMBED), torch.randn(2, LABELS + 1), "logits must be"),
    (torch.randn(2, EMBED), torch.randn(3, LABELS), "logits must be"),
    (torch.randn(2, EMBED), None, "pass `logits`"),
])
def test_bad_input_names_the_argument(embedding, logits, message):
    layer = DiagnosticPrefix(EMBED, LABELS, LLM, n_prefix=PREFIX, mapper_layers=1, n_heads=4)
    with pytest.raises(ValueError, match=message):
        layer(embedding, logits)


def test_bad_sizes_are_rejected_at_construction():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        DiagnosticPrefix(EMBED, LABELS, 30, n_heads=4)
    with pytest.raises(ValueError, match="n_prefix must be positive"):
        DiagnosticPrefix(EMBED, LABELS, LLM, n_prefix=0, n_heads=4)
