"""Shared set-up of the parity suite: the tiny model, a policy moved away from it (so that no loss is at its
starting value), and TRL's trainers built on them, quietly."""

import os

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def policy_folder(tiny_model, tmp_path_factory) -> str:
    """The tiny model with every weight moved by 5% noise (fixed seed), saved with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * parameter.abs().mean() * torch.randn(parameter.shape, generator=generator))
    folder = tmp_path_factory.mktemp("policy")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return str(folder)


def quiet_datasets() -> None:
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()


def trl_args(config_class, tmp_path, **kwargs):
    """A TRL config for CPU, fp32, no logging or saving, one device batch of `per_device_train_batch_size`."""
    quiet_datasets()
    settings = dict(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        bf16=False,
        seed=0,
        dataloader_drop_last=False,
    )
    return config_class(**{**settings, **kwargs})


def gradients(model) -> dict[str, torch.Tensor]:
    """Each trained parameter's gradient, cleared from the model."""
    grads = {}
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            grads[name] = parameter.grad.clone()
            parameter.grad = None
    return grads


def assert_same_gradients(ours: dict, theirs: dict, rtol: float = 1e-4) -> None:
    """Equal gradients, parameter by parameter, relative to the largest entry of TRL's."""
    assert ours.keys() == theirs.keys() and ours
    for name, grad in theirs.items():
        scale = grad.abs().max().clamp(min=1e-12)
        assert (ours[name] - grad).abs().max() <= rtol * scale, name
