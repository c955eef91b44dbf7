"""Prompt templates of the four recipes and the prompt builder: token ids, answer-only label mask, placeholder spans.

A template is two format strings: `prompt` (everything the model reads before the answer) and `answer`
(the supervised tokens: the answer and its end marker). Fields:

- `{bos}` / `{eos}`: the tokenizer's own bos/eos ids (so one template serves Llama-2 and Llama-3 tokenizers);
- `{images}`: one `image_block` per image, whose `{slot}` expands to that image's visual tokens;
- `{prompt}`: MRG-LLM's instance-specific prompt tokens; `{prefix}`: RAD3D's prefix tokens;
- `{task}`, `{instruction}`, `{answer}` and template defaults such as `{system}`: text.

Text between two non-text fields is encoded as one piece, so the ids are what the recipe's own code
produces: MiniGPT-v2/PeFoMed encodes the text around `<ImageHere>` piece by piece and the answer apart,
and special tokens split byte-level BPE text anyway (Qwen2-VL). Slot positions hold the template's
placeholder token id (or the pad id when the tokenizer has none); the adapter's vectors replace their
embeddings, so the id itself is never read.
"""

import dataclasses
import string
from typing import Optional, Sequence, Union

from mrgfast.data.tokenizer import Tokenizer

SLOT_KINDS = ("image", "prompt", "prefix")
TEXT_FIELDS = ("task", "instruction", "answer")
QWEN2_VL_SYSTEM = "You are a helpful assistant."  # what Qwen2-VL's chat template inserts when no system message


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """How one recipe lays out a sample: prompt and answer format strings, the image wrapper, placeholder tokens."""

    name: str
    prompt: str
    answer: str
    image_block: str = "{slot}"
    placeholders: tuple = (("image", "<ImageHere>"), ("prompt", "<PromptHere>"), ("prefix", "<PrefixHere>"))
    mrope: bool = False  # images need (t, h, w) grids: 3-axis M-RoPE positions follow them
    defaults: tuple = ()  # (field, text) pairs for extra text fields, e.g. ("system", ...)

    def __post_init__(self):
        if self.image_block.count("{slot}") != 1:
            raise ValueError(f"template {self.name!r}: image_block must contain {{slot}} exactly once, "
                             f"got {self.image_block!r}")

    def slot_kinds(self) -> set:
        """The placeholder kinds ("image", "prompt", "prefix") the template has."""
        names = {field for _, field, _, _ in string.Formatter().parse(self.prompt) if field}
        return {"image" if name == "images" else name for name in names} & set(SLOT_KINDS)


TEMPLATES = {
    # PeFoMed (MiniGPT-v2 on Llama-2-chat): `<s>[INST] <Img><ImageHere></Img> [task] instruction [/INST] answer</s>`.
    "pefomed": PromptTemplate("pefomed", prompt="{bos}[INST] {images} [{task}] {instruction} [/INST]",
                              answer="{answer}{eos}", image_block="<Img>{slot}</Img>"),
    # MRG-LLM (no public code): the instance-specific prompt tokens follow the visual tokens (unconfirmed order).
    "mrg_llm": PromptTemplate("mrg_llm", prompt="{bos}[INST] {images}{prompt} [{task}] {instruction} [/INST]",
                              answer="{answer}{eos}", image_block="<Img>{slot}</Img>"),
    # LDP on Qwen2-VL: its chat format, the image as <|vision_start|><|image_pad|>*n<|vision_end|>.
    "qwen2_vl": PromptTemplate(
        "qwen2_vl",
        prompt="<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{images}{instruction}<|im_end|>\n"
               "<|im_start|>assistant\n",
        answer="{answer}<|im_end|>", image_block="<|vision_start|>{slot}<|vision_end|>",
        placeholders=(("image", "<|image_pad|>"), ("prompt", "<PromptHere>"), ("prefix", "<PrefixHere>")),
        mrope=True, defaults=(("system", QWEN2_VL_SYSTEM),)),
    # RAD3D-Prefix (ClipCap-style on Llama-3.2-1B): prefix tokens first, then the instruction (unconfirmed text).
    "rad3d": PromptTemplate("rad3d", prompt="{bos}{prefix}{instruction}", answer=" {answer}{eos}"),
}


@dataclasses.dataclass(frozen=True)
class Span:
    """A run of placeholder tokens: kind ("image", "prompt", "prefix"), first position, length, the image's
    (t, h, w) token grid for M-RoPE (None otherwise), and which image/slot of the sample it is."""

    kind: str
    start: int
    length: int
    grid: Optional[tuple] = None
    index: int = 0

    def shifted(self, offset: int) -> "Span":
        """The same span `offset` positions later."""
        return dataclasses.replace(self, start=self.start + offset)


@dataclasses.dataclass
class TokenizedSample:
    """One sample as token ids: `label_mask[t]` is True where token t is supervised (answer and end marker);
    `spans` are the placeholder runs; the answer starts at `prompt_length`."""

    sample_id: str
    input_ids: list
    label_mask: list
    spans: tuple
    prompt_length: int

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclasses.dataclass
class TokenizedPair:
    """A preference pair: the shared prompt (ids, spans) and the chosen and rejected completions (all supervised)."""

    sample_id: str
    prompt_ids: list
    spans: tuple
    chosen_ids: list
    rejected_ids: list

    def full(self, which: str) -> TokenizedSample:
        """`prompt + chosen` or `prompt + rejected` as one TokenizedSample (what TRL runs)."""
        completion = {"chosen": self.chosen_ids, "rejected": self.rejected_ids}[which]
        return TokenizedSample(self.sample_id, self.prompt_ids + completion,
                               [False] * len(self.prompt_ids) + [True] * len(completion), self.spans,
                               len(self.prompt_ids))


ImageTokens = Union[None, int, Sequence[int], Sequence[Union[int, Sequence[int]]]]


def get_template(template: Union[str, PromptTemplate]) -> PromptTemplate:
    """A template by name (see TEMPLATES) or the PromptTemplate itself."""
    if isinstance(template, PromptTemplate):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; expected one of {sorted(TEMPLATES)} or a "
                         "PromptTemplate")
    return TEMPLATES[template]


def image_slots(template: PromptTemplate, image_tokens: ImageTokens) -> list:
    """One (token count, grid or None) per image from `image_tokens`: an int or a (t, h, w) grid for one image,
    or a list of them for several; M-RoPE templates need grids (their positions follow the grid)."""
    if image_tokens is None:
        entries = []
    elif isinstance(image_tokens, int) or (isinstance(image_tokens, tuple) and len(image_tokens) == 3
                                           and all(isinstance(v, int) for v in image_tokens)):
        entries = [image_tokens]
    else:
        entries = list(image_tokens)
    slots = []
    for entry in entries:
        if isinstance(entry, int) and not isinstance(entry, bool):
            if template.mrope:
                raise ValueError(f"template {template.name!r} uses M-RoPE: give each image's token grid (t, h, w) "
                                 f"after merging, not a count ({entry})")
            grid = None
            count = entry
        elif isinstance(entry, (tuple, list)) and len(entry) == 3 and all(isinstance(v, int) for v in entry):
            grid = tuple(entry)
            count = grid[0] * grid[1] * grid[2]
        else:
            raise ValueError(f"image_tokens entries must be token counts or (t, h, w) grids, got {entry!r}")
        if count <= 0:
            raise ValueError(f"image_tokens: each image needs at least one token, got {entry!r}")
        slots.append((count, grid if template.mrope else None))
    return slots


class PromptBuilder:
    """Turns samples (Sample, MedicalDataset item dicts) into TokenizedSample / TokenizedPair for a template.

    `image_tokens`: the visual tokens the adapter produces per image (an int, a (t, h, w) grid for M-RoPE
    templates, or a list for several images); `prompt_tokens` / `prefix_tokens`: the MRG-LLM prompt and
    RAD3D prefix lengths. Each must be given exactly when the template has that placeholder.
    """

    def __init__(self, tokenizer: Tokenizer, template: Union[str, PromptTemplate], image_tokens: ImageTokens = None,
                 prompt_tokens: int = 0, prefix_tokens: int = 0, fields: Optional[dict] = None):
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.images = image_slots(self.template, image_tokens)
        self.counts = {"prompt": int(prompt_tokens), "prefix": int(prefix_tokens)}
        self.fields = dict(self.template.defaults, **(fields or {}))
        kinds = self.template.slot_kinds()
        given = {"image": bool(self.images), "prompt": self.counts["prompt"] > 0, "prefix": self.counts["prefix"] > 0}
        argument = {"image": "image_tokens", "prompt": "prompt_tokens", "prefix": "prefix_tokens"}
        for kind in SLOT_KINDS:
            if (kind in kinds) != given[kind]:
                has = ("has an" if kind == "image" else "has a") if kind in kinds else "has no"
                raise ValueError(f"template {self.template.name!r} {has} {kind} placeholder: "
                                 f"{argument[kind]} must be {'given (> 0)' if kind in kinds else 'left out'}")
        placeholder = dict(self.template.placeholders)
        self.fill_ids = {}
        for kind in kinds:
            token_id = tokenizer.token_to_id(placeholder[kind])
            self.fill_ids[kind] = tokenizer.pad_token_id if token_id is None else token_id
            if self.fill_ids[kind] is None:
                raise ValueError(f"tokenizer {tokenizer.source}: has neither {placeholder[kind]!r} nor a pad/eos "
                                 f"token to fill the {kind} placeholder with")

    def encode(self, instruction: str, answer: str, task: str = "report", sample_id: str = "") -> TokenizedSample:
        """The ids, label mask and spans of one (instruction, answer) under the template."""
        texts = dict(self.fields, task=task, instruction=instruction, answer=answer)
        prompt_ids, spans = self.render(self.template.prompt, texts, 0)
        answer_ids, answer_spans = self.render(self.template.answer, texts, len(prompt_ids))
        if answer_spans:
            raise ValueError(f"template {self.template.name!r}: the answer part may not hold placeholders")
        return TokenizedSample(sample_id, prompt_ids + answer_ids, [False] * len(prompt_ids) + [True] * len(answer_ids),
                               tuple(spans), len(prompt_ids))

    def __call__(self, sample) -> TokenizedSample:
        """The TokenizedSample of a Sample or a MedicalDataset item."""
        get = _getter(sample)
        return self.encode(get("prompt"), get("answer"), get("task"), str(get("id")))

    def pair(self, sample) -> TokenizedPair:
        """The TokenizedPair of a preference Sample/item (answer = chosen, `rejected` set)."""
        get = _getter(sample)
        if get("rejected") is None:
            raise ValueError(f"sample {get('id')!r} is not a preference pair: it has no rejected answer")
        chosen = self.encode(get("prompt"), get("answer"), get("task"), str(get("id")))
        rejected = self.encode(get("prompt"), get("rejected"), get("task"), str(get("id")))
        n = chosen.prompt_length
        return TokenizedPair(chosen.sample_id, chosen.input_ids[:n], chosen.spans, chosen.input_ids[n:],
                             rejected.input_ids[n:])

    def render(self, fmt: str, texts: dict, offset: int):
        """(ids, spans) of one format string, positions counted from `offset`."""
        ids, spans, pending = [], [], []

        def flush():
            if pending:
                ids.extend(self.tokenizer.encode("".join(pending)))
                pending.clear()

        for literal, field, spec, conversion in string.Formatter().parse(fmt):
            pending.append(literal)
            if field is None:
                continue
            if spec or conversion:
                raise ValueError(f"template {self.template.name!r}: field {{{field}}} may not carry a format spec")
            if field in ("bos", "eos"):
                flush()
                token_id = getattr(self.tokenizer, f"{field}_token_id")
                if token_id is None:
                    raise ValueError(f"tokenizer {self.tokenizer.source}: has no {field} token, which template "
                                     f"{self.template.name!r} places")
                ids.append(token_id)
            elif field == "images":
                for index, (count, grid) in enumerate(self.images):
                    before, after = self.template.image_block.split("{slot}")
                    pending.append(before)
                    flush()
                    spans.append(Span("image", offset + len(ids), count, grid, index))
                    ids.extend([self.fill_ids["image"]] * count)
                    pending.append(after)
            elif field in ("prompt", "prefix"):
                flush()
                spans.append(Span(field, offset + len(ids), self.counts[field]))
                ids.extend([self.fill_ids[field]] * self.counts[field])
            elif field in texts:
                pending.append(str(texts[field]))
            else:
                raise ValueError(f"template {self.template.name!r}: unknown field {{{field}}}; known: bos, eos, "
                                 f"images, prompt, prefix, {', '.join(sorted(texts))}")
        flush()
        return ids, spans


def _getter(sample):
    """A field reader for a Sample (attributes) or a dataset item (dict keys)."""
    if isinstance(sample, dict):
        return sample.get
    return lambda name: getattr(sample, name, None)
