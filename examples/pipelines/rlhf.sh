#!/usr/bin/env bash
# Classic RLHF (Ouyang et al. 2022): SFT, a reward model from the SFT model, then PPO against that reward model.
source "$(dirname "$0")/common.sh"
stage sft sft_full
stage reward reward_full --model.model="${OUT}/sft/export" --data.tokenizer="${OUT}/sft/export"
stage ppo ppo_lora --model.policy="${OUT}/sft/export" --model.reward="${OUT}/reward/export" \
  --model.whiten_scores=true --data.tokenizer="${OUT}/sft/export"
