"""mrgfast: a fast, lean training engine for parameter-efficient fine-tuning of medical multimodal LLMs."""

__version__ = "0.1.0"
