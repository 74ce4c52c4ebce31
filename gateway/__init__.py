"""PromptIntern gateway: serve recurring prompts from LoRA adapters."""

__version__ = "0.1.0"
