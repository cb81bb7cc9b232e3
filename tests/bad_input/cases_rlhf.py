"""Tasks dpo and ppo: data without preference columns, impossible settings and a PPO reward run that is
missing, unfinished or of another task: one line each, before anything is written."""

from __future__ import annotations

from tests.bad_input.harness import Case, Env, train, with_data

DPO = ("task=dpo", "model.name=@GPT2@")
PPO = ("task=ppo", "model.name=@GPT2@", "data.label_column=null", "ppo.max_new_tokens=4")


def _classification_run(env: Env) -> None:
    env.copy_run("rm")


def _unfinished_reward_run(env: Env) -> None:
    run = env.copy_run("rm")
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("task: classification", "task: reward"))
    (run / "summary.json").unlink()


def _ppo_run_whose_reward_run_moved(env: Env) -> None:
    """A finished run recorded as task ppo whose ppo.reward_run is gone (only its config is read)."""
    import yaml

    run = env.copy_run("run")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["task"] = "ppo"
    config["data"]["label_column"] = None
    config.setdefault("ppo", {}).update({"reward_run": str(env.root / "moved_rm"), "max_new_tokens": 4})
    (run / "config.yaml").write_text(yaml.safe_dump(config))


def _cases() -> list[Case]:
    return [
        Case(
            id="dpo-missing-chosen",
            family="chat",
            what="task dpo on data without `chosen`/`rejected` columns",
            argv=train(*DPO),
            phrase="column 'chosen' not found",
            files=with_data(),
        ),
        Case(
            id="dpo-beta-zero",
            family="chat",
            what="dpo.beta 0 (the KL constraint needs beta > 0)",
            argv=train(*DPO, "dpo.beta=0"),
            phrase="config key 'dpo.beta': input should be greater than 0",
            files=with_data(),
        ),
        Case(
            id="dpo-metric",
            family="chat",
            what="eval.metric accuracy on a DPO run",
            argv=train(*DPO, "eval.metric=accuracy"),
            phrase="eval.metric 'accuracy' is not a dpo metric",
            files=with_data(),
        ),
        Case(
            id="dpo-fsdp",
            family="chat",
            what="task dpo with train.distributed=fsdp (DPO runs under DDP or in one process)",
            argv=train(*DPO, "train.distributed=fsdp"),
            phrase="task dpo runs without FSDP; set train.distributed=auto, ddp or none",
            files=with_data(),
        ),
        Case(
            id="ppo-no-reward-run",
            family="chat",
            what="task ppo without ppo.reward_run",
            argv=train(*PPO),
            phrase="task ppo needs a reward model: set ppo.reward_run",
            files=with_data(),
        ),
        Case(
            id="ppo-reward-run-missing",
            family="chat",
            what="ppo.reward_run names a folder that does not exist",
            argv=train(*PPO, "ppo.reward_run=nope"),
            phrase="ppo.reward_run nope does not exist",
            files=with_data(),
        ),
        Case(
            id="ppo-reward-run-task",
            family="chat",
            what="ppo.reward_run is a finished classification run, not a reward model",
            argv=train(*PPO, "ppo.reward_run=rm"),
            phrase="is a classification run; point it at a `task: reward` run",
            files=with_data(),
            setup=_classification_run,
        ),
        Case(
            id="ppo-reward-run-unfinished",
            family="chat",
            what="ppo.reward_run is a reward run that did not finish (no summary.json)",
            argv=train(*PPO, "ppo.reward_run=rm"),
            phrase="did not finish (no summary.json)",
            files=with_data(),
            setup=_unfinished_reward_run,
        ),
        Case(
            id="ppo-grad-accum",
            family="chat",
            what="task ppo with train.grad_accum 2 (one rollout per optimizer step)",
            argv=train(*PPO, "ppo.reward_run=rm", "train.grad_accum=2"),
            phrase="set train.grad_accum=1",
            files=with_data(),
        ),
        Case(
            id="ppo-new-tokens",
            family="chat",
            what="ppo.max_new_tokens leaves no room for the prompt in model.max_length",
            argv=train(*PPO, "ppo.reward_run=rm", "ppo.max_new_tokens=16"),
            phrase="ppo.max_new_tokens=16 leaves no room for the prompt",
            files=with_data(),
        ),
        Case(
            id="ppo-eval-reward-run-moved",
            family="chat",
            what="`leantune eval` on a finished PPO run whose reward run was moved away",
            argv=("eval", "run", "--out", "eval.json"),
            phrase="moved_rm, which does not exist (moved or deleted?)",
            setup=_ppo_run_whose_reward_run_moved,
        ),
    ]


CASES = _cases()
