#!/usr/bin/env bash
# SFT, then DPO from the SFT model (its export is the policy and, frozen, the reference).
source "$(dirname "$0")/common.sh"
stage sft sft_full
stage dpo dpo_full --model.model="${OUT}/sft/export" --data.tokenizer="${OUT}/sft/export"
