"""Where our training step's time goes, on a benchmark shape: the timed steps of `benchmarks.compare`'s run under
`torch.profiler`, each operator's own CPU time summed into the step's parts, next to the step's model FLOPs
utilisation (the same count as `compare`) against the matmul peak measured in the same run.

    python -m benchmarks.profile_step --method reward --shape gqa
    python -m benchmarks.profile_step --method sft --shape gqa --peft lora --variant +gradient_checkpointing

The profiler adds a little time to every operator call, so small operators weigh a bit more than they do in an
unprofiled step; the shares, not the seconds, are the result.
"""

from __future__ import annotations

import argparse

from benchmarks import compare

# Each part of the step: operator names (aten) that contain one of these, matched in this order.
PARTS = [
    ("matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul")),
    ("attention kernel", ("attention", "aten::_efficient", "aten::_flash")),
    ("softmax, log-softmax, logsumexp", ("softmax", "logsumexp")),
    ("optimiser (AdamW)", ("adam",)),
    ("copies and layout", ("copy_", "contiguous", "clone", "cat", "index", "gather", "scatter", "to_copy", "fill_")),
    ("norms and activations", ("rsqrt", "pow", "mean", "silu", "sigmoid", "tanh")),
    ("other element-wise", ("mul", "add", "sub", "div", "neg", "where", "exp", "sum", "masked")),
]


def part_of(name: str) -> str:
    lowered = name.lower()
    for part, keys in PARTS:
        if any(key in lowered for key in keys):
            return part
    return "other"


def profile(method: str, peft: str, variant: str) -> tuple[dict[str, float], list[tuple[str, float]], list]:
    import lightning as L
    import torch
    from torch.profiler import ProfilerActivity, schedule

    profiler = torch.profiler.profile(
        activities=[ProfilerActivity.CPU],
        schedule=schedule(wait=0, warmup=compare.WARMUP_STEPS, active=compare.TIMED_STEPS, repeat=1),
    )

    class Profile(L.Callback):
        def on_train_start(self, *args):
            profiler.start()

        def on_train_batch_end(self, *args):
            profiler.step()

        def on_train_end(self, *args):
            profiler.stop()

    folder = compare.build_fixture(compare.fixture_folder())
    steps = compare.run_ours(folder, method, peft, variant, callbacks=[Profile()])
    # Operators nested in another (aten::linear calls aten::mm) count once: self time only.
    totals: dict[str, float] = {}
    ops = []
    for event in profiler.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        totals[part_of(event.key)] = totals.get(part_of(event.key), 0.0) + seconds
        ops.append((event.key, seconds))
    return totals, sorted(ops, key=lambda op: -op[1])[:12], steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["sft", "reward", "dpo", "kto", "orpo"], default="reward")
    parser.add_argument("--peft", choices=["none", "lora"], default="none")
    parser.add_argument("--shape", choices=list(compare.SHAPES), default="gqa")
    parser.add_argument("--variant", default="", help="a lever off ('name') or an option on ('+name'), as compare's")
    args = parser.parse_args()
    compare.use_shape(args.shape)
    import torch

    torch.set_num_threads(2)
    peak = compare.matmul_peak_flops()
    totals, top, steps = profile(args.method, args.peft, args.variant)
    flops = compare.step_model_flops(args.method, args.peft, steps)
    seconds = sum(s for s, _, _ in steps)
    measured = sum(totals.values())
    title = f"{args.method} {args.peft} {args.variant} (shape {args.shape})".replace("  ", " ")
    print(f"\n{title}: {len(steps)} profiled steps, {seconds:.2f} s; matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"model FLOPs utilisation (compare's count, profiler on): {flops / seconds / peak:.1%}")
    matmul = totals.get("matrix products", 0.0)
    print(f"matrix products alone: {flops / matmul / peak:.1%} of the peak, {matmul / measured:.1%} of the step")
    print("| part of the step | seconds | share |\n|---|---:|---:|")
    for part, total in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"| {part} | {total:.2f} | {total / measured:.1%} |")
    print("\n| operator (self time) | seconds | share |\n|---|---:|---:|")
    for name, total in top:
        print(f"| `{name}` | {total:.2f} | {total / measured:.1%} |")


if __name__ == "__main__":
    main()
