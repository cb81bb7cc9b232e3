"""PPO (task: ppo): GAE and the adaptive KL controller by hand; on a synthetic reward the score rises
while the KL to the reference stays near its target; resume after a kill replays exactly."""

from __future__ import annotations

import pytest
import torch
import yaml

from tests.conftest import assert_resume_replays, make_sentiment_rows, write_csv

NEW_TOKENS = 8


@pytest.fixture
def synthetic_reward(monkeypatch, tiny_models):
    """Runs score the responses by how many of their tokens lie in a target half of the vocabulary,
    instead of with a reward model (the reward run is not read). The half is the tokens whose output
    embedding leans along one fixed direction, so one shift of the final hidden state reaches all of
    them: a reward a random tiny model can learn in tens of steps (a random half of a uniform 30k-token
    vocabulary it cannot)."""
    from safetensors.torch import load_file

    import leantune.recipes.rlhf as rlhf

    head = load_file(str(tiny_models["llama"] / "model.safetensors"))["lm_head.weight"]
    direction = torch.randn(head.shape[1], generator=torch.Generator().manual_seed(0))
    target = set((head @ direction > 0).nonzero().flatten().tolist())

    def score(sequences: list[list[int]]) -> torch.Tensor:
        return torch.tensor([float(sum(t in target for t in s[-NEW_TOKENS:])) for s in sequences])

    monkeypatch.setattr(rlhf, "load_reward_scorer", lambda run, tok: score)


def test_gae_matches_the_recursion_by_hand():
    from leantune.train.ppo import gae

    rewards = torch.tensor([[0.0, 0.5, 1.0, 9.0]])
    values = torch.tensor([[0.2, 0.4, 0.1, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last position is past the response's end
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    d2 = 1.0 - 0.1
    d1 = 0.5 + 0.9 * 0.1 - 0.4
    d0 = 0.0 + 0.9 * 0.4 - 0.2
    a2, a1 = d2, d1 + 0.45 * d2
    expected = torch.tensor([[d0 + 0.45 * a1, a1, a2, 0.0]])
    assert torch.allclose(adv, expected)
    assert torch.allclose(ret, expected + values)


def test_adaptive_kl_coef_moves_towards_the_target():
    from leantune.train.ppo import adapted_kl_coef

    assert adapted_kl_coef(0.1, kl=12.0, target=6.0, samples=100, horizon=1000) == pytest.approx(0.102)
    assert adapted_kl_coef(0.1, kl=3.0, target=6.0, samples=100, horizon=1000) == pytest.approx(0.098)
    assert adapted_kl_coef(0.1, kl=6.0, target=6.0, samples=100, horizon=1000) == pytest.approx(0.1)


def _ppo_overrides(tmp_path, tiny_models, extra: list[str] = ()) -> list[str]:
    rows = [{"text": r["text"]} for r in make_sentiment_rows(160, 3)]
    data = write_csv(tmp_path / "prompts.csv", rows)
    return [
        "task=ppo",
        f"model.name={tiny_models['llama']}",
        "model.max_length=24",
        f"data.source={data}",
        "data.label_column=null",
        f"ppo.reward_run={tmp_path}",
        f"ppo.max_new_tokens={NEW_TOKENS}",
        "ppo.kl_target=10.0",
        "ppo.temperature=0.3",  # the random model's next-token distribution is uniform; sharpen it
        "ppo.kl_coef=0.5",
        "ppo.kl_horizon=16",
        "ppo.ppo_epochs=4",
        "methods=[full]",
        "train.lr=1e-2",
        "train.batch_size=16",
        "train.max_steps=40",
        "train.epochs=10",
        "train.warmup_ratio=0",
        "train.num_threads=1",
        "train.save_every=null",
        "train.eval_every=10",
        "eval.batch_size=32",
        "output.tensorboard=false",
        f"output.dir={tmp_path / 'run'}",
        *extra,
    ]


def test_ppo_raises_the_reward_with_kl_near_its_target(tiny_models, tmp_path, synthetic_reward):
    from leantune.config import load_config
    from leantune.recipes.train import run_train

    summary = run_train(load_config(None, _ppo_overrides(tmp_path, tiny_models)))
    history = summary["rlhf"]["history"]
    assert len(history) == 10  # 40 steps, 4 optimizer steps per rollout
    first = sum(h["score"] for h in history[:3]) / 3
    last = sum(h["score"] for h in history[-3:]) / 3
    assert last > first + 0.5, history  # about 0.5 target tokens of 8 at the start
    kls = [h["kl"] for h in history]
    assert max(kls[-5:]) < 1.5 * 10.0, kls  # within its target (10 nats per response), with slack
    assert summary["test"]["kl"] < 1.5 * 10.0
    assert summary["method_reports"] == {} or "ppo" not in summary["method_reports"]


def test_ppo_resume_after_kill_replays_exactly(tiny_models, tmp_path, synthetic_reward):
    # a checkpoint at step 3 falls in the middle of a rollout's two steps: the buffer must travel
    extra = ["train.save_every=3", "train.max_steps=6", "train.eval_every=null"]
    assert_resume_replays(_ppo_overrides(tmp_path, tiny_models, extra), tmp_path / "run", from_step=3)


@pytest.mark.parametrize("task", ["dpo", "ppo"])
def test_plan_takes_reference_logits_and_reward_model_from_the_budget(tiny_models, tmp_path, task):
    from leantune.config import load_config
    from leantune.memory.rlhf import weight_bytes
    from leantune.models.loader import load_model
    from leantune.recipes.plan import format_plan, make_plan
    from tests.test_reward import preference_rows

    rows = preference_rows(40, 0)
    data = write_csv(tmp_path / "prefs.csv", [{**r, "text": r["prompt"]} for r in rows])
    cfg = load_config(
        None,
        [
            f"task={task}",
            f"model.name={tiny_models['llama']}",
            "model.max_length=32",
            f"data.source={data}",
            "data.prompt_column=prompt",
            "data.label_column=null",
            f"ppo.reward_run={tmp_path}",
            "ppo.max_new_tokens=8",
            "train.batch_size=4",
            "methods=[{name: lora, target_modules: all-linear}]",
        ],
    )
    plan = make_plan(cfg, "64MiB")
    held = plan["rlhf"]
    vocab, rows_per_step = 30522, 8 if task == "dpo" else 4  # DPO: chosen and rejected rows
    assert held["reference_logits"] == rows_per_step * plan["seq_len"] * vocab * 4
    assert held["reference_weights"] == 0  # the adapter disabled is the reference
    base = weight_bytes(load_model(str(tiny_models["llama"]), "causal_lm"))
    assert held["reward_model_weights"] == (base if task == "ppo" else 0)
    assert plan["budget_bytes"] == 64 * 2**20 - held["total"]
    assert plan["estimate"]["total"] <= plan["budget_bytes"]
    # printed: the budget the user asked for, then what is held beside the policy, then what is left
    first = format_plan(plan).splitlines()[0]
    logits_mib = rows_per_step * plan["seq_len"] * vocab * 4 / 2**20
    reward_mib = (base if task == "ppo" else 0) / 2**20
    held_mib = logits_mib + reward_mib
    reward = f"{reward_mib:.2f} MiB" if task == "ppo" else "0 B"
    assert first.startswith(
        f"memory budget 64MiB = 64.00 MiB; held beside the policy {held_mib:.2f} MiB (reference 0 B, "
        f"reference logits {logits_mib:.2f} MiB, reward model {reward}); left for the policy "
        f"{64 - held_mib:.2f} MiB"
    ), first


@pytest.mark.parametrize("methods", ["[full]", "[lora]"])
def test_eval_rescores_a_finished_run_with_its_reward_model(
    tiny_models, tmp_path, capsys, monkeypatch, methods
):
    """`leantune eval` on a finished PPO run loads its ppo.reward_run and repeats the run's own test
    reward, KL and objective (sampling seeded with train.seed, as the final evaluation is); the full run
    reloads the base model as its reference, the LoRA run disables its adapter. The reward run is given
    relative to the folder training ran in and eval runs from another one: the run recorded it absolutely.
    An older run that recorded it relative, or one whose reward run moved away: eval is one line, exit 2."""
    from leantune.config import load_config
    from leantune.recipes.evaluate import run_eval
    from leantune.recipes.train import run_train
    from tests.conftest import cli_err
    from tests.test_reward import preference_rows

    prefs = write_csv(tmp_path / "prefs.csv", preference_rows(64, 1))
    reward_run = tmp_path / "rm"
    run_train(
        load_config(
            None,
            [
                "task=reward",
                f"model.name={tiny_models['llama']}",
                "model.max_length=32",
                f"data.source={prefs}",
                "data.prompt_column=prompt",
                "methods=[full]",
                "train.batch_size=16",
                "train.max_steps=2",
                "train.num_threads=1",
                "train.save_every=null",
                "output.tensorboard=false",
                f"output.dir={reward_run}",
            ],
        )
    )
    extra = ["ppo.reward_run=rm", f"methods={methods}", "train.max_steps=4"]
    extra.append("train.eval_every=null")
    monkeypatch.chdir(tmp_path)  # trained in the folder that holds `rm` ...
    summary = run_train(load_config(None, _ppo_overrides(tmp_path, tiny_models, extra)))
    test = summary["test"]
    assert summary["rlhf"]["kl_coef"] != 0.5  # the adaptive weight moved: eval must use the final one
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["ppo"]["reward_run"]
    assert recorded == str(reward_run.resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # ... evaluated from another one
    again = run_eval(tmp_path / "run", None)
    assert again["n"] == summary["data"]["test"]
    for key in ("reward", "kl", "objective"):
        assert again[key] == pytest.approx(test[key], rel=1e-4, abs=1e-5), (key, again, test)
    assert abs(test["kl"]) > 1e-3  # the policy moved off its reference: the KL is not trivially 0
    config = tmp_path / "run" / "config.yaml"
    written = config.read_text()
    config.write_text(written.replace(str(reward_run.resolve()), "rm"))  # as an older run recorded it
    capsys.readouterr()
    assert "ppo.reward_run rm, which does not exist" in cli_err(capsys, "eval", tmp_path / "run")
    config.write_text(written)
    reward_run.rename(tmp_path / "rm-moved")
    assert "does not exist (moved or deleted?)" in cli_err(capsys, "eval", tmp_path / "run")
