"""Method `recompute`: the chosen blocks (and only they) run twice per step, and the loss and every
gradient are the same as without recomputation, on all four tiny architectures."""

from __future__ import annotations

import pytest
import torch

from leantune.config import load_config
from leantune.methods import MethodContext, apply_methods
from leantune.methods.recompute import RecomputeConfig, chosen_blocks
from leantune.models.loader import load_model
from leantune.models.structure import find_blocks
from leantune.recipes.train import run_train
from tests.conftest import cli_err

TASKS = {"bert": "classification", "gpt2": "causal_lm", "llama": "causal_lm", "t5": "seq2seq"}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _loss_and_grads(path, arch: str, methods: str) -> tuple[float, dict[str, torch.Tensor], list[int]]:
    """One training forward/backward with dropout on; also how often each block's first leaf layer ran."""
    torch.manual_seed(0)
    task = TASKS[arch]
    model = load_model(str(path), task, "float32", ["neg", "pos"] if arch == "bert" else None)
    model = apply_methods(model, load_config(None, [f"methods={methods}"]).methods, MethodContext(task, 0))
    _, blocks = find_blocks(model)
    calls = [0] * len(blocks)
    for i, block in enumerate(blocks):
        first = next(
            m for m in block.modules() if not any(m.children()) and any(True for _ in m.parameters())
        )
        first.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    ids = 1000 + torch.randint(0, 200, (4, 10), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 0, 1]) if arch == "bert" else ids
    model.train()
    torch.manual_seed(2)  # same dropout masks for both runs
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, calls


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "t5"])
def test_recomputing_a_subset_of_blocks_gives_the_same_loss_and_gradients(tiny_models, arch):
    subset = "[0, -1]" if arch != "t5" else "[1]"  # the tiny T5 encoder has 2 blocks, the others 3
    loss, grads, calls = _loss_and_grads(tiny_models[arch], arch, "[full]")
    loss_rc, grads_rc, calls_rc = _loss_and_grads(
        tiny_models[arch], arch, f"[full, {{name: recompute, blocks: {subset}}}]"
    )
    assert calls == [1] * len(calls)
    expected = [2, 1, 2] if arch != "t5" else [1, 2]  # recomputed blocks run again in the backward
    assert calls_rc == expected
    assert abs(loss - loss_rc) <= 1e-6
    assert grads.keys() == grads_rc.keys() and len(grads) > 10
    assert max((grads[n] - grads_rc[n]).abs().max().item() for n in grads) <= 1e-6


def test_block_choices():
    assert chosen_blocks(RecomputeConfig(every=2), 6) == [0, 2, 4]
    assert chosen_blocks(RecomputeConfig(every=4), 6) == [0, 4]
    assert chosen_blocks(RecomputeConfig(all=True), 3) == [0, 1, 2]
    assert chosen_blocks(RecomputeConfig(blocks=[-1, 0, 2]), 3) == [0, 2]


def test_recompute_with_lora_trains_bit_identically_and_reports_its_blocks(base_overrides, tmp_path):
    overrides = [*base_overrides, "train.max_steps=4", "train.save_every=null"]
    plain = run_train(load_config(None, [*overrides, "methods=[lora]"]))
    rc = load_config(
        None,
        [*overrides, "methods=[{name: recompute, every: 2}, lora]", f"output.dir={tmp_path / 'rc'}"],
    )
    recomputed = run_train(rc)
    assert recomputed["method_reports"]["recompute"] == {
        "stack": "base_model.model.bert.encoder.layer",
        "blocks": [0, 2],
        "recomputed": 2,
        "of": 3,
    }
    assert recomputed["weights_sha256_per_rank"] == plain["weights_sha256_per_rank"]
    assert recomputed["validation"]["loss"] == plain["validation"]["loss"]


@pytest.mark.parametrize(
    "method,expected",
    [
        ("{name: recompute, blocks: [3]}", "block index 3 is out of range for a model with 3 blocks"),
        ("{name: recompute, blocks: [-4]}", "out of range"),
        ("{name: recompute}", "set exactly one of"),
        ("{name: recompute, every: 2, all: true}", "set exactly one of"),
        ("{name: recompute, every: 0}", "every"),
    ],
)
def test_bad_recompute_configs_are_one_line_user_errors(capsys, base_overrides, tmp_path, method, expected):
    line = cli_err(capsys, "train", *base_overrides, f"methods=[{method}, lora]")
    assert expected in line
    assert not (tmp_path / "run").exists()
