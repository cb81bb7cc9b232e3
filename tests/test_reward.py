"""Reward models (task: reward): the Bradley-Terry loss on preference pairs, learnt above chance."""

from __future__ import annotations

import random

import pytest
import torch

from leantune.config import DataConfig
from leantune.data.tasks import collate, encode
from tests.conftest import FILLER, NEGATIVE, POSITIVE, assert_resume_replays, write_csv


def preference_rows(n: int, seed: int) -> list[dict]:
    """The preferred response carries a positive word, the other a negative one, among the same filler."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(FILLER, 4)
        at = rng.randrange(5)
        chosen, rejected = list(words), list(words)
        chosen.insert(at, rng.choice(POSITIVE))
        rejected.insert(at, rng.choice(NEGATIVE))
        rows.append(
            {"prompt": "what did you think", "chosen": " ".join(chosen), "rejected": " ".join(rejected)}
        )
    return rows


def test_pair_loss_is_bradley_terry_on_separate_rewards(tiny_models):
    from leantune.models.loader import load_model, load_tokenizer
    from leantune.models.reward import attach_pair_loss

    tok = load_tokenizer(str(tiny_models["gpt2"]))
    model = load_model(str(tiny_models["gpt2"]), "reward").eval()
    assert model.config.num_labels == 1
    rows = preference_rows(3, 0)
    rows[1]["chosen"] += " and the film went on for a long long time"  # pairs of unequal lengths
    cfg = DataConfig(prompt_column="prompt")
    features = encode("reward", rows, tok, cfg, 64, None, "x")
    with torch.no_grad():
        alone = [
            [
                float(model(input_ids=torch.tensor([f[k]])).logits[0, 0])
                for k in ("input_ids", "rejected_input_ids")
            ]
            for f in features
        ]
        out = attach_pair_loss(model)(**collate(features, tok.pad_token_id))
    margins = torch.tensor([c - r for c, r in alone])
    expected = float(-torch.nn.functional.logsigmoid(margins).mean())
    assert abs(float(out.loss) - expected) < 1e-5
    assert torch.allclose(out.logits, torch.tensor(alone), atol=1e-5)
    # the prompt comes first, then the response, both in every sequence
    assert tok.decode(features[0]["input_ids"], skip_special_tokens=True).startswith("what did you think")


@pytest.mark.parametrize("method", ["full", "lora"])
def test_reward_model_ranks_held_out_pairs_above_chance(tiny_models, tmp_path, method):
    from leantune.config import load_config
    from leantune.recipes.evaluate import run_eval
    from leantune.recipes.train import run_train

    data = write_csv(tmp_path / "prefs.csv", preference_rows(240, 1))
    extra = (
        ["methods=[full]", "train.lr=3e-3"]
        if method == "full"
        else ["methods=[{name: lora, r: 16, target_modules: all-linear}]", "train.lr=1e-2"]
    )
    cfg = load_config(
        None,
        [
            "task=reward",
            f"model.name={tiny_models['llama']}",
            "model.max_length=32",
            f"data.source={data}",
            "data.prompt_column=prompt",
            "train.batch_size=16",
            "train.epochs=4",
            "train.num_threads=1",
            "train.save_every=null",
            "output.tensorboard=false",
            f"output.dir={tmp_path / 'run'}",
            *extra,
        ],
    )
    assert cfg.metric == "accuracy"
    summary = run_train(cfg)
    test = summary["test"]
    assert summary["data"]["test"] == 24
    assert test["accuracy"] >= 0.75, test  # chance is 0.5
    assert test["loss"] < 0.6931  # below the loss of equal rewards, log 2
    # the saved run reloads (adapter or full) and scores the same held-out pairs the same way
    again = run_eval(tmp_path / "run", None, "test")
    assert again["accuracy"] == pytest.approx(test["accuracy"], abs=1e-12)


def test_reward_resume_after_kill_replays_exactly(tiny_models, tmp_path):
    """As if killed -9 right after the step-3 checkpoint (the pair hooks must come back on the resumed
    model): the resumed run ends with the uninterrupted run's weights, bit for bit."""
    data = write_csv(tmp_path / "prefs.csv", preference_rows(96, 1))
    overrides = [
        "task=reward",
        f"model.name={tiny_models['llama']}",
        "model.max_length=32",
        f"data.source={data}",
        "data.prompt_column=prompt",
        "methods=[{name: lora, r: 8, target_modules: all-linear}]",
        "train.lr=1e-2",
        "train.batch_size=8",
        "train.max_steps=6",
        "train.num_threads=1",
        "train.save_every=3",
        "output.tensorboard=false",
        f"output.dir={tmp_path / 'run'}",
    ]
    assert_resume_replays(overrides, tmp_path / "run", from_step=3)


def test_plan_prices_a_preference_pair_as_two_rows(tiny_models, tmp_path, monkeypatch):
    """`leantune plan` on a reward model (refused before): one pair is two sequences in one forward pass,
    padded to the longer side, so the planner gets twice the rows at the rejected side's length where
    that is the longer one; the probe runs the pair loss."""
    import leantune.methods.dynamic_rank as dynamic_rank
    from leantune.config import load_config
    from leantune.recipes.plan import make_plan

    rows = preference_rows(40, 2)
    for row in rows:
        row["rejected"] += " and then it went on and on for a long long time without any end"
    data = write_csv(tmp_path / "prefs.csv", rows)
    cfg = load_config(
        None,
        [
            "task=reward",
            f"model.name={tiny_models['llama']}",
            "model.max_length=64",
            f"data.source={data}",
            "data.prompt_column=prompt",
            "train.batch_size=4",
            "train.num_threads=1",
            f"output.dir={tmp_path / 'run'}",
        ],
    )
    seen: dict = {}
    real = dynamic_rank.plan_ranks_for

    def spy(model, method, importance, complexity, **kwargs):
        seen.update(kwargs, probe_loss=complexity["probe_loss"])
        return real(model, method, importance, complexity, **kwargs)

    monkeypatch.setattr(dynamic_rank, "plan_ranks_for", spy)
    plan = make_plan(cfg, "64MiB")
    from leantune.data.tasks import encode
    from leantune.models.loader import load_tokenizer

    tok = load_tokenizer(str(tiny_models["llama"]))
    features = encode("reward", rows, tok, cfg.data, 64, None, "x")
    chosen = max(len(f["input_ids"]) for f in features)
    rejected = max(len(f["rejected_input_ids"]) for f in features)
    assert rejected > chosen
    assert seen["batch_size"] == 8 and seen["seq_len"] == plan["seq_len"] == rejected
    assert 0.3 < seen["probe_loss"] < 1.2  # the Bradley-Terry loss near log 2 at a fresh head
    assert plan["evaluation"]["batch"] % 2 == 0  # evaluation passes carry pairs too
