"""Shared fixtures (a small decoder-shaped model, tiny HF Llama / Qwen2 built offline); `gpu` tests skip without CUDA."""

import copy
import os

import pytest
import torch
from torch import nn

# Without a GPU the Triton kernels can only run in the interpreter, which is chosen when a kernel is
# defined: set it before any test imports mrgfast's kernels, so `pytest` alone also tests them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Kernel tests run each Triton kernel with one fixed config: autotuning made the GPU tests take minutes. The tuner's
# own tests turn it back on.
os.environ.setdefault("MRGFAST_TRITON_AUTOTUNE", "off")

VOCAB = 40
HIDDEN = 16


@pytest.hookimpl(trylast=True)  # after any conftest that adds the marker
def pytest_collection_modifyitems(config, items):
    """Skip the tests marked `gpu`, with the reason, where no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


class ToyAttention(nn.Module):
    """Attention-shaped block with HF projection names (q/k/v with bias, o without)."""

    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HIDDEN)
        self.k_proj = nn.Linear(HIDDEN, HIDDEN)
        self.v_proj = nn.Linear(HIDDEN, HIDDEN)
        self.o_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)

    def forward(self, h):
        return self.o_proj(self.q_proj(h) * torch.sigmoid(self.k_proj(h)) + self.v_proj(h))


class ToyMLP(nn.Module):
    """Two-layer MLP with HF names."""

    def __init__(self):
        super().__init__()
        self.up_proj = nn.Linear(HIDDEN, 2 * HIDDEN)
        self.down_proj = nn.Linear(2 * HIDDEN, HIDDEN)

    def forward(self, h):
        return self.down_proj(torch.relu(self.up_proj(h)))


class ToyLayer(nn.Module):
    """One residual layer: norm, attention-shaped block, MLP."""

    def __init__(self):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(HIDDEN)
        self.self_attn = ToyAttention()
        self.mlp = ToyMLP()

    def forward(self, h):
        h = h + self.self_attn(self.input_layernorm(h))
        return h + self.mlp(h)


class ToyModel(nn.Module):
    """A two-layer decoder-shaped model whose module paths look like an HF causal LM's."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList([ToyLayer(), ToyLayer()])
        self.norm = nn.LayerNorm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, ids):
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(self.norm(h))


@pytest.fixture
def one_thread():
    """One intra-op thread for tiny end-to-end runs: on 2 shared cores every small op otherwise waits for its
    sibling thread (runs were ~5-20x slower), and one thread keeps reductions in a fixed order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def toy_model():
    """A fresh ToyModel with fixed random weights, in eval mode."""
    torch.manual_seed(0)
    model = ToyModel().eval()
    # LayerNorm starts at weight 1 / bias 0; random values make bias handling visible in the outputs.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
    return model


@pytest.fixture
def toy_ids():
    """A [2, 5] batch of token ids for ToyModel."""
    return torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))


def build_tiny_hf(arch: str):
    """A tiny HF causal LM ('llama', or 'qwen2' with q/k/v bias) built from a config, no download."""
    import transformers
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**sizes))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_hf_models():
    """Base models by architecture, built once; use `fresh(arch)` copies so tests never share mutations."""
    return {}


@pytest.fixture
def fresh_hf(tiny_hf_models):
    """fresh(arch) -> an untouched deep copy of the tiny HF base model of that architecture."""
    def fresh(arch: str):
        if arch not in tiny_hf_models:
            tiny_hf_models[arch] = build_tiny_hf(arch)
        return copy.deepcopy(tiny_hf_models[arch])
    return fresh


@pytest.fixture
def hf_ids():
    """A [2, 9] batch of token ids for the tiny HF models."""
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
