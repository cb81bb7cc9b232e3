"""The run configuration: the sections of `leantune.settings` plus the `methods` list, YAML loading and
dotted `key=value` overrides.

Every field a user can set lives here or in `leantune.settings` (methods add their own models through the
registry), with `extra="forbid"` so a typo is an error rather than a silently ignored setting. It sits
above the methods layer (it validates each method's config with that method's model) and below
train/eval/bench/recipes. This module must stay cheap to import: `leantune train --help` and config
validation never touch torch.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from leantune.errors import UserError
from leantune.memory.budget import check_budget
from leantune.methods.registry import MethodConfig, check_method_list, method_config_class
from leantune.settings import (  # noqa: F401  (re-exported: `from leantune.config import DataConfig`)
    ANSWER_METRICS,
    CLASSIFICATION_METRICS,
    CLASSIFYING_TASKS,
    DPO_METRICS,
    GENERATION_METRICS,
    HEAD_TASKS,
    LM_METRICS,
    MAX_SEED,
    MULTI_LABEL_METRICS,
    PPO_METRICS,
    REGRESSION_METRICS,
    REWARD_METRICS,
    DataConfig,
    DPOConfig,
    EvalConfig,
    ModelConfig,
    OutputConfig,
    PPOConfig,
    Strict,
    Task,
    TrainConfig,
    apply_override,
    describe_validation_error,
    read_yaml_mapping,
)


class AutoConfig(MethodConfig):
    """`methods: auto`: not a method but a request, resolved into a concrete method list (and its levers)
    by `leantune.recipes.auto` before anything trains; the trainer never sees it. Listed alone."""

    name: Literal["auto"] = "auto"
    budget: str | float = Field(
        0.5,
        description="Memory the chosen method may use (model + one step, the memory model's total): 2GiB, "
        "512MiB, 3e9, or a fraction (<= 1) of the memory available when the run starts.",
    )
    set_lr: bool = Field(
        True,
        description="Also set train.lr to the chosen family's best measured rate (docs/methods/auto.md); "
        "false keeps train.lr (train.lr=auto always keeps the range test).",
    )

    extend: bool = Field(
        True,
        description="Lengthen the run (train.epochs, train.max_steps) by the chosen family's steps "
        "multiplier, the steps it needs to reach what full fine-tuning reaches in the configured run.",
    )

    @field_validator("budget")
    @classmethod
    def _budget_syntax(cls, value: str | float) -> str | float:
        return check_budget(value)


AUTO_ALONE = (
    "methods: auto chooses the whole method list, so it cannot be combined with {others}; "
    "write `methods: auto` (or [{{name: auto, budget: 2GiB}}]) alone, or list the methods yourself"
)


#: tasks whose batches the frozen-prefix cache cannot carry (preference pairs, label-word positions,
#: rollouts); seq2seq (an encoder-decoder) and packed data are refused with their own lines
NO_PREFIX_CACHE_TASKS = ("reward", "prompt_classification", "dpo", "ppo")


def prefix_cache_possible(cfg: Config) -> bool:
    """Whether `train.cache_frozen_prefix` may be set for this config (the validator's refusals)."""
    return cfg.task not in (*NO_PREFIX_CACHE_TASKS, "seq2seq") and not cfg.data.packing


#: the metric that picks the best checkpoint when eval.metric is not set (language models: the loss)
DEFAULT_METRIC = {
    "classification": "accuracy",
    "prompt_classification": "accuracy",
    "reward": "accuracy",
    "ppo": "reward",
    "regression": "mse",
    "multi_label": "micro_f1",
}


class Config(Strict):
    task: Task = "classification"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    methods: list[SerializeAsAny[MethodConfig]] = Field(
        default_factory=lambda: [method_config_class("lora")()],
        description="Applied in order; e.g. [{name: freeze, layers: 2}, {name: lora, r: 8}].",
    )
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    output: OutputConfig = OutputConfig()
    dpo: DPOConfig = DPOConfig()
    ppo: PPOConfig = PPOConfig()

    @field_validator("methods", mode="before")
    @classmethod
    def _dispatch_methods(cls, value: Any) -> Any:
        if value == "auto":  # `methods: auto`
            value = ["auto"]
        if not isinstance(value, list) or not value:
            raise ValueError("must be a non-empty list such as [{name: lora}], or auto")
        names = [
            item.get("name") if isinstance(item, dict) else getattr(item, "name", item) for item in value
        ]
        if "auto" in names and len(names) > 1:
            others = ", ".join(str(n) for n in names if n != "auto")
            raise UserError(AUTO_ALONE.format(others=others))
        out: list = []
        for i, item in enumerate(value):
            if isinstance(item, MethodConfig):
                out.append(item)
                continue
            if isinstance(item, str):
                item = {"name": item}
            if not isinstance(item, dict) or "name" not in item:
                raise ValueError(f"entry {i} needs a `name` (e.g. {{name: lora}})")
            earlier = [j for j, m in enumerate(out) if m.name == str(item["name"])]
            if earlier:
                raise ValueError(
                    f"method '{item['name']}' is listed twice (entries {earlier[0]} and {i}); list each once"
                )
            config_cls = AutoConfig if item["name"] == "auto" else method_config_class(str(item["name"]))
            try:
                out.append(config_cls.model_validate(item))
            except ValidationError as exc:
                raise UserError(describe_validation_error(exc, config_cls, prefix=f"methods.{i}")) from None
        return out

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        known = {
            "classification": CLASSIFICATION_METRICS,
            "prompt_classification": CLASSIFICATION_METRICS,
            "regression": REGRESSION_METRICS,
            "multi_label": MULTI_LABEL_METRICS,
            "reward": REWARD_METRICS,
            "dpo": DPO_METRICS,
            "ppo": PPO_METRICS,
        }.get(self.task, LM_METRICS + GENERATION_METRICS + ANSWER_METRICS)
        if self.eval.metric is not None and self.eval.metric not in known:
            hint = difflib.get_close_matches(self.eval.metric, known, n=1)
            fix = f"did you mean '{hint[0]}'?" if hint else f"choose from {', '.join(known)}"
            raise ValueError(f"eval.metric '{self.eval.metric}' is not a {self.task} metric; {fix}")
        try:
            check_budget(self.train.prefix_cache_ram)
        except ValueError as exc:
            raise ValueError(f"train.prefix_cache_ram: {exc}") from None
        if self.task == "seq2seq" and self.train.cache_frozen_prefix:
            raise ValueError(
                "train.cache_frozen_prefix supports encoder-only and decoder-only models, not seq2seq; "
                "set it false"
            )
        if self.task not in ("causal_lm", "reward", "dpo", "ppo") and self.data.label_column is None:
            raise ValueError(f"task {self.task} needs data.label_column (the label or target column)")
        self._check_label_settings()
        if self.eval.generate and (
            self.task in (*HEAD_TASKS, *CLASSIFYING_TASKS, "dpo", "ppo") or self.data.label_column is None
        ):
            raise ValueError("eval.generate needs task seq2seq or causal_lm with a data.label_column target")
        if (
            self.eval.metric in GENERATION_METRICS + ANSWER_METRICS
            and self.task not in (*HEAD_TASKS, *CLASSIFYING_TASKS)
            and not self.eval.generate
        ):
            raise ValueError(f"eval.metric '{self.eval.metric}' scores generations; set eval.generate=true")
        if self.data.format != "text" and self.task != "causal_lm":
            raise ValueError(
                f"data.format={self.data.format} is chat data for task causal_lm; set task=causal_lm"
            )
        if self.data.format != "text" and self.eval.generate:
            raise ValueError(
                "eval.generate scores text_column/label_column targets, not chat records; "
                "set eval.generate=false (use `leantune generate RUN_DIR` on chat runs)"
            )
        if self.task in NO_PREFIX_CACHE_TASKS and self.train.cache_frozen_prefix:
            raise ValueError(f"train.cache_frozen_prefix does not support task {self.task}; set it false")
        self._check_prompt()
        if self.task in ("dpo", "ppo"):
            self._rl_checks()
        if self.data.packing:
            if self.task != "causal_lm":
                raise ValueError(
                    "data.packing packs causal-LM examples; set task=causal_lm or data.packing=false"
                )
            if self.train.cache_frozen_prefix:
                raise ValueError("data.packing and train.cache_frozen_prefix cannot be combined; drop one")
            if self.model.dtype != "float32":
                raise ValueError("data.packing builds a float32 attention mask; set model.dtype=float32")
        if self.eval.mmlu_shots is not None and self.task != "causal_lm":
            raise ValueError("eval.mmlu_shots scores a causal LM; set task=causal_lm or eval.mmlu_shots=null")
        from leantune.models.reward import method_task

        if isinstance(self.methods[0], AutoConfig) and self.task in ("reward", "dpo", "ppo"):
            raise ValueError(
                f"methods: auto does not price what task {self.task} holds beside the policy (a reference, "
                "a reward model); list the methods yourself (`leantune plan` prices them)"
            )
        if not (len(self.methods) == 1 and isinstance(self.methods[0], AutoConfig)):  # resolved later
            check_method_list(method_task(self.task), [m.name for m in self.methods])  # by name: no torch
        return self

    def _check_label_settings(self) -> None:
        """Settings that only one label kind reads: refused elsewhere rather than silently ignored."""
        if self.data.label_separator is not None and self.task != "multi_label":
            raise ValueError("data.label_separator splits multi-label cells; set task=multi_label or drop it")
        if self.data.label_separator == "":
            raise ValueError(
                "data.label_separator is empty; give the string between labels, quoted (YAML reads a bare "
                "| as an empty block): data.label_separator='|'"
            )
        if self.data.allow_empty_labels and self.task != "multi_label":
            raise ValueError("data.allow_empty_labels is for task multi_label; drop it")
        # not "was it set": a run's saved config.yaml spells out every default
        if self.eval.threshold != EvalConfig.model_fields["threshold"].default and self.task != "multi_label":
            raise ValueError(
                "eval.threshold is the multi-label decision threshold; set task=multi_label or drop it"
            )
        if self.task == "regression" and self.data.label_names is not None:
            raise ValueError(
                "task regression predicts one score, it has no label names; drop data.label_names"
            )

    @property
    def metric(self) -> str:
        return self.eval.metric or DEFAULT_METRIC.get(self.task, "loss")

    def _check_prompt(self) -> None:
        """The template and label words of task prompt_classification (their tokens are checked against
        the tokenizer when the data is encoded, data/prompts.py)."""
        from leantune.data.prompts import check_template

        if self.task != "prompt_classification":
            if self.data.label_words is not None:
                raise ValueError(
                    "data.label_words is for task prompt_classification; remove it or set the task"
                )
            return
        check_template(self.data.template, self.data.text_pair_column is not None)
        words = self.data.label_words
        if words is not None:
            blank = [i for i, w in enumerate(words) if not w.strip()]
            if blank:
                raise ValueError(f"data.label_words entry {blank[0]} is empty; give every class a word")
            if len(set(words)) < len(words):
                raise ValueError(f"data.label_words {words} repeats a word; give each class its own word")
            names = self.data.label_names
            if names is not None and len(names) != len(words):
                raise ValueError(
                    f"data.label_words has {len(words)} words for {len(names)} classes {names}; "
                    "give one word per class, in label order"
                )

    def _rl_checks(self) -> None:
        """dpo/ppo settings that cannot work together, refused before anything loads."""
        if self.task == "ppo" and not self.ppo.reward_run:
            raise ValueError(
                "task ppo needs a reward model: set ppo.reward_run to the folder of a finished "
                "`task: reward` run"
            )
        if self.task == "ppo" and self.train.grad_accum != 1:
            raise ValueError("task ppo makes one rollout per optimizer step; set train.grad_accum=1")
        if self.task == "ppo" and self.ppo.max_new_tokens >= self.model.max_length:
            raise ValueError(
                f"ppo.max_new_tokens={self.ppo.max_new_tokens} leaves no room for the prompt in "
                f"model.max_length={self.model.max_length}; lower it or raise model.max_length"
            )
        if self.train.distributed == "fsdp":
            raise ValueError(f"task {self.task} runs without FSDP; set train.distributed=auto, ddp or none")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (or the built-in defaults when `path` is None), apply overrides, validate."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise UserError(f"config file not found: {p}; pass an existing YAML file (see configs/)")
        tree = read_yaml_mapping(p, "config file")
    if "methods" not in tree and any(o.startswith("methods.") for o in overrides):
        tree["methods"] = [m.model_dump() for m in Config().methods]
    for item in overrides:
        apply_override(tree, item)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise UserError(describe_validation_error(exc, Config)) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
