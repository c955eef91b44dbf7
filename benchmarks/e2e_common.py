"""Shared pieces of the end-to-end benchmarks: synthetic demo data, one Llama-style decoder built twice (mrgfast
Decoder + mrgfast LoRA, and HF LlamaForCausalLM + PEFT with the very same weights), numeric checks."""

import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from peft import LoraConfig as PeftLoraConfig
from peft import set_peft_model_state_dict

from mrgfast.assemble.data import demo_tokenizer
from mrgfast.data.synthetic import generate_demo
from mrgfast.models import Decoder, DecoderConfig
from mrgfast.models.config import hf_llama_config
from mrgfast.peft import LoraConfig, adapter_state_dict, apply_lora

# PeFoMed's adapter (REFERENCE.md): LoRA on q_proj and v_proj, r=64, alpha=16, dropout 0.05, no bias.
LORA = dict(r=64, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
LLAMA2_VOCAB = 32000  # Llama-2's vocabulary: sets the LM head's cost, which the fused loss is about
LOSS_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # |a - b| / max(1, |b|)


class DemoData:
    """The synthetic demo (IU-Xray-like reports, VQA, preference pairs) and its tokenizer, in a temp directory
    removed by close()."""

    def __init__(self, n: int, image_size: int, seed: int = 0):
        self.root = Path(tempfile.mkdtemp(prefix="mrgfast-e2e-"))
        try:
            generate_demo(self.root, seed=seed, n=n, size=image_size, n_volumes=0)
            self.tokenizer = demo_tokenizer(self.root)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Delete the temp directory."""
        shutil.rmtree(self.root, ignore_errors=True)


def decoder_config(shape: dict, tokenizer) -> DecoderConfig:
    """A Llama-style decoder of `shape`'s sizes; the vocabulary is Llama-2's (at least the tokenizer's)."""
    return DecoderConfig(vocab_size=max(shape["vocab_size"], tokenizer.vocab_size), hidden_size=shape["hidden"],
                         intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
                         num_attention_heads=shape["heads"], max_position_embeddings=2048)


def randomize_lora_b(model: torch.nn.Module, seed: int) -> None:
    """Non-zero lora_B everywhere (PEFT and mrgfast zero it at init, which would make policy == reference and hide
    adapter-path bugs in the agreement checks)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


def twin_decoders(config: DecoderConfig, tokenizer, seed: int = 0, lora: dict = LORA) -> tuple:
    """(mrgfast Decoder with mrgfast LoRA (non-zero B), the plain HF LlamaForCausalLM with the same base weights):
    mrgfast uses HF's key names, so the state dict transfers; give the HF model its adapter with copy_adapter."""
    torch.manual_seed(seed)
    decoder = Decoder(config)
    hf_config = transformers.LlamaConfig(**{k: v for k, v in hf_llama_config(config, tokenizer).items()
                                            if k not in ("architectures", "model_type", "torch_dtype")})
    hf = transformers.LlamaForCausalLM(hf_config)
    hf.config._attn_implementation = "sdpa"  # what a user gets by default
    missing, unexpected = hf.load_state_dict(decoder.state_dict(), strict=False)
    if missing or unexpected:
        raise SystemExit(f"e2e: HF Llama and mrgfast Decoder state dicts differ: missing {missing}, "
                         f"unexpected {unexpected}")
    decoder.requires_grad_(False)
    apply_lora(decoder, LoraConfig(**lora))
    randomize_lora_b(decoder, seed + 1)
    return decoder, hf


def peft_config(lora: dict = LORA) -> PeftLoraConfig:
    """PEFT's LoraConfig with the same settings as mrgfast's."""
    return PeftLoraConfig(task_type="CAUSAL_LM", **lora)


def copy_adapter(decoder: Decoder, peft_model) -> None:
    """Load the mrgfast decoder's adapter values into a PEFT model (mrgfast exports PEFT's key names)."""
    result = set_peft_model_state_dict(peft_model, {k: v.detach().clone() for k, v in
                                                    adapter_state_dict(decoder).items()})
    if result.unexpected_keys:
        raise SystemExit(f"e2e: PEFT did not take mrgfast's adapter keys: {result.unexpected_keys[:4]}")


def check_loss(name: str, what: str, got: float, want: float, dtype: torch.dtype) -> float:
    """Exit non-zero when two losses disagree beyond the dtype's tolerance; returns the relative difference."""
    diff = abs(got - want) / max(1.0, abs(want))
    if not diff <= LOSS_TOLERANCE[dtype]:
        raise SystemExit(f"{name}: {what}: mrgfast {got:.6f} vs baseline {want:.6f} (relative difference {diff:.2e} "
                         f"> {LOSS_TOLERANCE[dtype]:.0e})")
    print(f"{name}: {what}: mrgfast {got:.6f} baseline {want:.6f} (relative difference {diff:.1e}) ok")
    return diff
