#!/usr/bin/env bash
# SFT, then DPO with QLoRA on the SFT model: a 4-bit base, the adapter-disabled base as the reference.
source "$(dirname "$0")/common.sh"
stage sft sft_full
stage dpo dpo_qlora --model.model="${OUT}/sft/export" --data.tokenizer="${OUT}/sft/export"
