"""The bench's FLOP count follows what a run really computed: 6*N*tokens for full fine-tuning, exactly
less for freeze-k and LoRA, no prefix blocks for tokens served from the frozen-prefix cache, and the
steps a method reports as forward-only or skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from leantune.bench.peak import embeddings_trained, flops_report, honest_flops, recompute_flops
from leantune.config import load_config
from leantune.methods import MethodContext, apply_methods
from leantune.models.flop_profile import flop_profile
from leantune.models.loader import load_model
from leantune.recipes.train import run_train

TOKENS = 1000.0


def _profile(path, *methods: str) -> tuple[dict, object]:
    cfg = load_config(None, [f"methods=[{', '.join(methods)}]", "data.label_column=label"])
    model = load_model(str(path), "classification", label_names=["neg", "pos"], pad_token_id=0)
    model = apply_methods(model, cfg.methods, MethodContext(task="classification", seed=0))
    return flop_profile(model), model


def _summary(steps: int = 10, **reports) -> dict:
    return {"train": {"steps": steps}, "method_reports": reports}


def test_full_fine_tuning_is_six_n_tokens(tiny_models):
    profile, model = _profile(tiny_models["bert"], "full")
    lookups = sum(m.weight.numel() for m in model.modules() if type(m).__name__ == "Embedding")
    n = sum(p.numel() for p in model.parameters()) - lookups
    assert profile["embedding"] == lookups and profile["embedding_trainable"]
    assert profile["matmul_total"] == profile["matmul_backward"] == profile["matmul_trainable"] == n
    flops = honest_flops(profile, TOKENS, _summary(), profile["matmul_trainable"])
    assert flops["executed_flops"] == 6 * n * TOKENS


def test_freeze_k_saves_exactly_the_prefix_backward_and_weight_gradients(tiny_models):
    full, _ = _profile(tiny_models["bert"], "full")
    frozen, _ = _profile(tiny_models["bert"], "{name: freeze, layers: 2}")
    prefix = frozen["below_blocks"] + sum(frozen["block_matmul"][:2])  # embeddings' norm + blocks 0, 1
    assert prefix > 0 and not frozen["embedding_trainable"]
    assert frozen["matmul_backward"] == full["matmul_total"] - prefix
    assert frozen["matmul_trainable"] == full["matmul_total"] - prefix
    a = honest_flops(full, TOKENS, _summary(), full["matmul_trainable"])["executed_flops"]
    b = honest_flops(frozen, TOKENS, _summary(), frozen["matmul_trainable"])["executed_flops"]
    assert a - b == 4 * prefix * TOKENS  # no activation gradient and no weight gradient below block 2


def test_lora_backward_reaches_the_lowest_adapter_and_weight_gradients_are_the_adapters(tiny_models):
    on_block_2 = "{name: lora, target_modules: [layer.2.attention.self.query, layer.2.attention.self.value]}"
    profile, model = _profile(tiny_models["bert"], on_block_2)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert profile["matmul_trainable"] == trainable  # adapters and head; the frozen base gets none
    below = profile["below_blocks"] + sum(profile["block_matmul"][:2])
    assert profile["matmul_backward"] == profile["matmul_total"] - below
    assert not embeddings_trained({"flop_profile": profile})


def test_reported_forward_only_and_skipped_steps_leave_out_their_work(tiny_models):
    profile, _ = _profile(tiny_models["bert"], "full")
    n = profile["matmul_total"]
    summary = _summary(10, a={"forward_only_steps": 4}, b={"skipped_steps": 2})
    flops = honest_flops(profile, TOKENS, summary, n)
    assert flops["forward_flops"] == pytest.approx(2 * n * TOKENS * 0.8)
    assert flops["backward_activation_flops"] == pytest.approx(2 * n * TOKENS * 0.4)
    assert flops["weight_gradient_flops"] == pytest.approx(2 * n * TOKENS * 0.4)


def test_cached_prefix_is_not_counted_after_the_first_epoch(base_overrides):
    cfg = load_config(
        None, [*base_overrides, "methods=[{name: freeze, layers: 2}]", "train.cache_frozen_prefix=true"]
    )
    summary = run_train(cfg)
    profile, cache = summary["params"]["flop_profile"], summary["train"]["prefix_cache"]
    tokens = summary["train"]["tokens_per_s"] * summary["train"]["train_time_s"]
    # 3 epochs over the same examples: the last two are served from the cache
    assert cache["tokens_from_cache"] == pytest.approx(tokens * 2 / 3, rel=1e-6)
    report = flops_report(summary, None)
    prefix = profile["below_blocks"] + sum(profile["block_matmul"][:2])
    n = profile["matmul_total"]
    assert report["forward_flops"] == pytest.approx(2 * n * tokens - 2 * prefix * cache["tokens_from_cache"])
    assert report["backward_activation_flops"] == pytest.approx(2 * (n - prefix) * tokens)
    assert report["executed_flops"] < (4 * n + 2 * (n - prefix)) * tokens


RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _artefacts() -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(RESULTS.glob("*/*.json")):
        artefact = json.loads(path.read_text(encoding="utf-8"))
        if "flops" in artefact and "tokens_per_s" in artefact:
            out.append((path, artefact))
    return out


def test_committed_artefacts_never_pass_the_peak_when_recomputed():
    """Every committed artefact's FLOP figures, recomputed with the current count, are the ones it holds,
    the executed fraction of the fp32 and bf16 peak is at most 1 (or null where the run recorded no
    flop_profile: unknown, never an upper bound), and executed work never exceeds useful work."""
    artefacts = _artefacts()
    assert len(artefacts) > 100
    unknown = 0
    for path, artefact in artefacts:
        flops = recompute_flops(artefact)
        name = str(path.relative_to(RESULTS))
        assert flops == pytest.approx(artefact["flops"], nan_ok=True), name  # regenerated, not stale
        if flops["executed_flops"] is None:
            unknown += 1
            assert flops["fraction_of_fp32_peak"] is None and "flop_profile" in flops["fraction_unknown"]
            continue
        assert flops["executed_flops"] <= flops["useful_flops"] * (1 + 1e-12), name
        for key in ("fraction_of_fp32_peak", "fraction_of_bf16_peak"):
            if artefact.get("matmul_peak") and flops[key] is None:  # a peak timed under a heavier load
                assert "load fell" in flops["fraction_unknown"], name
                peak = artefact["matmul_peak"][
                    key.removeprefix("fraction_of_").removesuffix("_peak") + "_gflops"
                ]
                assert flops["achieved_gflops"] > peak, name
            elif artefact.get("matmul_peak"):
                assert 0 < flops[key] <= 1, (name, key, flops[key])
    assert 0 < unknown < len(artefacts)  # the old skip_long artefact (3.27x before) is among the unknown
    skip = json.loads((RESULTS / "seed000-ablation" / "skip_long-r1.json").read_text())["flops"]
    assert skip["fraction_of_fp32_peak"] is None


def test_skipped_and_cached_work_is_useful_not_executed(tiny_models):
    profile, _ = _profile(tiny_models["bert"], "full")
    n = profile["matmul_total"]
    summary = {
        "config": {"model": {"name": "x"}, "task": "classification"},
        "params": {"total": n, "trainable": n, "flop_profile": profile},
        "method_reports": {"skip": {"skipped_steps": 5}},
        "train": {"tokens_per_s": TOKENS / 2.0, "train_time_s": 2.0, "steps": 10},
    }
    report = flops_report(summary, {"fp32_gflops": 1.0, "bf16_gflops": 1.0})
    assert report["useful_flops"] == pytest.approx(2 * report["executed_flops"])
    assert report["fraction_of_fp32_peak"] == pytest.approx(report["executed_flops"] / 2.0 / 1e9)
