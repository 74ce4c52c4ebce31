"""Random-weight LoRA adapters: stand-ins for trained ones where only speed or plumbing is measured."""

from __future__ import annotations

from pathlib import Path


def random_lora(model_path: Path, out: Path, *, seed: int, rank: int = 8, scale: float = 1.0,
                targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")) -> Path:
    """A PEFT LoRA folder with non-zero random weights, so its answers differ from the base model's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank * 2, target_modules=list(targets),
                                                  init_lora_weights=False))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(scale)
    peft_model.save_pretrained(str(out))
    return out
