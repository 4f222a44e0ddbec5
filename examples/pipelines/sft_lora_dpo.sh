#!/usr/bin/env bash
# SFT with LoRA, then DPO that continues the SFT adapter: the reference is the SFT model (base + the adapter as
# it was at the start, kept as a frozen adapter copy), never the bare base, and no second copy of the base.
source "$(dirname "$0")/common.sh"
stage sft sft_lora
stage dpo dpo_full --trainer.callbacks+=lightning_align.LoRA --trainer.callbacks.init_adapter="${OUT}/sft/adapter"
