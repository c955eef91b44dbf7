"""mrgfast: a fast, lean training engine for parameter-efficient fine-tuning of medical multimodal LLMs."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """mrgfast.patch / mrgfast.unpatch, imported on first access.

    They pull in transformers and PEFT; every `import mrgfast.x` runs this file, so importing them here eagerly
    would make the whole package pay for them.
    """
    if name in ("patch", "unpatch"):
        from mrgfast.integrations import hf
        return getattr(hf, name)
    raise AttributeError(f"module 'mrgfast' has no attribute {name!r}")
