from lightning_align.callbacks.lora import LoRA, QLoRA

__all__ = ["LoRA", "QLoRA"]
