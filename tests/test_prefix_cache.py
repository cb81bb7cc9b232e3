"""The frozen-prefix cache: k is found from requires_grad alone, the cached run computes the same losses
as one that runs the (eval-mode) prefix every time, the prefix really is skipped after an example's first
pass, its size is what it holds, and `--resume` rebuilds it without changing the result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pytest
import torch
from safetensors.torch import load_file

import leantune.train.prefix_cache as prefix_cache
from leantune.config import load_config
from leantune.errors import UserError
from leantune.methods import MethodContext, apply_methods
from leantune.methods.registry import MethodConfig, MethodRuntime, MethodSpec, available_methods, register
from leantune.models.loader import load_model
from leantune.models.structure import embedding_modules, find_blocks
from leantune.recipes.train import run_train
from leantune.runfolder import is_own
from leantune.train.prefix_cache import PrefixCache, frozen_prefix_depth

FREEZE_2 = "methods=[{name: freeze, layers: 2}]"


def _model_with(path: Path, task: str, *methods: str):
    cfg = load_config(None, [f"task={task}", f"methods=[{', '.join(methods)}]", "data.label_column=label"])
    model = load_model(str(path), task, label_names=["neg", "pos"], pad_token_id=0)
    return apply_methods(model, cfg.methods, MethodContext(task=task, seed=0))


@pytest.mark.parametrize(
    ("methods", "k"),
    [
        (["{name: freeze, layers: 2}"], 2),
        (["{name: freeze, layers: 3}"], 3),
        (["{name: lora, target_modules: [layer.2.attention.self.query, layer.2.attention.self.value]}"], 2),
        (["{name: lora, target_modules: [query, value]}"], 0),
        (["full"], 0),
        (["{name: freeze, layers: 2, embeddings: false}"], 0),
    ],
)
def test_depth_is_the_frozen_prefix(tiny_models, methods, k):
    model = _model_with(tiny_models["bert"], "classification", *methods)
    depth, reason = frozen_prefix_depth(model)
    assert depth == k
    assert bool(reason) == (k == 0)


def test_encoder_decoder_is_a_no_op_and_seq2seq_a_user_error(tiny_models):
    model = load_model(str(tiny_models["t5"]), "seq2seq")
    for p in model.parameters():
        p.requires_grad_(False)
    assert frozen_prefix_depth(model)[0] == 0
    with pytest.raises(UserError, match="cache_frozen_prefix"):
        load_config(None, ["task=seq2seq", "train.cache_frozen_prefix=true"])


def test_served_batch_equals_computed_one_and_really_comes_from_the_cache(tiny_models):
    """Capture in one batch composition, serve in another (other padding): same loss; corrupt the cache:
    another loss. Dropout in the upper blocks is on, so both passes draw from the same seed."""
    model = _model_with(tiny_models["bert"], "classification", "{name: freeze, layers: 2}")
    model.train()
    cache = PrefixCache(model)
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 9, 3, 12, 7, 4]
    rows = [torch.randint(1000, 2000, (n,), generator=gen) for n in lengths]

    def batch(order: list[int]) -> dict[str, torch.Tensor]:
        width = max(lengths[i] for i in order)
        ids = torch.zeros(len(order), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, i in enumerate(order):
            ids[j, : lengths[i]], mask[j, : lengths[i]] = rows[i], 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([i % 2 for i in order])}

    def loss(order: list[int]) -> float:
        b = batch(order)
        torch.manual_seed(1)
        with cache.micro_batch(order, b["attention_mask"]), torch.no_grad():
            return float(model(**b).loss)

    for order in ([0, 1, 2], [3, 4, 5]):
        loss(order)  # first sight: computed and stored
    assert cache.misses == 2 and cache.hits == 0
    assert [len(cache.states[i]) for i in range(6)] == lengths
    mixed = [4, 0, 3]
    cache.states, stored = {}, cache.states
    computed = loss(mixed)  # nothing cached: runs the real prefix
    cache.states = stored
    served = loss(mixed)
    assert cache.hits == 1
    assert served == pytest.approx(computed, abs=1e-6)
    cache.states = {i: torch.randn(t.shape, generator=gen) for i, t in stored.items()}
    assert abs(loss(mixed) - computed) > 1e-3


def _run_losses(overrides: list[str], run: Path) -> tuple[list[float], dict]:
    summary = run_train(load_config(None, [*overrides, "train.log_every=1", f"output.dir={run}"]))
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [ln["loss"] for ln in lines if "loss" in ln and ln.get("split") is None], summary


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_cached_loss_curve_equals_uncached(arch, tiny_models, base_overrides, tmp_path, monkeypatch):
    overrides = [*base_overrides, FREEZE_2, "train.cache_frozen_prefix=true"]
    if arch != "bert":  # causal LM on the same texts; few rows, the 30k-word LM head dominates the time
        overrides += [
            f"model.name={tiny_models[arch]}",
            "task=causal_lm",
            "data.label_column=null",
            "data.max_train_samples=48",
            "data.max_eval_samples=16",
            "model.max_length=12",
        ]
    cached, summary = _run_losses(overrides, tmp_path / "cached")
    report = summary["train"]["prefix_cache"]
    assert report["frozen_blocks"] == 2
    batches = -(-summary["data"]["train"] // 16)
    assert report["micro_batches_computed"] == batches  # epoch 0 only
    assert report["micro_batches_from_cache"] == 2 * batches
    monkeypatch.setattr(prefix_cache, "SERVE_FROM_CACHE", False)
    computed, summary = _run_losses(overrides, tmp_path / "computed")
    assert summary["train"]["prefix_cache"]["micro_batches_from_cache"] == 0
    assert len(cached) == len(computed) == 3 * batches
    assert cached == pytest.approx(computed, abs=1e-5)
    assert computed[-1] < computed[0]  # it learns: the comparison is between moving curves


class CountConfig(MethodConfig):
    name: Literal["test_prefix_counter"] = "test_prefix_counter"


class CountRuntime(MethodRuntime):
    """Counts forward calls of the real prefix modules and of block k during training steps, per epoch."""

    def __init__(self) -> None:
        self.in_step, self.epoch = False, 0
        self.prefix: dict[int, int] = {}
        self.block_k: dict[int, int] = {}
        self.prefix_outside_steps = 0

    def on_train_start(self, trainer) -> None:
        model = trainer.module
        _, blocks = find_blocks(model)
        prefix = [m for _, m in embedding_modules(model)] + list(blocks[:2])
        for m in prefix:
            m.register_forward_hook(lambda *_: self._count(self.prefix))
        blocks[2].register_forward_hook(lambda *_: self._count(self.block_k))

    def _count(self, counts: dict[int, int]) -> None:
        if self.in_step:
            counts[self.epoch] = counts.get(self.epoch, 0) + 1
        elif counts is self.prefix:
            self.prefix_outside_steps += 1

    def on_step_start(self, trainer) -> None:
        self.in_step, self.epoch = True, trainer.state.epoch

    def on_step_end(self, trainer) -> None:
        self.in_step = False


COUNTERS: list[CountRuntime] = []
if "test_prefix_counter" not in available_methods():
    register(
        MethodSpec(
            "test_prefix_counter",
            CountConfig,
            lambda model, cfg, ctx: model,
            runtime=lambda model, cfg, ctx: COUNTERS.append(CountRuntime()) or COUNTERS[-1],
        )
    )


def test_prefix_is_skipped_after_the_first_epoch_and_its_size_is_reported(
    base_overrides, tmp_path, monkeypatch
):
    import leantune.train.loop as loop

    monkeypatch.setattr(loop, "host_available_bytes", lambda: 10**9)  # the default bound: 0.25 of it
    cfg = load_config(
        None,
        [
            *base_overrides,
            "methods=[{name: freeze, layers: 2}, test_prefix_counter]",
            "train.cache_frozen_prefix=true",
        ],
    )
    summary = run_train(cfg)
    counter = COUNTERS[-1]
    assert counter.prefix.get(0, 0) > 0 and counter.prefix.get(1, 0) == 0 and counter.prefix.get(2, 0) == 0
    assert all(counter.block_k.get(e, 0) > 0 for e in range(3))  # the upper blocks still run
    assert counter.prefix_outside_steps > 0  # evaluation runs the real prefix
    from leantune.models.loader import load_tokenizer
    from leantune.recipes.train import build_features

    features = build_features(cfg, load_tokenizer(cfg.model.name))["train"]
    tokens = sum(len(f["input_ids"]) for f in features)
    report = summary["train"]["prefix_cache"]
    assert report["cached_examples"] == len(features)
    assert report["cached_tokens"] == tokens
    assert report["bytes"] == tokens * 32 * 4  # hidden size 32, fp32
    assert report["ram_bound_bytes"] == 250_000_000
    assert report["ram_bytes"] == report["bytes"] and report["spilled_examples"] == 0
    assert not (tmp_path / "run" / prefix_cache.SPILL_DIR).exists()  # and no folder left behind
    assert len(summary["train"]["epoch_train_time_s"]) == 3


def test_nothing_frozen_is_a_reported_no_op(base_overrides, capsys):
    summary = run_train(
        load_config(None, [*base_overrides, "train.epochs=1", "train.cache_frozen_prefix=true"])
    )
    assert "has no effect" in capsys.readouterr().err
    assert summary["train"]["prefix_cache"]["active"] is False
    assert summary["train"]["prefix_cache"]["frozen_blocks"] == 0


def test_resume_rebuilds_the_cache_and_ends_with_the_same_weights(base_overrides, tmp_path):
    overrides = [
        *base_overrides,
        FREEZE_2,
        "train.cache_frozen_prefix=true",
        "train.save_every=4",
        "train.keep_checkpoints=20",
    ]
    run_train(load_config(None, overrides))
    run = tmp_path / "run"
    whole = load_file(str(run / "model" / "model.safetensors"))
    # Back to the step-28 checkpoint (epoch 1 of 3, 17 steps per epoch) as if killed there; resume.
    (run / "checkpoints" / "latest").write_text("step-00000028")
    (run / "summary.json").unlink()
    summary = run_train(load_config(None, overrides), resume=True)
    assert summary["train"]["resumed"]
    report = summary["train"]["prefix_cache"]
    assert report["micro_batches_computed"] == 17 + (17 - (28 - 17))  # epoch 1's rest, then the rebuild
    resumed = load_file(str(run / "model" / "model.safetensors"))
    assert whole.keys() == resumed.keys()
    for name, tensor in whole.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=name)


# -- the RAM bound and the spill file ------------------------------------------------------------------
TINY_RAM = "train.prefix_cache_ram=2KiB"  # ~2 of the tiny BERT's examples (tokens x 32 x 4 bytes each)


def test_bounded_cache_keeps_ram_under_the_bound_and_serves_spilled_entries_exactly(tiny_models, tmp_path):
    """Entry by entry, the tensors held in RAM never pass the bound; the rest lie in the file; serving
    a batch of spilled entries gives the very bytes the all-RAM cache gives; close deletes the file."""
    model = _model_with(tiny_models["bert"], "classification", "{name: freeze, layers: 2}")
    model.eval()
    bound, path = 1500, tmp_path / "run" / prefix_cache.SPILL_DIR / "rank0.bin"
    bounded = PrefixCache(model, ram_bytes=bound, spill_path=path)
    unbounded = PrefixCache(model)
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 9, 3, 12, 7, 4, 6, 2]
    rows = [torch.randint(1000, 2000, (n,), generator=gen) for n in lengths]
    for i, n in enumerate(lengths):
        ids, mask = rows[i][None], torch.ones(1, n, dtype=torch.long)
        for cache in (bounded, unbounded):
            with cache.micro_batch([i], mask), torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
        held = sum(t.numel() * t.element_size() for t in bounded.states.values())
        assert held == bounded.ram_used <= bound
    report = bounded.report()
    assert report["ram_examples"] + report["spilled_examples"] == len(lengths)
    assert report["spilled_examples"] > report["ram_examples"] > 0
    assert report["spilled_bytes"] == sum(lengths) * 32 * 4 - report["ram_bytes"]
    assert report["bytes"] == unbounded.report()["bytes"]
    spilled = [i for i in range(len(lengths)) if i not in bounded.states]
    for i in range(len(lengths)):
        assert torch.equal(bounded._entry(i), unbounded.states[i]), i
    assert path.stat().st_size == report["spilled_bytes"]  # read back: flushed
    # a served batch of spilled entries, other padding: the same hidden states reach block 2
    seen: list[torch.Tensor] = []
    _, blocks = find_blocks(model)
    handle = blocks[2].register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    order = spilled[:3]
    width = max(lengths[i] for i in order)
    ids = torch.zeros(len(order), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, i in enumerate(order):
        ids[j, : lengths[i]], mask[j, : lengths[i]] = rows[i], 1
    for cache in (bounded, unbounded):
        with cache.micro_batch(order, mask), torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    handle.remove()
    assert bounded.hits == unbounded.hits == 1
    assert torch.equal(seen[0], seen[1])
    bounded.close()
    assert not path.exists() and not path.parent.exists()
    assert is_own(prefix_cache.SPILL_DIR)  # an overwrite of the run folder removes a stale one
    assert bounded.report()["spilled_bytes"] == report["spilled_bytes"]  # the counts outlive the file


def test_spilled_loss_curve_equals_all_ram_and_uncached(base_overrides, tmp_path, monkeypatch):
    """Most entries spilled: the losses are those of the all-RAM cache, bit for bit, and those of the
    prefix computed every time (the existing tolerance); RAM stays under the bound; the file is gone."""
    overrides = [*base_overrides, FREEZE_2, "train.cache_frozen_prefix=true"]
    spilled, summary = _run_losses([*overrides, TINY_RAM], tmp_path / "spilled")
    report = summary["train"]["prefix_cache"]
    assert report["ram_bound_bytes"] == 2048 and 0 < report["ram_bytes"] <= 2048
    assert report["spilled_examples"] > 10 * report["ram_examples"] > 0
    assert report["ram_bytes"] + report["spilled_bytes"] == report["bytes"]
    assert report["bytes"] == report["cached_tokens"] * 32 * 4
    batches = -(-summary["data"]["train"] // 16)
    assert report["micro_batches_from_cache"] == 2 * batches  # served from the file in epochs 1 and 2
    assert not (tmp_path / "spilled" / prefix_cache.SPILL_DIR).exists()
    in_ram, summary = _run_losses([*overrides, "train.prefix_cache_ram=1GiB"], tmp_path / "ram")
    assert summary["train"]["prefix_cache"]["spilled_examples"] == 0
    assert summary["train"]["prefix_cache"]["ram_bytes"] == report["bytes"]
    monkeypatch.setattr(prefix_cache, "SERVE_FROM_CACHE", False)
    computed, _ = _run_losses([*overrides, TINY_RAM], tmp_path / "computed")
    assert len(spilled) == len(in_ram) == len(computed) == 3 * batches
    assert spilled == in_ram
    assert spilled == pytest.approx(computed, abs=1e-5)
    assert computed[-1] < computed[0]


def test_resume_with_a_spilled_cache_replays_exactly(base_overrides, tmp_path):
    """As test_resume_rebuilds_the_cache_and_ends_with_the_same_weights, with most of the cache spilled
    and what a kill leaves behind: the killed run's spill file (here garbage). The resumed run truncates
    it, rebuilds the cache and ends with the uninterrupted run's weights (same tolerance: after the
    resume, epoch 2 runs the prefix where the uninterrupted run served it, ~1e-7 summation order)."""
    run = tmp_path / "run"
    overrides = [
        *base_overrides,
        FREEZE_2,
        "train.cache_frozen_prefix=true",
        TINY_RAM,
        "train.save_every=4",
        "train.keep_checkpoints=20",
    ]
    full = run_train(load_config(None, overrides))
    assert full["train"]["prefix_cache"]["spilled_examples"] > 0
    whole = load_file(str(run / "model" / "model.safetensors"))
    (run / "checkpoints" / "latest").write_text("step-00000028")  # epoch 1 of 3, 17 steps per epoch
    (run / "summary.json").unlink()
    stale = run / prefix_cache.SPILL_DIR / "rank0.bin"
    stale.parent.mkdir()
    stale.write_bytes(b"\xff" * 100_000)
    summary = run_train(load_config(None, overrides), resume=True)
    assert summary["train"]["resumed"]
    report = summary["train"]["prefix_cache"]
    assert report["micro_batches_computed"] == 17 + (17 - (28 - 17))  # epoch 1's rest, then the rebuild
    assert report["spilled_examples"] > 0
    assert not stale.parent.exists()
    resumed = load_file(str(run / "model" / "model.safetensors"))
    assert whole.keys() == resumed.keys()
    for name, tensor in whole.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=name)
