"""Tokenizers from a model directory (HF tokenizer.json, or transformers for slow-only files) and the demo's own."""

import json
from pathlib import Path
from typing import Iterable, Optional, Sequence

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# Files from which transformers can build a tokenizer when there is no tokenizer.json.
SLOW_FILES = ("tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")
SPECIAL_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")

# Every special token a prompt template of mrgfast.data.prompts places: Llama-2 and Qwen2-VL markers and the
# placeholders whose positions the adapters' tokens replace. The demo tokenizer has all of them.
DEMO_SPECIAL_TOKENS = (
    "<pad>", "<s>", "</s>", "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|image_pad|>", "<ImageHere>", "<PromptHere>", "<PrefixHere>",
)
# Template markers a real Llama-2 tokenizer splits into pieces; the demo gives each one id (plain added tokens).
DEMO_MARKERS = ("[INST]", "[/INST]", "<Img>", "</Img>", "[vqa]", "[report]", "[caption]")
DEMO_VOCAB_SIZE = 1024


def _token_text(value) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: a string, an AddedToken dict, or null."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Encode/decode with the ids of the special tokens the prompt templates need, over either backend.

    `encode` never adds special tokens on its own: templates place bos/eos explicitly, so the same template
    gives the same ids with any tokenizer. Special tokens written in the text (`<|im_start|>`) are
    recognised as the backend recognises them.
    """

    def __init__(self, backend, specials: dict, source: str):
        self.backend = backend
        self.source = source
        self.fast = not hasattr(backend, "convert_tokens_to_ids")  # a tokenizers.Tokenizer, not transformers'
        self.specials = {role: specials.get(role) for role in SPECIAL_ROLES}

    def encode(self, text: str) -> list:
        """Token ids of `text`, without added bos/eos."""
        if self.fast:
            return list(self.backend.encode(text, add_special_tokens=False).ids)
        return list(self.backend.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of token ids."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        """The id of a token written as one vocabulary entry (e.g. a special token), or None if it has none."""
        if self.fast:
            return self.backend.token_to_id(token)
        ids = self.backend.convert_tokens_to_ids([token])
        unk = self.backend.unk_token_id
        return None if not ids or ids[0] is None or (ids[0] == unk and token != self.backend.unk_token) else ids[0]

    def require_id(self, token: str, what: str) -> int:
        """The id of `token`, or ValueError naming the tokenizer and what needed it."""
        token_id = self.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer {self.source}: has no token {token!r} (needed for {what})")
        return token_id

    def _special_id(self, role: str) -> Optional[int]:
        """The id of the special token in `role` ("bos_token", ...), or None when the tokenizer names none."""
        token = self.specials[role]
        return None if token is None else self.token_to_id(token)

    @property
    def bos_token_id(self) -> Optional[int]:
        """The beginning-of-sequence id, or None (Qwen2 tokenizers have none)."""
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> Optional[int]:
        """The end-of-sequence id, or None."""
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> Optional[int]:
        """The padding id: the pad token, else eos (padding is never attended by real tokens nor labelled, so
        any valid id works; eos is the usual stand-in, as TRL uses it)."""
        pad = self._special_id("pad_token")
        return self.eos_token_id if pad is None else pad

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        if self.fast:
            return self.backend.get_vocab_size(with_added_tokens=True)
        return len(self.backend)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, {self.specials})"


def read_special_tokens(model_dir: Path) -> dict:
    """bos/eos/pad/unk token strings from tokenizer_config.json, then special_tokens_map.json for gaps."""
    found = {}
    for name in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP):
        path = model_dir / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(config, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
        for role in SPECIAL_ROLES:
            if found.get(role) is None:
                found[role] = _token_text(config.get(role))
    return found


def load_tokenizer(model_dir) -> Tokenizer:
    """The tokenizer of an HF model directory: tokenizer.json through `tokenizers`, else transformers'
    AutoTokenizer for slow-only files (sentencepiece tokenizer.model, vocab.json, ...)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"tokenizer directory not found: {model_dir}")
    specials = read_special_tokens(model_dir)
    if (model_dir / TOKENIZER_JSON).is_file():
        from tokenizers import Tokenizer as FastTokenizer
        try:
            backend = FastTokenizer.from_file(str(model_dir / TOKENIZER_JSON))
        except Exception as err:  # tokenizers raises a bare Exception on a malformed file
            raise ValueError(f"{model_dir / TOKENIZER_JSON}: cannot be read as a tokenizer ({err})") from err
        return Tokenizer(backend, specials, str(model_dir))
    if not any((model_dir / name).is_file() for name in SLOW_FILES):
        raise ValueError(f"{model_dir}: no tokenizer files found; expected {TOKENIZER_JSON} or one of {SLOW_FILES}")
    from transformers import AutoTokenizer
    backend = AutoTokenizer.from_pretrained(str(model_dir))
    for role in SPECIAL_ROLES:
        if specials.get(role) is None:
            specials[role] = getattr(backend, role, None)
    return Tokenizer(backend, specials, str(model_dir))


def build_demo_tokenizer(texts: Iterable[str], out_dir, vocab_size: int = DEMO_VOCAB_SIZE) -> Tokenizer:
    """Train a small byte-level BPE tokenizer on `texts`, save tokenizer.json + tokenizer_config.json under
    `out_dir` (loadable by load_tokenizer and by transformers), and return it loaded.

    Deterministic: the same texts in the same order give the same files. Byte-level BPE decodes any
    generated ids back to exact text, and with the Llama-2 and Qwen2-VL markers and the placeholders as
    added tokens every prompt template of mrgfast.data.prompts works with it.
    """
    from tokenizers import Tokenizer as FastTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    texts = [str(t) for t in texts]
    if not texts:
        raise ValueError("build_demo_tokenizer: texts is empty; pass the reports, questions and answers to learn")
    backend = FastTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(DEMO_SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    backend.add_tokens(list(DEMO_MARKERS))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backend.save(str(out_dir / TOKENIZER_JSON))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": 4096,
              "clean_up_tokenization_spaces": False}
    (out_dir / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    return load_tokenizer(out_dir)
