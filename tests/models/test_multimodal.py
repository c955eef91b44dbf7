"""MultimodalLM: the four recipes built tiny, packed by the real PromptBuilder + PackingCollator, against hand-spliced
per-sample decoder runs, transformers' Qwen2-VL, and greedy decoding by full forward passes."""

import dataclasses

import pytest
import torch
from torch import nn

from mrgfast.data.packing import DPOCollator, PackingCollator, sequence_positions
from mrgfast.data.prompts import PromptBuilder
from mrgfast.data.tokenizer import build_demo_tokenizer
from mrgfast.layers.affine_prompt import AffinePromptGenerator
from mrgfast.layers.diagnostic_prefix import DiagnosticPrefix
from mrgfast.layers.grouped_projection import GroupedProjection
from mrgfast.models import Decoder, DecoderConfig, Qwen2VLMerger, ViT, ViT3D, VisionTower, load_decoder
from mrgfast.models.multimodal import AdapterSpec, MultimodalLM, register_adapter
from mrgfast.peft import LoraConfig, apply_lora, disable_adapters
from tests.models.tiny_hf import SIZES, VISION
from tests.ops.op_cases import assert_close

import transformers

TEXTS = ["the heart size is normal", "no focal consolidation or effusion", "is there a fracture", "yes", "no",
         "mild cardiomegaly with small left pleural effusion", "describe the findings of this study"]
HIDDEN = 32
IMAGE, PATCH = 16, 4  # 4 x 4 = 16 patches per 2D image
VOLUME = 8  # 2 x 2 x 2 = 8 patches per volume
QWEN_IMAGE = 56  # 4 x 4 patches of 14, merged 2 x 2 -> 4 tokens
RECIPES = ["pefomed", "mrg_llm", "rad3d", "qwen2_vl"]
TOL = {torch.float32: 5e-5, torch.bfloat16: 3e-2}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A small byte-level BPE tokenizer with every template marker (the demo's own builder)."""
    return build_demo_tokenizer(TEXTS * 3, tmp_path_factory.mktemp("tok"), vocab_size=300)


def tiny_decoder(vocab: int, mrope: bool = False) -> Decoder:
    """A random tiny Llama-style Decoder (M-RoPE over head_dim / 2 = 4 frequencies when asked)."""
    config = DecoderConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 1, 1) if mrope else None)
    return Decoder(config)


def add_lora(decoder: Decoder) -> None:
    """LoRA on q_proj / v_proj with a random B (PEFT's zero B would hide gradients of A)."""
    apply_lora(decoder, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)


def hf_qwen2_vl(tokenizer):
    """A tiny HF Qwen2VLForConditionalGeneration over the test tokenizer's vocabulary and special tokens."""
    ids = {name: tokenizer.token_to_id(token) for name, token in
           (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|endoftext|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = dict(SIZES, vocab_size=tokenizer.vocab_size, initializer_range=0.2,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = transformers.Qwen2VLConfig(text_config=text, vision_config=VISION, **ids)
    torch.manual_seed(0)
    return transformers.Qwen2VLForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def qwen2_vl_dir(tokenizer, tmp_path_factory):
    """(HF model, directory) of the tiny Qwen2-VL, saved once."""
    model = hf_qwen2_vl(tokenizer)
    path = tmp_path_factory.mktemp("qwen2_vl")
    model.save_pretrained(path)
    return model, path


@dataclasses.dataclass
class Recipe:
    """A built recipe: the model, its template, images per sample, pixel shape, and which parameters train."""

    model: MultimodalLM
    template: str
    views: int
    pixel_shape: tuple
    image_size: int = None

    def builder(self, tokenizer) -> PromptBuilder:
        """The PromptBuilder whose slot sizes come from the model."""
        return PromptBuilder(tokenizer, self.template,
                             **self.model.builder_kwargs(self.template, self.views, self.image_size))


def build_recipe(name: str, tokenizer, qwen2_vl_dir=None) -> Recipe:
    """One of the four DESIGN.md recipes, tiny and random (Qwen2-VL from the saved HF checkpoint)."""
    torch.manual_seed(1)
    vocab = tokenizer.vocab_size
    if name == "pefomed":  # frozen ViT, trainable grouped projector, LoRA on q/v
        decoder = tiny_decoder(vocab)
        add_lora(decoder)
        vit = ViT(IMAGE, PATCH, dim=16, depth=1, heads=2).requires_grad_(False)
        model = MultimodalLM(decoder, vit, {"image": GroupedProjection(16, HIDDEN, 4)})
        return Recipe(model, "pefomed", 2, (2, 3, IMAGE, IMAGE))
    if name == "mrg_llm":  # trainable ViT, linear projection and instance-specific prompts; frozen LLM
        decoder = tiny_decoder(vocab).requires_grad_(False)
        vit = ViT(IMAGE, PATCH, dim=16, depth=1, heads=2)
        model = MultimodalLM(decoder, vit, {"image": nn.Linear(16, HIDDEN),
                                            "prompt": AffinePromptGenerator(16, HIDDEN, n_prompts=3, book_size=2)})
        with torch.no_grad():  # non-zero FiLM and mixer heads, so the image really modulates the prompts
            for p in model.adapters["prompt"].parameters():
                p.normal_(0, 0.2)
        return Recipe(model, "mrg_llm", 2, (2, 3, IMAGE, IMAGE))
    if name == "rad3d":  # frozen 3D encoder and classifier, trainable prefix mapper
        decoder = tiny_decoder(vocab).requires_grad_(False)
        vit3d = ViT3D(VOLUME, PATCH, dim=16, depth=1, heads=2).requires_grad_(False)
        prefix = DiagnosticPrefix(16, 5, HIDDEN, n_prefix=3, mapper_layers=1, n_heads=2, classifier=nn.Linear(16, 5))
        return Recipe(MultimodalLM(decoder, vit3d, prefix), "rad3d", 1, (1, VOLUME, VOLUME, VOLUME))
    hf, path = qwen2_vl_dir  # Qwen2-VL / LDP: frozen tower, merger, LoRA on the language model
    decoder = load_decoder(path)
    add_lora(decoder)
    tower = VisionTower.from_pretrained(path, merged=False)
    merger = Qwen2VLMerger.from_pretrained(path).requires_grad_(False)
    return Recipe(MultimodalLM(decoder, tower, {"image": merger}), "qwen2_vl", 1, (1, 3, QWEN_IMAGE, QWEN_IMAGE),
                  QWEN_IMAGE)


def items(recipe: Recipe, count: int = 3, seed: int = 0) -> list:
    """Dataset-style items with random pixels and texts of different lengths."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        pixels = torch.randn(recipe.pixel_shape, generator=gen)
        if recipe.template == "qwen2_vl":
            pixels = pixels[0][None]  # [1, C, H, W]: one view
        out.append({"id": f"s{i}", "task": "report", "prompt": TEXTS[6 - i % 3], "answer": TEXTS[i % 5],
                    "pixel_values": pixels})
    return out


@pytest.fixture(scope="module")
def recipes(tokenizer, qwen2_vl_dir):
    """recipes(name) -> a fresh Recipe (a new model each call, so tests may change it)."""
    return lambda name: build_recipe(name, tokenizer, qwen2_vl_dir)


def pack(recipe: Recipe, tokenizer, batch_items: list):
    """The PackedBatch of the items (2 rows of 256 tokens, several samples per row)."""
    return PackingCollator(256, rows=2, builder=recipe.builder(tokenizer))(batch_items)


def hand_spliced(recipe: Recipe, tokenizer, item: dict) -> tuple:
    """(hidden [L, H], token ids) of one dataset item tokenized and run alone (see run_sample)."""
    sample = recipe.builder(tokenizer)(item)
    return run_sample(recipe.model, sample, item["pixel_values"]), sample.input_ids


def run_sample(model: MultimodalLM, sample, pixels: torch.Tensor) -> torch.Tensor:
    """hidden [L, H] of one TokenizedSample run alone: the adapters applied to its own pixels [V, ...] and written
    span by span into its token embeddings by a plain loop, positions from the sample's own spans."""
    embeds = model.decoder.embed(torch.tensor(sample.input_ids)).clone()
    vision = model.vision
    if isinstance(vision, ViT3D):
        pixels = pixels[None]  # a sample holds one volume [C, D, H, W]
    if model.vision_frozen:
        with torch.no_grad():
            features = vision(pixels)
    else:
        features = vision(pixels)
    for span in sample.spans:
        adapter = model.adapters[span.kind]
        if isinstance(adapter, GroupedProjection):
            values = adapter(features.patches[span.index:span.index + 1])[0]
        elif isinstance(adapter, Qwen2VLMerger):
            values = adapter(type(features)(features.features[span.index:span.index + 1], features.grid)).features[0]
        elif isinstance(adapter, nn.Linear):
            values = adapter(features.patches[span.index])
        elif isinstance(adapter, AffinePromptGenerator):  # every view's patch tokens, as one sequence
            values = adapter(features.patches.reshape(1, -1, features.patches.shape[-1]))[0]
        else:  # DiagnosticPrefix on the volume embedding
            values = adapter(features.pooled)[0]
        embeds[span.start:span.start + span.length] = values
    mrope = model.decoder.config.mrope_section is not None
    positions = sequence_positions(len(sample.input_ids), sample.spans, mrope)[..., None, :]
    return model.decoder(inputs_embeds=embeds[None], position_ids=positions)[0]


def weights_like(hidden: torch.Tensor) -> torch.Tensor:
    """A fixed random weighting for a scalar loss over hidden states."""
    return torch.randn(hidden.shape, generator=torch.Generator().manual_seed(7))


def grads(model: nn.Module) -> dict:
    """name -> gradient of every parameter that got one."""
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------- packing / splicing

@pytest.mark.parametrize("name", RECIPES)
def test_packed_hidden_and_grads_equal_hand_spliced_samples(recipes, tokenizer, name):
    """(1) + (3): packed forward == each sample run alone with a hand-spliced inputs_embeds, and the gradients
    of a loss over the real tokens agree and reach exactly the trainable parameters."""
    recipe = recipes(name)
    model = recipe.model.train()
    batch_items = items(recipe)
    batch = pack(recipe, tokenizer, batch_items)
    assert max(len(set(row.tolist()) - {-1}) for row in batch.sample_index) >= 2  # a row holds several samples
    hidden = model(batch)
    width = model.decoder.config.hidden_size
    assert hidden.shape == (*batch.input_ids.shape, width)
    weights = weights_like(hidden)
    real = (batch.sample_index >= 0)[..., None]
    (hidden * weights * real).sum().backward()
    packed_grads = grads(model)
    model.zero_grad(set_to_none=True)

    by_id = {item["id"]: item for item in batch_items}
    flat_hidden, flat_weights = hidden.detach().reshape(-1, width), weights.reshape(-1, width)
    reference_loss = 0
    for s, sample_id in enumerate(batch.sample_ids):
        where = (batch.sample_index.flatten() == s).nonzero()[:, 0]
        expected, ids = hand_spliced(recipe, tokenizer, by_id[sample_id])
        assert batch.input_ids.flatten()[where].tolist() == ids
        assert_close(flat_hidden[where], expected.detach(), torch.float32, f"{name} sample {sample_id}", TOL)
        reference_loss = reference_loss + (expected * flat_weights[where]).sum()
    reference_loss.backward()
    reference_grads = grads(model)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "every recipe trains something"
    assert set(packed_grads) == trainable, f"{name}: gradients reached {sorted(set(packed_grads) ^ trainable)}"
    for n in trainable:
        assert packed_grads[n].abs().sum() > 0, f"{name}: zero gradient for trainable {n}"
        assert_close(packed_grads[n], reference_grads[n], torch.float32, f"{name} grad {n}", {torch.float32: 1e-4})


def test_trainable_parts_per_recipe(recipes):
    """Which parameters each recipe trains: DESIGN.md's table (LoRA lives in the decoder, the rest outside)."""
    expected = {"pefomed": ({"adapters.image"}, True), "mrg_llm": ({"vision", "adapters.image", "adapters.prompt"},
                                                                    False),
                "rad3d": ({"adapters.prefix"}, False), "qwen2_vl": (set(), True)}
    for name, (outside, lora) in expected.items():
        model = recipes(name).model
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        decoder = [n for n in names if n.startswith("decoder.")]
        assert all("lora_" in n for n in decoder) and bool(decoder) == lora, name
        roots = {".".join(n.split(".")[:2]) if n.startswith("adapters.") else n.split(".")[0]
                 for n in names if not n.startswith("decoder.")}
        assert roots == outside, name
        assert set(model.trainable_state_dict()) == {n for n in names if not n.startswith("decoder.")}
        # RAD3D's classifier is frozen inside the trainable prefix mapper.
        assert not any("classifier" in n for n in names)
        # A frozen tower stays in eval mode under model.train(); MRG-LLM's trainable ViT trains.
        assert model.train().vision.training == (name == "mrg_llm")


def test_bf16_packed_matches_fp32_hand_spliced(recipes, tokenizer):
    """The PeFoMed construction in bf16 stays within bf16 tolerance of the fp32 per-sample reference."""
    recipe = recipes("pefomed")
    batch_items = items(recipe)
    batch = pack(recipe, tokenizer, batch_items)
    with torch.no_grad():
        reference = {sid: hand_spliced(recipe, tokenizer, item)[0] for sid, item in
                     zip([i["id"] for i in batch_items], batch_items)}
        recipe.model.to(torch.bfloat16)
        hidden = recipe.model(batch).float().reshape(-1, HIDDEN)
    for s, sample_id in enumerate(batch.sample_ids):
        where = (batch.sample_index.flatten() == s).nonzero()[:, 0]
        assert_close(hidden[where], reference[sample_id], torch.bfloat16, f"bf16 sample {sample_id}", TOL)


@pytest.mark.parametrize("name", ["qwen2_vl", "pefomed"])
def test_dpo_shared_layout_matches_each_completion_alone(recipes, tokenizer, name):
    """A DPOCollator "shared" batch (prompt once, the rejected answer attending to it through the layout) gives
    each answer the hidden states of prompt + that answer run alone."""
    recipe = recipes(name)
    batch_items = [dict(item, rejected=TEXTS[5]) for item in items(recipe, count=2)]
    builder = recipe.builder(tokenizer)
    batch = DPOCollator(512, rows=1, layout="shared", builder=builder)(batch_items)
    assert batch.layout is not None
    with torch.no_grad():
        hidden = recipe.model.eval()(batch).reshape(-1, recipe.model.decoder.config.hidden_size)
        by_id = {item["id"]: item for item in batch_items}
        for s, sample_id in enumerate(batch.sample_ids):
            where = (batch.sample_index.flatten() == s).nonzero()[:, 0]
            pair, pixels = builder.pair(by_id[sample_id]), by_id[sample_id]["pixel_values"]
            n_prompt, n_chosen = len(pair.prompt_ids), len(pair.chosen_ids)
            chosen = run_sample(recipe.model, pair.full("chosen"), pixels)
            rejected = run_sample(recipe.model, pair.full("rejected"), pixels)[n_prompt:]
            assert_close(hidden[where[:n_prompt + n_chosen]], chosen, torch.float32, f"{name} chosen", TOL)
            assert_close(hidden[where[n_prompt + n_chosen:]], rejected, torch.float32, f"{name} rejected", TOL)


# ------------------------------------------------------------------------------- against transformers

def test_qwen2_vl_logits_match_transformers(recipes, tokenizer, qwen2_vl_dir):
    """(2): the Qwen2-VL construction's logits on a packed batch equal Qwen2VLForConditionalGeneration's on each
    sample's image and text (HF's own processor patch layout, M-RoPE from its get_rope_index); LoRA disabled, as
    for LDP's DPO reference model."""
    from mrgfast.models.vision import qwen2_vl_patchify
    hf, _ = qwen2_vl_dir
    recipe = recipes("qwen2_vl")
    batch_items = items(recipe)
    batch = pack(recipe, tokenizer, batch_items)
    with torch.no_grad(), disable_adapters(recipe.model.decoder):
        logits = recipe.model.decoder.compute_logits(recipe.model.eval()(batch)).reshape(-1, tokenizer.vocab_size)
    by_id = {item["id"]: item for item in batch_items}
    image_id = hf.config.image_token_id
    for s, sample_id in enumerate(batch.sample_ids):
        where = (batch.sample_index.flatten() == s).nonzero()[:, 0]
        ids = batch.input_ids.flatten()[where][None]
        patches, grid_thw = qwen2_vl_patchify(by_id[sample_id]["pixel_values"], VISION["patch_size"],
                                              VISION["temporal_patch_size"], VISION["spatial_merge_size"])
        with torch.no_grad():
            expected = hf(input_ids=ids, pixel_values=patches, image_grid_thw=grid_thw,
                          mm_token_type_ids=(ids == image_id).int()).logits[0]
        assert (ids == image_id).sum() == recipe.model.slot_tokens("image", QWEN_IMAGE) == 4
        assert_close(logits[where], expected, torch.float32, f"qwen2_vl sample {sample_id}", {torch.float32: 1e-4})


def test_qwen2_vl_generate_matches_transformers(recipes, tokenizer, qwen2_vl_dir):
    """Greedy generate() of the Qwen2-VL construction (LoRA disabled) equals transformers' generate on each prompt:
    the KV cache continues M-RoPE after the image as Qwen2-VL does."""
    from mrgfast.models.vision import qwen2_vl_patchify
    hf, _ = qwen2_vl_dir
    recipe = recipes("qwen2_vl")
    recipe.model.eval()
    batch_items = items(recipe, count=2, seed=5)
    builder = recipe.builder(tokenizer)
    prompts = [builder(dict(item, answer="")) for item in batch_items]
    pixels = torch.stack([item["pixel_values"] for item in batch_items])
    with disable_adapters(recipe.model.decoder):
        got = recipe.model.generate(prompts, pixels, max_new_tokens=5)
    for prompt, item, tokens in zip(prompts, batch_items, got):
        ids = torch.tensor([prompt.input_ids[:prompt.prompt_length]])
        patches, grid_thw = qwen2_vl_patchify(item["pixel_values"], VISION["patch_size"], VISION["temporal_patch_size"],
                                              VISION["spatial_merge_size"])
        with torch.no_grad():
            out = hf.generate(input_ids=ids, pixel_values=patches, image_grid_thw=grid_thw,
                              mm_token_type_ids=(ids == hf.config.image_token_id).int(), max_new_tokens=5,
                              do_sample=False, eos_token_id=None, pad_token_id=0)
        assert tokens == out[0, ids.shape[1]:].tolist()


# ------------------------------------------------------------------------------- generation

def greedy_by_full_forward(recipe: Recipe, tokenizer, item: dict, steps: int) -> list:
    """Greedy tokens by re-running the whole hand-spliced sequence (prompt + tokens so far) for every step."""
    builder = recipe.builder(tokenizer)
    sample = builder(dict(item, answer=""))
    prompt = sample.input_ids[:sample.prompt_length]
    out = []
    with torch.no_grad():
        for _ in range(steps):
            grown = dataclasses.replace(sample, input_ids=prompt + out, label_mask=[False] * (len(prompt) + len(out)))
            hidden = run_sample(recipe.model, grown, item["pixel_values"])
            out.append(int(recipe.model.decoder.compute_logits(hidden[-1]).argmax()))
    return out


@pytest.mark.parametrize("name", RECIPES)
def test_generate_equals_greedy_full_forward(recipes, tokenizer, name):
    """(4): generate() (KV cache, spliced prompts of different lengths, M-RoPE continued) == greedy decoding by
    repeated full forward passes."""
    recipe = recipes(name)
    recipe.model.eval()
    batch_items = items(recipe, count=2, seed=3)
    builder = recipe.builder(tokenizer)
    prompts = [builder(dict(item, answer="")) for item in batch_items]
    assert len(prompts[0].input_ids) != len(prompts[1].input_ids) or name == "rad3d"
    pixels = torch.stack([item["pixel_values"] for item in batch_items])
    got = recipe.model.generate(prompts, pixels, max_new_tokens=4)
    expected = [greedy_by_full_forward(recipe, tokenizer, item, 4) for item in batch_items]
    assert got == expected


def test_generate_beams_take_prompt_pairs(recipes, tokenizer):
    """Beam search runs through the same path, and TokenizedPair prompts equal their TokenizedSample form."""
    recipe = recipes("pefomed")
    recipe.model.eval()
    batch_items = items(recipe, count=2, seed=4)
    builder = recipe.builder(tokenizer)
    samples = [builder(dict(item, answer="a")) for item in batch_items]
    pairs = [builder.pair(dict(item, answer="a", rejected="b")) for item in batch_items]
    pixels = torch.stack([item["pixel_values"] for item in batch_items])
    greedy = recipe.model.generate(samples, pixels, max_new_tokens=3)
    assert recipe.model.generate(pairs, pixels, max_new_tokens=3) == greedy
    beams = recipe.model.generate(samples, pixels, max_new_tokens=3, num_beams=2)
    assert len(beams) == 2 and all(len(b) == 3 for b in beams)


# ------------------------------------------------------------------------------- sizes and checkpoints

def test_slot_tokens_and_builder_kwargs(recipes, tokenizer):
    """Slot sizes follow the encoder and adapter: PeFoMed's 1024 patches / 4 = 256, Qwen2-VL's merged grid."""
    decoder = tiny_decoder(tokenizer.vocab_size)
    eva_like = ViT(128, 4, dim=8, depth=1, heads=2).requires_grad_(False)  # 32 x 32 = 1024 patches
    model = MultimodalLM(decoder, eva_like, GroupedProjection(8, HIDDEN, 4))
    assert model.slot_tokens("image") == 256
    assert model.builder_kwargs("pefomed", views=2) == {"image_tokens": [256, 256]}
    qwen = recipes("qwen2_vl").model
    assert qwen.slot_grid("image", QWEN_IMAGE) == (2, 2)
    assert qwen.builder_kwargs("qwen2_vl", image_size=112) == {"image_tokens": [(1, 4, 4)]}
    assert recipes("mrg_llm").model.builder_kwargs("mrg_llm") == {"image_tokens": [16], "prompt_tokens": 3}
    assert recipes("rad3d").model.builder_kwargs("rad3d") == {"prefix_tokens": 3}
    with pytest.raises(ValueError, match="image_size=64: ViT takes inputs of size \\(128, 128\\) only"):
        model.slot_tokens("image", image_size=64)
    with pytest.raises(ValueError, match="size=60: Qwen2-VL images must be a multiple of"):
        qwen.slot_tokens("image", image_size=60)
    with pytest.raises(ValueError, match="template 'pefomed' has slots \\['image'\\] but the model has adapters for "
                                         "\\['prefix'\\]"):
        recipes("rad3d").model.builder_kwargs("pefomed")


def test_trainable_state_dict_round_trip(recipes):
    """trainable_state_dict -> load_trainable_state_dict restores the adapters; bad keys and shapes are named."""
    source, target = recipes("mrg_llm").model, recipes("mrg_llm").model
    with torch.no_grad():
        for p in source.adapters.parameters():
            p.add_(1.0)
    state = {k: v.clone() for k, v in source.trainable_state_dict().items()}
    assert any(k.startswith("vision.") for k in state) and not any(k.startswith("decoder.") for k in state)
    target.load_trainable_state_dict(state)
    for key, value in state.items():
        assert torch.equal(target.get_parameter(key), value)
    with pytest.raises(ValueError, match="load_trainable_state_dict: missing keys adapters.image.bias; "
                                         "unexpected keys extra.weight"):
        target.load_trainable_state_dict({**{k: v for k, v in state.items() if k != "adapters.image.bias"},
                                          "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"adapters.image.weight has shape \(1,\), the model expects"):
        target.load_trainable_state_dict({**state, "adapters.image.weight": torch.zeros(1)})


def test_lora_keeps_hf_key_paths(recipes):
    """apply_lora on model.decoder targets HF names: the adapter keys carry model.layers.N.self_attn paths."""
    from mrgfast.peft.adapter_io import adapter_state_dict
    keys = adapter_state_dict(recipes("pefomed").model.decoder)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys


def test_register_adapter(tokenizer):
    """A new adapter class is driven through one registered AdapterSpec."""
    class MeanToken(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, HIDDEN)

        def forward(self, x):
            return self.proj(x.mean(1, keepdim=True))

    with pytest.raises(ValueError, match="adapter MeanToken has no AdapterSpec"):
        MultimodalLM(tiny_decoder(tokenizer.vocab_size), ViT(IMAGE, PATCH, dim=16, depth=1, heads=2), MeanToken())
    register_adapter(MeanToken, AdapterSpec("image", lambda m, f: m(f.patches), lambda m, g: (1,)))
    model = MultimodalLM(tiny_decoder(tokenizer.vocab_size), ViT(IMAGE, PATCH, dim=16, depth=1, heads=2), MeanToken())
    assert model.slot_tokens("image") == 1
    assert model.encode(torch.randn(2, 3, IMAGE, IMAGE))["image"].shape == (2, 1, HIDDEN)


# ------------------------------------------------------------------------------- bad input

def test_bad_inputs_raise_naming_the_problem(recipes, tokenizer):
    """(5): missing pixels, slot count mismatches, wrong token counts, wrong adapters -> ValueError saying what."""
    recipe = recipes("pefomed")
    batch_items = items(recipe)
    batch = pack(recipe, tokenizer, batch_items)
    with pytest.raises(ValueError, match="pixel_values is None"):
        recipe.model(dataclasses.replace(batch, pixel_values=None))
    with pytest.raises(ValueError, match="the batch has 6 image slot\\(s\\) but pixel_values give 4"):
        recipe.model(dataclasses.replace(batch, pixel_values=batch.pixel_values[:2]))
    with pytest.raises(ValueError, match="pixel_values must be \\[samples, 3-dim image\\] or \\[samples, views"):
        recipe.model(dataclasses.replace(batch, pixel_values=batch.pixel_values[0, 0, 0]))
    wrong = PromptBuilder(tokenizer, "pefomed", image_tokens=[5, 5])
    with pytest.raises(ValueError, match="image slot of sample 0 has 5 placeholder tokens but the adapter makes 4"):
        recipe.model(PackingCollator(256, rows=2, builder=wrong)(batch_items))
    text_only = PackingCollator(256, rows=2, builder=PromptBuilder(tokenizer, "rad3d", prefix_tokens=2))
    with pytest.raises(ValueError, match="the batch has \\['prefix'\\] slots but the model has adapters only for"):
        recipe.model(text_only(batch_items))
    with pytest.raises(ValueError, match="takes a PackedBatch"):
        recipe.model(batch.input_ids)
    with pytest.raises(ValueError, match="adapters: unknown slot kind 'images'"):
        MultimodalLM(tiny_decoder(tokenizer.vocab_size), recipe.model.vision, {"images": nn.Linear(16, HIDDEN)})
    with pytest.raises(ValueError, match="need a vision module"):
        MultimodalLM(tiny_decoder(tokenizer.vocab_size), None, {"image": nn.Linear(16, HIDDEN)})
    with pytest.raises(ValueError, match="returned shape \\(4, 16, 8\\); expected \\[slots, tokens, 32\\]"):
        MultimodalLM(tiny_decoder(tokenizer.vocab_size), recipe.model.vision,
                     {"image": nn.Linear(16, 8)}).encode(torch.randn(4, 3, IMAGE, IMAGE))
    with pytest.raises(ValueError, match="prompts\\[0\\] is a dict"):
        recipe.model.generate([batch_items[0]], batch.pixel_values[:1])
