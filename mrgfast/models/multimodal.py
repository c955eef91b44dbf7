"""MultimodalLM: a decoder plus a vision encoder and slot adapters; the four recipes of DESIGN.md are each one
construction of it.

A prompt template has placeholder slots of three kinds (mrgfast.data.prompts): "image" (one per image),
"prompt" and "prefix" (one per sample). `adapters` maps a kind to the module producing that slot's embeddings:

- PeFoMed:  {"image": GroupedProjection(group=4)} on the frozen tower's patch features;
- MRG-LLM:  {"image": nn.Linear(vision_dim, hidden), "prompt": AffinePromptGenerator} on a trainable ViT;
- RAD3D:    {"prefix": DiagnosticPrefix} on ViT3D's pooled volume embedding (its classifier gives the logits);
- Qwen2-VL: {"image": Qwen2VLMerger} on VisionTower(merged=False) features, M-RoPE positions from the batch.

How an adapter is called (which part of the VisionFeatures it reads) and how many tokens it makes is the
AdapterSpec registered for its class in ADAPTERS, one table; `register_adapter` adds a class.
"""

import dataclasses
import math
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from mrgfast.common.names import few
from mrgfast.data.packing import PackedBatch, PlacedSpan, sequence_positions, span_positions, spans_in_order
from mrgfast.data.prompts import SLOT_KINDS, PromptTemplate, TokenizedPair, TokenizedSample, get_template
from mrgfast.layers.affine_prompt import AffinePromptGenerator
from mrgfast.layers.diagnostic_prefix import DiagnosticPrefix
from mrgfast.layers.grouped_projection import GroupedProjection
from mrgfast.models.decoder import Decoder
from mrgfast.models.generation import generate
from mrgfast.models.vision import Qwen2VLMerger, VisionFeatures, VisionTower

PER_IMAGE_KINDS = ("image",)  # one slot per image; the other kinds have one slot per sample


# ------------------------------------------------------------------------------------------ adapter protocol

@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """How MultimodalLM drives one adapter class.

    `kind`: the slot kind it fills when given alone (not in a dict); `call(adapter, features)`: its output
    [slots, tokens, hidden] for VisionFeatures of those slots; `grid(adapter, patch_grid)`: the token grid it
    outputs for an encoder patch grid (its product is the slot's token count; a 2-axis grid is an image's
    (h, w) for M-RoPE).
    """

    kind: str
    call: Callable[[nn.Module, VisionFeatures], Tensor]
    grid: Callable[[nn.Module, tuple], tuple]


def _grouped_grid(adapter: GroupedProjection, grid: tuple) -> tuple:
    """The token grid after grouping: (ceil(N / g),) in 1d, (ceil(h / s), ceil(w / s)) in 2d."""
    if adapter.mode == "1d":
        tokens = math.prod(grid)
        if tokens % adapter.group and not adapter.pad:
            raise ValueError(f"GroupedProjection(group={adapter.group}) cannot group the encoder's {tokens} patch "
                             "tokens (not divisible); build it with pad=True or change the encoder")
        return (-(-tokens // adapter.group),)
    side = math.isqrt(adapter.group)
    return tuple(-(-n // side) for n in grid)


def _patch_grid(features: VisionFeatures) -> Optional[tuple]:
    """The 2D patch grid of features (None for other grids), which 2d grouping needs."""
    return tuple(features.grid) if len(features.grid) == 2 else None


ADAPTERS: dict = {
    GroupedProjection: AdapterSpec(
        "image", lambda m, f: m(f.patches, grid=_patch_grid(f) if m.mode == "2d" else None), _grouped_grid),
    Qwen2VLMerger: AdapterSpec("image", lambda m, f: m(f).features,
                               lambda m, g: tuple(n // m.merge_size for n in g)),
    nn.Linear: AdapterSpec("image", lambda m, f: m(f.patches), lambda m, g: tuple(g)),
    nn.Identity: AdapterSpec("image", lambda m, f: f.patches, lambda m, g: tuple(g)),
    AffinePromptGenerator: AdapterSpec("prompt", lambda m, f: m(f.patches), lambda m, g: (m.n_prompts,)),
    DiagnosticPrefix: AdapterSpec("prefix", lambda m, f: m(_pooled(f, "DiagnosticPrefix")),
                                  lambda m, g: (m.n_prefix,)),
}


def register_adapter(cls: type, spec: AdapterSpec) -> None:
    """Teach MultimodalLM to drive adapters of class `cls` (and its subclasses)."""
    if spec.kind not in SLOT_KINDS:
        raise ValueError(f"AdapterSpec.kind must be one of {SLOT_KINDS}, got {spec.kind!r}")
    ADAPTERS[cls] = spec


def adapter_spec(adapter: nn.Module) -> AdapterSpec:
    """The AdapterSpec of the adapter's class (nearest registered base class first)."""
    for cls in type(adapter).__mro__:
        if cls in ADAPTERS:
            return ADAPTERS[cls]
    known = ", ".join(sorted(c.__name__ for c in ADAPTERS))
    raise ValueError(f"adapter {type(adapter).__name__} has no AdapterSpec; known adapters: {known}; add one with "
                     "mrgfast.models.multimodal.register_adapter")


def _pooled(features: VisionFeatures, who: str) -> Tensor:
    """features.pooled, or ValueError naming the adapter that needs it."""
    if features.pooled is None:
        raise ValueError(f"{who} reads the encoder's pooled embedding, but the vision module returns none "
                         "(use mrgfast's ViT / ViT3D, or give VisionFeatures.pooled)")
    return features.pooled


def per_sample(features: VisionFeatures, views: int) -> VisionFeatures:
    """Features of `views` consecutive images joined into one entry per sample: tokens concatenated (patch tokens
    only), pooled averaged; a single view passes through unchanged."""
    if views == 1:
        return features
    patches = features.patches
    joined = patches.reshape(patches.shape[0] // views, views * patches.shape[1], patches.shape[2])
    pooled = None
    if features.pooled is not None:
        pooled = features.pooled.reshape(-1, views, features.pooled.shape[-1]).mean(1)
    return VisionFeatures(joined, (views * math.prod(features.grid),), pooled=pooled)


# --------------------------------------------------------------------------------------------------- model

class MultimodalLM(nn.Module):
    """A Decoder whose placeholder slots are filled by adapters of a vision encoder's features.

    decoder: mrgfast Decoder (reachable as `model.decoder`, so apply_lora(model.decoder, ...) keeps HF key
    paths); vision: an encoder returning VisionFeatures (VisionTower, ViT, ViT3D), None for text-only;
    adapters: {slot kind: module}, or one module whose AdapterSpec names its kind; feature_cache: a
    FeatureCache reused for a frozen vision encoder.
    """

    def __init__(self, decoder: Decoder, vision: Optional[nn.Module] = None,
                 adapters: Union[dict, nn.Module, None] = None, feature_cache=None):
        super().__init__()
        if not isinstance(decoder, Decoder):
            raise ValueError(f"decoder must be an mrgfast Decoder, got {type(decoder).__name__}")
        self.decoder = decoder
        self.vision = vision
        if adapters is None:
            adapters = {}
        elif isinstance(adapters, nn.Module):
            adapters = {adapter_spec(adapters).kind: adapters}
        if not isinstance(adapters, dict):
            raise ValueError(f"adapters must be a dict {{slot kind: module}}, one module or None, got "
                             f"{type(adapters).__name__}")
        for kind, adapter in adapters.items():
            if kind not in SLOT_KINDS:
                raise ValueError(f"adapters: unknown slot kind {kind!r}; expected one of {SLOT_KINDS}")
            if not isinstance(adapter, nn.Module):
                raise ValueError(f"adapters[{kind!r}] must be an nn.Module, got {type(adapter).__name__}")
            adapter_spec(adapter)  # fail now, not at the first batch
        if adapters and vision is None:
            raise ValueError(f"adapters {sorted(adapters)} need a vision module to read features from; vision=None")
        self.adapters = nn.ModuleDict(adapters)
        if feature_cache is not None:
            if vision is None:
                raise ValueError("feature_cache needs a vision module to cache; vision=None")
            feature_cache.check_encoder(vision)
            feature_cache.fingerprint(vision)  # hashes the weights now, not inside the first training step
        self.feature_cache = feature_cache

    def train(self, mode: bool = True) -> "MultimodalLM":
        """nn.Module.train, except a frozen vision module stays in eval mode (its features as it was trained, and
        the same every epoch, which the feature cache relies on)."""
        super().train(mode)
        if self.vision is not None and self.vision_frozen:
            self.vision.eval()
        return self

    # ------------------------------------------------------------------------------------------ encoding

    @property
    def vision_frozen(self) -> bool:
        """True when the vision module trains no parameter (its features then need no autograd graph)."""
        if self.vision is None:
            return True
        frozen = getattr(self.vision, "frozen", None)
        if frozen is not None:
            return bool(frozen)
        return not any(p.requires_grad for p in self.vision.parameters())

    def image_ndim(self) -> int:
        """Dimensions of one image for the vision module: 3 ([C, H, W]), or 4 ([C, D, H, W]) for volumes."""
        size = getattr(self.vision, "input_size", None)
        return len(size) + 1 if size is not None else 3

    def flatten_images(self, pixel_values) -> tuple:
        """(images [S * V, *image], V) from a batch's pixel_values: [S, *image] (one image per sample) or
        [S, V, *image] (V views per sample)."""
        if pixel_values is None:
            raise ValueError("pixel_values is None, but the batch has slots that the vision module fills")
        if isinstance(pixel_values, (list, tuple)):
            shapes = {tuple(p.shape) for p in pixel_values}
            if len(shapes) != 1:
                raise ValueError(f"pixel_values: samples have different image shapes {sorted(shapes)}; resize them "
                                 "to one size (the encoder takes one grid per batch)")
            pixel_values = torch.stack(list(pixel_values))
        if not isinstance(pixel_values, Tensor):
            raise ValueError(f"pixel_values must be a tensor or a list of tensors, got {type(pixel_values).__name__}")
        ndim = self.image_ndim()
        if pixel_values.dim() == ndim + 1:
            return pixel_values, 1
        if pixel_values.dim() == ndim + 2:
            return pixel_values.flatten(0, 1), pixel_values.shape[1]
        raise ValueError(f"pixel_values must be [samples, {ndim}-dim image] or [samples, views, {ndim}-dim image] for "
                         f"this vision module, got shape {tuple(pixel_values.shape)}")

    def vision_features(self, images: Tensor, digests: Optional[list] = None) -> VisionFeatures:
        """The encoder's features of images [N, *image]: through the feature cache when given (keyed by `digests`,
        one per image, when the caller hashed them on the host), without autograd when the encoder is frozen."""
        if self.feature_cache is not None:
            return self.feature_cache.features(self.vision, images, digests)
        if self.vision_frozen:
            with torch.no_grad():
                return self.vision(images)
        return self.vision(images)

    def encode(self, pixel_values, sample_digests: Optional[list] = None) -> dict:
        """{slot kind: embeddings}: [S * V, tokens, hidden] for "image" (one per image, sample-major), [S, tokens,
        hidden] for "prompt" / "prefix" (one per sample, from all its views)."""
        if not self.adapters:
            return {}
        images, views = self.flatten_images(pixel_values)
        digests = None
        if sample_digests is not None:  # images are sample-major: view v of sample s is image s * views + v
            digests = [f"{sample_digests[i // views]}-{i % views}" for i in range(images.shape[0])]
        features = self.vision_features(images, digests)
        slots = {}
        for kind, adapter in self.adapters.items():
            source = features if kind in PER_IMAGE_KINDS else per_sample(features, views)
            out = adapter_spec(adapter).call(adapter, source)
            if out.dim() != 3 or out.shape[-1] != self.decoder.config.hidden_size:
                raise ValueError(f"adapters[{kind!r}] ({type(adapter).__name__}) returned shape {tuple(out.shape)}; "
                                 f"expected [slots, tokens, {self.decoder.config.hidden_size}] (the decoder's hidden "
                                 "size)")
            slots[kind] = out
        return slots

    # ------------------------------------------------------------------------------------------ token counts

    def patch_grid(self, image_size: Optional[int] = None) -> tuple:
        """The vision module's patch grid for one image ((h, w), or (d, h, w)). image_size matters for Qwen2-VL
        towers only (any multiple of patch * merge, default 448); for fixed-size encoders it must be theirs."""
        if isinstance(self.vision, VisionTower) and self.vision.family == "qwen2_vl":
            size = self.vision.image_config(image_size).size  # validates the size against the checkpoint
            side = size // self.vision.patch_size
            return (side // self.vision.merge_size,) * 2 if self.vision.merged else (side, side)
        if isinstance(self.vision, VisionTower):
            fixed, grid = (self.vision.image_size,) * 2, (self.vision.image_size // self.vision.patch_size,) * 2
        else:
            fixed, grid = getattr(self.vision, "input_size", None), getattr(self.vision, "grid", None)
        if grid is None:
            raise ValueError(f"cannot tell the patch grid of vision module {type(self.vision).__name__}; it needs a "
                             "`grid` attribute")
        if image_size is not None and fixed is not None and set(fixed) != {image_size}:
            raise ValueError(f"image_size={image_size}: {type(self.vision).__name__} takes inputs of size "
                             f"{tuple(fixed)} only")
        return tuple(grid)

    def slot_grid(self, kind: str, image_size: Optional[int] = None) -> tuple:
        """The token grid one slot of `kind` gets from its adapter (a 2-tuple (h, w) for spatial image tokens)."""
        if kind not in self.adapters:
            raise ValueError(f"no adapter fills {kind!r} slots; this model has {sorted(self.adapters)}")
        adapter = self.adapters[kind]
        return tuple(adapter_spec(adapter).grid(adapter, self.patch_grid(image_size)))

    def slot_tokens(self, kind: str, image_size: Optional[int] = None) -> int:
        """How many tokens each slot of `kind` needs (PeFoMed: 1024 patches / 4 = 256 per image)."""
        return math.prod(self.slot_grid(kind, image_size))

    def builder_kwargs(self, template: Union[str, PromptTemplate], views: int = 1,
                       image_size: Optional[int] = None) -> dict:
        """PromptBuilder keyword arguments (image_tokens, prompt_tokens, prefix_tokens) for this model under
        `template`, with `views` images per sample; M-RoPE templates get (1, h, w) grids."""
        template = get_template(template)
        kinds = template.slot_kinds()
        if kinds != set(self.adapters):
            raise ValueError(f"template {template.name!r} has slots {sorted(kinds)} but the model has adapters for "
                             f"{sorted(self.adapters)}")
        out = {}
        if "image" in kinds:
            grid = self.slot_grid("image", image_size)
            if template.mrope:
                if len(grid) != 2:
                    raise ValueError(f"template {template.name!r} uses M-RoPE, which needs a 2D image token grid; "
                                     f"the image adapter gives {grid}")
                entry = (1, *grid)
            else:
                entry = math.prod(grid)
            out["image_tokens"] = [entry] * views
        for kind in ("prompt", "prefix"):
            if kind in kinds:
                out[f"{kind}_tokens"] = self.slot_tokens(kind, image_size)
        return out

    # ------------------------------------------------------------------------------------------ forward

    def splice(self, embeds: Tensor, spans: Sequence[PlacedSpan], pixel_values,
               slot_index: Optional[dict] = None, sample_digests: Optional[list] = None) -> Tensor:
        """embeds [rows, seq, hidden] with each slot's adapter output written at its span (out of place, so
        gradients reach both the token embeddings and the adapters). A static batch gives `slot_index` ({kind:
        flat positions}, built on the host) instead of spans; its padded samples write to one scratch row past
        the stream, dropped afterwards."""
        kinds = set(slot_index) if slot_index is not None else {s.kind for s in spans}
        unfilled, missing = kinds - set(self.adapters), set(self.adapters) - kinds
        if unfilled:
            raise ValueError(f"the batch has {sorted(unfilled)} slots but the model has adapters only for "
                             f"{sorted(self.adapters)}")
        if missing:
            raise ValueError(f"the model fills {sorted(missing)} slots but the batch has none; build prompts with a "
                             "template that has those placeholders")
        if not kinds:
            return embeds
        slots = self.encode(pixel_values, sample_digests)
        rows, seq, hidden = embeds.shape
        flat = embeds.reshape(rows * seq, hidden)
        if slot_index is not None:
            flat = torch.cat([flat, flat.new_zeros(1, hidden)])
        for kind, values in slots.items():
            if slot_index is None:
                index = slot_index_of(spans, kind, values.shape[0], values.shape[1], flat.device)
            else:
                index = slot_index[kind]
                if index.numel() != values.shape[0] * values.shape[1]:
                    raise ValueError(f"the static batch has {index.numel()} {kind} slot positions but the adapter "
                                     f"makes {values.shape[0]} x {values.shape[1]}; pad pixel_values with make_static")
            flat = flat.index_copy(0, index, values.reshape(-1, hidden).to(flat.dtype))
        return flat[:rows * seq].view(rows, seq, hidden)

    def embed_batch(self, batch: PackedBatch) -> Tensor:
        """The batch's inputs_embeds [rows, budget, hidden] with the slots filled."""
        embeds = self.decoder.embed(batch.input_ids)
        return self.splice(embeds, batch.spans, batch.pixel_values, batch.slot_index, batch.image_digests)

    def forward(self, batch: PackedBatch) -> Tensor:
        """The decoder's final normed hidden states [rows, budget, hidden] of a PackedBatch (SFT or DPO)."""
        if not isinstance(batch, PackedBatch):
            raise ValueError(f"MultimodalLM.forward takes a PackedBatch, got {type(batch).__name__}")
        return self.decoder(inputs_embeds=self.embed_batch(batch), **batch.decoder_inputs())

    # ------------------------------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, prompts: Sequence[Union[TokenizedSample, TokenizedPair]], pixel_values=None,
                 max_new_tokens: int = 32, num_beams: int = 1, eos_token_id=None, **kwargs) -> list:
        """New token ids per prompt (list of lists) for PromptBuilder outputs: TokenizedSamples (only the prompt,
        input_ids[:prompt_length], is read, so encode(instruction, answer="") works) or TokenizedPairs, with
        their pixel_values in prompt order; kwargs (length_penalty, early_stopping) go to models.generate.
        Dropout (LoRA's too) follows the model's mode: call model.eval() first."""
        ids, spans = prompt_parts(prompts)
        mrope = self.decoder.config.mrope_section is not None
        device = self.decoder.model.embed_tokens.weight.device
        width = max(len(p) for p in ids)
        padded = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        positions = torch.zeros((3, len(ids), width) if mrope else (len(ids), width), dtype=torch.long)
        placed = []
        for row, (row_ids, row_spans) in enumerate(zip(ids, spans)):
            n = len(row_ids)
            padded[row, :n] = torch.as_tensor(row_ids)
            mask[row, :n] = 1
            positions[..., row, :n] = sequence_positions(n, row_spans, mrope)
            placed += [PlacedSpan(s.kind, row, s.index, row * width + s.start, s.length, s.grid) for s in row_spans]
        embeds = self.splice(self.decoder.embed(padded.to(device)), placed, pixel_values)
        return generate(self.decoder, inputs_embeds=embeds, attention_mask=mask.to(device),
                        position_ids=positions.to(device), max_new_tokens=max_new_tokens, num_beams=num_beams,
                        eos_token_id=eos_token_id, **kwargs)

    # ------------------------------------------------------------------------------------------ checkpoints

    def trainable_state_dict(self) -> dict:
        """The trainable weights outside the decoder (adapters, a trainable vision module), detached, keyed by
        their path in this model ("adapters.image.proj.weight", "vision.blocks.0...."); LoRA lives in the decoder
        and is saved by mrgfast.peft."""
        return {name: p.detach() for name, p in self.named_parameters()
                if p.requires_grad and not name.startswith("decoder.")}

    def load_trainable_state_dict(self, state_dict: dict) -> None:
        """Copy weights saved by trainable_state_dict into this model; ValueError naming missing or unexpected
        keys, or a shape mismatch."""
        params = dict(self.named_parameters())
        check_named_shapes(state_dict, params, self.trainable_state_dict(), "load_trainable_state_dict")
        with torch.no_grad():
            for name, value in state_dict.items():
                params[name].copy_(value)


def slot_index_of(spans: Sequence[PlacedSpan], kind: str, slots: int, tokens: int, device) -> Tensor:
    """Flat positions of every `kind` slot token, by sample then slot, checked against the adapter output of
    `slots` x `tokens`: ValueError naming the kind and the counts when they differ."""
    ordered = spans_in_order(spans, kind)
    if len(ordered) != slots:
        raise ValueError(f"the batch has {len(ordered)} {kind} slot(s) but pixel_values give {slots} (one per "
                         f"{'image' if kind in PER_IMAGE_KINDS else 'sample'}); check pixel_values against the samples")
    wrong = [s for s in ordered if s.length != tokens]
    if wrong:
        raise ValueError(f"{kind} slot of sample {wrong[0].sample} has {wrong[0].length} placeholder tokens but the "
                         f"adapter makes {tokens}; build prompts with MultimodalLM.builder_kwargs / slot_tokens")
    # Spans are Python objects: the index is built on the host and copied once, no device sync.
    return span_positions(ordered).to(device, non_blocking=True)


def prompt_parts(prompts) -> tuple:
    """(ids, spans) of each prompt's prompt part; ValueError for other inputs or spans outside the prompt."""
    if isinstance(prompts, (TokenizedSample, TokenizedPair)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("generate: prompts must be a non-empty list of TokenizedSample / TokenizedPair (what "
                         f"PromptBuilder gives), got {type(prompts).__name__}")
    ids, spans = [], []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, TokenizedSample):
            row = list(prompt.input_ids[:prompt.prompt_length])
        elif isinstance(prompt, TokenizedPair):
            row = list(prompt.prompt_ids)
        else:
            raise ValueError(f"generate: prompts[{i}] is a {type(prompt).__name__}, expected a TokenizedSample or "
                             "TokenizedPair from PromptBuilder")
        if not row:
            raise ValueError(f"generate: prompts[{i}] ({prompt.sample_id!r}) has an empty prompt")
        for span in prompt.spans:
            if span.start + span.length > len(row):
                raise ValueError(f"generate: prompts[{i}] has a {span.kind} span past its prompt end {len(row)}")
        ids.append(row)
        spans.append(tuple(prompt.spans))
    return ids, spans


def check_named_shapes(state: dict, params: dict, expected, source: str) -> None:
    """ValueError naming `source` unless `state` holds exactly the `expected` names, each at the shape of the
    parameter of that name in `params` (full shapes: a DTensor's shape is its global one)."""
    expected = set(expected)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{source}: missing keys {few(missing) or 'none'}; "
                         f"unexpected keys {few(unexpected) or 'none'}")
    for name, value in state.items():
        if tuple(value.shape) != tuple(params[name].shape):
            raise ValueError(f"{source}: {name} has shape {tuple(value.shape)}, the model expects "
                             f"{tuple(params[name].shape)}")
