"""DPO (task: dpo): the loss is Rafailov et al.'s against the frozen base, and training on preference
pairs raises the held-out chosen-vs-rejected margin; resume after a kill replays exactly."""

from __future__ import annotations

import json

import pytest
import torch

from leantune.config import Config, DataConfig
from leantune.data.tasks import IGNORE_INDEX, collate, encode
from tests.conftest import assert_resume_replays, write_csv
from tests.test_reward import preference_rows


def _sequence_logp(model, ids: list[int], labels: list[int]) -> float:
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    return sum(float(logits[t - 1, lab]) for t, lab in enumerate(labels) if t and lab != IGNORE_INDEX)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_dpo_loss_is_the_sigmoid_loss_against_the_base(tiny_models, method):
    from leantune.methods import MethodContext, apply_methods
    from leantune.models.dpo import attach_dpo_loss
    from leantune.models.loader import load_model, load_tokenizer

    name = str(tiny_models["llama"])
    tok = load_tokenizer(name)
    base = load_model(name, "dpo").eval()
    torch.manual_seed(0)
    model = load_model(name, "dpo")
    methods = Config(methods=[method]).methods
    model = apply_methods(model, methods, MethodContext(task="causal_lm", seed=0)).eval()
    attach_dpo_loss(model, 0.5)
    with torch.no_grad():  # a policy unlike the base: only the trained part moves (LoRA B starts at 0)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    rows = preference_rows(3, 0)
    rows[1]["chosen"] += " and the film went on for a long long time"  # pairs of unequal lengths
    features = encode("dpo", rows, tok, DataConfig(prompt_column="prompt"), 64, None, "x")
    with torch.no_grad():
        out = model(**collate(features, tok.pad_token_id))
        expected, rewards = [], []
        for f in features:
            pair = []
            for k in ("", "rejected_"):
                ids, labels = f[f"{k}input_ids"], f[f"{k}labels"]
                pair.append(0.5 * (_sequence_logp(model, ids, labels) - _sequence_logp(base, ids, labels)))
            rewards.append(pair)
            expected.append(-torch.nn.functional.logsigmoid(torch.tensor(pair[0] - pair[1])))
    assert abs(float(out.loss) - float(torch.stack(expected).mean())) < 1e-4
    assert torch.allclose(out.logits[:, :2], torch.tensor(rewards), atol=1e-4)
    assert (out.logits[:, :2].abs() > 1e-4).all()  # the policy really differs from the reference
    assert (out.logits[:, 2] > 0).all()  # and so does its KL
    # the prompt is masked: only response tokens (and the EOS) are scored
    first = features[0]
    response = tok(rows[0]["chosen"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert [lab for lab in first["labels"] if lab != IGNORE_INDEX] == response


def _dpo_overrides(tmp_path, tiny_models, method: str, extra: list[str] = ()) -> list[str]:
    data = write_csv(tmp_path / "prefs.csv", preference_rows(200, 1))
    methods = (
        ["methods=[full]", "train.lr=2e-3"]
        if method == "full"
        else ["methods=[{name: lora, r: 8, target_modules: all-linear}]", "train.lr=1e-2"]
    )
    return [
        "task=dpo",
        f"model.name={tiny_models['llama']}",
        "model.max_length=32",
        f"data.source={data}",
        "data.prompt_column=prompt",
        "dpo.beta=0.5",
        "train.batch_size=16",
        "train.epochs=2",
        "train.num_threads=1",
        "train.save_every=null",
        "train.eval_every=4",
        "output.tensorboard=false",
        f"output.dir={tmp_path / 'run'}",
        *methods,
        *extra,
    ]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_dpo_raises_the_held_out_margin(tiny_models, tmp_path, method):
    from leantune.config import load_config
    from leantune.recipes.evaluate import run_eval
    from leantune.recipes.train import run_train

    cfg = load_config(None, _dpo_overrides(tmp_path, tiny_models, method))
    assert cfg.metric == "loss"
    summary = run_train(cfg)
    test = summary["test"]
    assert test["reward_margin"] > 0.1, test  # at the start policy == reference: margin 0 exactly
    assert test["reward_accuracy"] >= 0.75, test  # chance is 0.5
    assert test["loss"] < 0.6931  # log 2 is the loss of the reference itself
    assert 0 < test["kl"] < 5
    curve = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    margins = [r["reward_margin"] for r in curve if r.get("split") == "validation"]
    assert len(margins) >= 3 and margins[-1] > margins[0]
    # the saved run reloads (adapter on the base, or the full model beside the base) and scores alike
    again = run_eval(tmp_path / "run", None, "test")
    assert again["reward_margin"] == pytest.approx(test["reward_margin"], abs=1e-4)


def test_dpo_resume_after_kill_replays_exactly(tiny_models, tmp_path):
    overrides = _dpo_overrides(tmp_path, tiny_models, "lora", ["train.save_every=2", "train.max_steps=5"])
    assert_resume_replays(overrides, tmp_path / "run", from_step=2)
