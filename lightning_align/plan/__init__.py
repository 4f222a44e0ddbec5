"""Will it fit? The peak memory per device of a training run, planned before launch without any weights.

The planner builds the run's model from its `config.json` on fake tensors (shapes and dtypes, no storage) and runs
one training step of the method module's own code on them (`step_losses`: the same scoring and loss functions
its training step runs, on a batch of the method's kind whose layout is real and whose weights are fake), the
reference's no-grad forward, backward, and the AdamW step, while PyTorch's `MemTracker` accounts every tensor.
The step runs in Lightning's order (the previous step's gradients are released after the next forward), on a
micro-batch of rows as long as `max_length` (the longest batch sets the peak). Added by formula, each documented
where it is computed, is only what a fake run cannot see: 4-bit NF4 storage, the weights of models held beside the
policy (reference copy, reward model, critic), generation's KV cache, what a sharding strategy divides, and on GPUs
the CUDA context and allocator slack.

Files: `spec` (what a run is, from a config or a live run), `step` (the measured step), `formulas` (what is
added on top), `report` (the plan, the cheapest change that fits, the command).

    lightning-align plan --config examples/configs/dpo_qlora.yaml --device-memory 24GiB
    lightning-align plan --config examples/configs/sft_lora.yaml --model path/to/config.json --max-length 4096
"""

from lightning_align.plan.formulas import GIB, MIB, gib, nf4_bytes
from lightning_align.plan.report import changes, cheapest_fit, main, plan_run
from lightning_align.plan.spec import Plan, RunSpec, load_config, parse_bytes, spec_from_config, spec_from_run
from lightning_align.plan.step import measure, measure_step, uniform_layers

__all__ = [
    "GIB",
    "MIB",
    "Plan",
    "RunSpec",
    "changes",
    "cheapest_fit",
    "gib",
    "load_config",
    "main",
    "measure",
    "measure_step",
    "nf4_bytes",
    "parse_bytes",
    "plan_run",
    "spec_from_config",
    "spec_from_run",
    "uniform_layers",
]
