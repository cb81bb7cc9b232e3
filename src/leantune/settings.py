"""The sections of the run configuration (model, data, train, eval, output), strict pydantic models, and
the YAML reading and dotted-override machinery every validated file shares.

Core layer: the data, models and memory layers read their sections from here. The composed run config
(`leantune.config.Config`) adds the `methods` list, whose entries are the methods' own config models, so
it lives a layer above the methods; this module knows nothing of methods.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from leantune.errors import UserError
from leantune.numbers import check_number

Task = Literal[
    "classification",
    "prompt_classification",
    "regression",
    "multi_label",
    "causal_lm",
    "seq2seq",
    "reward",
    "dpo",
    "ppo",
]
#: tasks scored by a sequence-classification head (one output per label, or one score)
HEAD_TASKS = ("classification", "regression", "multi_label", "reward")
#: tasks that predict a class per example (accuracy, F1, ...): a classifier head, or label words scored by
#: the language-model head (prompt_classification, models/prompt_head.py)
CLASSIFYING_TASKS = ("classification", "prompt_classification")
CLASSIFICATION_METRICS = ("accuracy", "f1", "precision", "recall", "mcc", "loss")
#: regression (one score per row, MSE loss): errors are minimised, correlations maximised
REGRESSION_METRICS = ("mse", "rmse", "mae", "pearson", "spearman", "loss")
#: multi-label (a set of labels per row, BCE with logits); per-label P/R/F1 are logged as well
MULTI_LABEL_METRICS = ("micro_f1", "macro_f1", "micro_precision", "micro_recall", "subset_accuracy", "loss")
LM_METRICS = ("loss", "perplexity")
#: a reward model: held-out pair accuracy (r_chosen > r_rejected) and the Bradley-Terry loss
REWARD_METRICS = ("accuracy", "loss")
#: DPO on held-out pairs (models/dpo.py): the loss, how often and by how much the implicit reward
#: beta * log(pi / pi_ref) ranks chosen over rejected, and the token-level KL to the reference
DPO_METRICS = ("loss", "reward_accuracy", "reward_margin", "kl")
#: PPO on held-out prompts (train/ppo.py): the reward model's mean score of sampled responses, the KL
#: to the reference on them, and the two combined (score - kl_coef * kl)
PPO_METRICS = ("reward", "kl", "objective")
#: scored on generated text (eval/generation.py); need eval.generate=true
GENERATION_METRICS = ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match")
#: scored on generated answers when the references are a small set of labels (eval/generation.py)
ANSWER_METRICS = ("accuracy", "f1", "precision", "recall")


#: train.optimizer: each the library's own implementation (train/optim.py)
Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit", "adafactor", "sgd"]
#: train.lr_scheduler: names of transformers.get_scheduler
Scheduler = Literal["linear", "cosine", "constant_with_warmup", "cosine_with_restarts"]
#: the optimizer each optimizer-specific key belongs to (a key set for another optimizer is refused)
OPTIMIZER_KEYS = {
    "adam_beta1": ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"),
    "adam_beta2": ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"),
    "adam_epsilon": ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"),
    "adamw_impl": ("adamw",),
    "momentum": ("sgd",),
    "nesterov": ("sgd",),
}

#: seeds go to torch, numpy and random (accelerate's set_seed): 0 .. 2**32 - 1
MAX_SEED = 2**32 - 1


class Strict(BaseModel):
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_number_coercion(cls, value: Any, info) -> Any:
        return check_number(value, cls.model_fields[info.field_name].annotation)


class ModelConfig(Strict):
    name: str = Field(
        "embedded:minilm",
        description="`embedded:<name>` (a model shipped by a package), a local HF folder, or a hub id.",
    )
    max_length: int = Field(128, gt=0, description="Inputs are truncated to this many tokens.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class DataConfig(Strict):
    source: str = Field(
        "builtin:rotten_tomatoes",
        description="`builtin:<name>`, a .csv/.tsv/.jsonl file, or `hf:<dataset>[:<config>]` for datasets.",
    )
    text_column: str = Field("text", description="Input text (classification), prompt (causal LM), source.")
    text_pair_column: str | None = Field(None, description="Second text for pair classification.")
    label_column: str | None = Field(
        "label",
        description="Class label (classification), score (regression), label set (multi_label), "
        "response (causal LM, may be null), target (seq2seq).",
    )
    label_names: list[str] | None = Field(
        None, description="Class names in id order; default: inferred from the training split."
    )
    label_separator: str | None = Field(
        None,
        description="multi_label: split a label cell on this string (e.g. `|`); a cell that starts with `[` "
        "is read as a JSON list, and JSONL rows may hold a list.",
    )
    allow_empty_labels: bool = Field(
        False, description="multi_label: a row may carry no label at all (`[]`); otherwise exit 2 naming it."
    )
    train_split: str = "train"
    validation_split: str = "validation"
    test_split: str = "test"
    validation_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Carved from train when absent.")
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Carved from train when absent.")
    split_seed: int = Field(42, ge=0, le=MAX_SEED)
    max_train_samples: int | None = Field(None, gt=0)
    max_eval_samples: int | None = Field(None, gt=0)
    format: Literal["text", "alpaca", "sharegpt", "messages"] = Field(
        "text",
        description="causal LM: `text` uses text_column/label_column; alpaca (instruction/input/output), "
        "sharegpt (conversations: [{from, value}]) and messages (messages: [{role, content}]) are rendered "
        "with the tokenizer's chat template, only assistant turns in the loss (docs/chat.md).",
    )
    system_prompt: str | None = Field(
        None, description="Chat formats: a system turn put first where a conversation has none."
    )
    chosen_column: str = Field("chosen", description="task reward/dpo: the preferred response.")
    rejected_column: str = Field("rejected", description="task reward/dpo: the dispreferred response.")
    prompt_column: str | None = Field(
        None,
        description="task reward/dpo: a prompt put before both responses (null: responses alone); "
        "task ppo reads its prompts from text_column.",
    )
    template: str = Field(
        "{text} It was {mask}",
        description="task prompt_classification: the prompt, with {text} (and {text_pair} for pairs) and "
        "one {mask} where a label word is scored (causal LMs: the next token after the text before {mask}; "
        "masked LMs: the mask token). docs/prompt_classification.md.",
    )
    label_words: list[str] | None = Field(
        None,
        description="task prompt_classification: one word per class, in label id order (default: the "
        "label names), each scored as one token of the LM head's vocabulary.",
    )
    label_word_tokens: Literal["single", "first"] = Field(
        "single",
        description="task prompt_classification: `single` refuses a label word that is several tokens; "
        "`first` scores its first token (and says so in the summary).",
    )
    packing: bool = Field(
        False,
        description="causal LM: pack training examples into rows of model.max_length; positions restart "
        "per example and a block-diagonal mask keeps attention inside each (docs/chat.md).",
    )


class TrainConfig(Strict):
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    batch_size: int = Field(32, gt=0, description="Per process, per micro-batch.")
    grad_accum: int = Field(1, gt=0)
    group_by_length: bool = Field(
        False,
        description="Batch examples of similar length: less padding (1.9x samples/s on the default job at "
        "equal accuracy, benchmarks/results/speed-levers), but batches skew towards one label where length "
        "and label correlate, so it is opt-in (as in transformers.Trainer).",
    )
    lr: Annotated[float, Field(gt=0, le=1)] | Literal["auto"] = Field(
        5e-4,
        description="Learning rate (at most 1), or auto: a short range test before training picks it "
        "(train/lr_find.py; the choice is in summary.json's lr_auto).",
    )
    lr_auto_steps: int = Field(
        50, ge=5, le=1000, description="lr auto: steps of the range test (fewer when an epoch is shorter)."
    )
    lr_auto_min: float = Field(1e-7, gt=0, lt=1, description="lr auto: the rate the range test starts at.")
    lr_auto_max: float = Field(0.1, gt=0, le=1, description="lr auto: the rate the range test ends at.")
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Optimizer = Field(
        "adamw",
        description="adamw (torch), adamw_8bit / paged_adamw / paged_adamw_8bit (bitsandbytes; paged only "
        "on CUDA), adafactor (transformers, with the schedule's lr), sgd (torch; momentum, nesterov).",
    )
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW family: first-moment decay.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW family: second-moment decay.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW family: denominator epsilon.")
    momentum: float = Field(0.0, ge=0, lt=1, description="sgd: momentum factor.")
    nesterov: bool = Field(False, description="sgd: Nesterov momentum (needs momentum > 0).")
    lr_scheduler: Scheduler = Field(
        "linear",
        description="transformers.get_scheduler: linear, cosine, constant_with_warmup or "
        "cosine_with_restarts, each after warmup.",
    )
    lr_cycles: int = Field(1, gt=0, description="cosine_with_restarts: number of hard restarts.")
    warmup_ratio: float = Field(0.06, ge=0, le=1, description="Warmup as a fraction of the optimizer steps.")
    warmup_steps: int | None = Field(
        None, ge=0, description="Warmup optimizer steps; when set it wins over warmup_ratio."
    )
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Clip the global gradient norm to this; null: no clipping."
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = Field(0, ge=0, le=MAX_SEED)
    nan_policy: Literal["stop", "skip"] = Field(
        "stop",
        description="On a NaN/inf loss or gradient: stop the run (exit 2, naming the step), or skip that "
        "step's update and count it in the summary.",
    )
    num_threads: int | None = Field(
        None,
        gt=0,
        description="torch intra-op threads; null: OMP_NUM_THREADS when set, else the physical cores this "
        "process may use, capped by a cgroup CPU quota (docs/speed.md).",
    )
    adamw_impl: Literal["auto", "for_loop", "foreach", "fused"] = Field(
        "auto",
        description="optimizer adamw: torch's kernel (same arithmetic); auto = fused (one kernel) where "
        "every trainable parameter can take it, else torch's choice; measured in docs/speed.md.",
    )
    compile_blocks: bool = Field(
        False,
        description="torch.compile each transformer block (dynamic shapes) in place, so method hooks on "
        "the blocks stay; a speed lever measured in speed-levers-2 (compiling costs time up front).",
    )
    distributed: Literal["auto", "fsdp", "ddp", "none"] = Field(
        "auto",
        description="Under a multi-process launch (torchrun): auto = ddp; fsdp = FSDP2 sharding per block; "
        "none refuses several processes. fsdp and ddp need a launcher (docs/distributed.md).",
    )
    distributed_backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="Process-group backend: auto = nccl on CUDA GPUs, gloo on CPU."
    )
    distributed_timeout_s: int = Field(
        600,
        gt=0,
        description="A collective (all-reduce, barrier, checkpoint) waiting longer than this on another "
        "process fails the run with one line naming the lost rank.",
    )
    log_every: int = Field(10, gt=0)
    eval_every: int | None = Field(None, gt=0, description="Also evaluate every N optimizer steps.")
    save_every: int | None = Field(50, gt=0, description="Checkpoint every N optimizer steps.")
    keep_checkpoints: int = Field(2, gt=0)
    early_stopping_patience: int | None = Field(None, gt=0, description="Evaluations without improvement.")
    cache_frozen_prefix: bool = Field(
        False,
        description="Keep the hidden states after the frozen embeddings + lowest blocks (in RAM up to "
        "train.prefix_cache_ram, then in a memory-mapped spill file) after an example's first pass and "
        "skip that prefix later; dropout in it is off (train/prefix_cache.py).",
    )
    prefix_cache_ram: str | float = Field(
        0.25,
        description="RAM the frozen-prefix cache may hold per process: bytes (512MiB, 2GiB, 3e9) or a "
        "fraction (<= 1) of the RAM available when training starts; later entries are appended to "
        "<run>/prefix_cache/ and read back through a memory map (exact either way).",
    )

    @model_validator(mode="after")
    def _optimizer_checks(self) -> TrainConfig:
        """Keys of another optimizer or schedule, set to a value that would be ignored, are refused: a
        run's saved config.yaml holds every key at its default, and must still load."""
        for key, owners in OPTIMIZER_KEYS.items():
            if self.optimizer not in owners and self._changed(key):
                raise ValueError(
                    f"train.{key} applies to optimizer {' / '.join(owners)}, not {self.optimizer}; "
                    f"remove it or set train.optimizer={owners[0]}"
                )
        if self.lr_scheduler != "cosine_with_restarts" and self._changed("lr_cycles"):
            raise ValueError(
                "train.lr_cycles applies to lr_scheduler cosine_with_restarts; remove it or set "
                "train.lr_scheduler=cosine_with_restarts"
            )
        if self.lr != "auto":
            for key in ("lr_auto_steps", "lr_auto_min", "lr_auto_max"):
                if self._changed(key):
                    raise ValueError(f"train.{key} applies to train.lr=auto; remove it or set train.lr=auto")
        elif self.lr_auto_min >= self.lr_auto_max:
            raise ValueError(
                f"train.lr_auto_min={self.lr_auto_min} is not below train.lr_auto_max={self.lr_auto_max}; "
                "the range test sweeps upwards (e.g. 1e-7 to 0.1)"
            )
        if self.nesterov and self.momentum == 0:
            raise ValueError("train.nesterov needs train.momentum > 0 (e.g. 0.9)")
        if self.max_steps is not None and (self.warmup_steps or 0) > self.max_steps:
            raise ValueError(
                f"train.warmup_steps={self.warmup_steps} exceeds train.max_steps={self.max_steps}: the run "
                "would end before the learning rate reaches train.lr; lower warmup_steps"
            )
        return self

    def _changed(self, key: str) -> bool:
        return key in self.model_fields_set and getattr(self, key) != type(self).model_fields[key].default


class EvalConfig(Strict):
    batch_size: int = Field(64, gt=0)
    metric: str | None = Field(
        None,
        description="Selects the best checkpoint; default accuracy (classification, reward), mse "
        "(regression), micro_f1 (multi_label) or loss.",
    )
    generate: bool = Field(
        False,
        description="seq2seq / causal LM with a response column: also generate on validation and test and "
        "score BLEU, chrF, ROUGE-1/2/L, exact match (slow; test generations go to predictions.jsonl).",
    )
    threshold: float = Field(
        0.5, gt=0, lt=1, description="multi_label: a label is predicted where its sigmoid is >= this."
    )
    max_new_tokens: int = Field(64, gt=0, description="Generation length limit.")
    num_beams: int = Field(1, gt=0, description="1 = greedy decoding.")
    max_generate_samples: int | None = Field(
        None, gt=0, description="Generate for at most this many rows of each split (speed)."
    )
    mmlu_shots: int | None = Field(
        None, ge=0, description="causal LM: after training, MMLU k-shot accuracy with k shots (e.g. 0 or 5)."
    )
    mmlu_questions: int | None = Field(
        None, gt=0, description="MMLU: a seeded subset of this many questions (default: all 14,042)."
    )


class DPOConfig(Strict):
    """task dpo (models/dpo.py): Rafailov et al.'s sigmoid loss against the frozen base model."""

    beta: float = Field(
        0.1,
        gt=0,
        description="Strength of the KL constraint: the implicit reward is beta * log(pi / pi_ref).",
    )


class PPOConfig(Strict):
    """task ppo (train/ppo.py): rollouts scored by a trained reward model, clipped PPO with a value head."""

    reward_run: str | None = Field(
        None, description="Run folder of a finished `task: reward` run: the reward model (required)."
    )
    max_new_tokens: int = Field(16, gt=0, description="Response length of each rollout.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of rollouts.")
    ppo_epochs: int = Field(
        2, gt=0, description="Optimizer steps per rollout batch (the clipped ratio binds from the second)."
    )
    clip_range: float = Field(0.2, gt=0, lt=1, description="Policy ratio clip, PPO's epsilon.")
    clip_range_value: float = Field(0.2, gt=0, description="Value prediction clip around the rollout's.")
    vf_coef: float = Field(0.1, gt=0, description="Weight of the value loss.")
    gamma: float = Field(1.0, gt=0, le=1, description="GAE discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    kl_coef: float = Field(0.05, ge=0, description="Initial weight of the per-token KL penalty.")
    kl_target: float | None = Field(
        6.0,
        gt=0,
        description="Adaptive KL (Ziegler et al. 2019): kl_coef moves so the rollouts' KL approaches this "
        "(nats per response); null keeps kl_coef fixed.",
    )
    kl_horizon: int = Field(10000, gt=0, description="Adaptive KL: samples over which kl_coef adapts.")


#: output.report_to: accelerate's trackers leantune sets up (train/logging.py), each with its package
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


class OutputConfig(Strict):
    dir: str = "runs/default"
    overwrite: bool = Field(False, description="Replace an existing run directory.")
    report_to: list[str] = Field(
        ["tensorboard"],
        description="Experiment trackers (through accelerate), one or a list: tensorboard, wandb, mlflow, "
        "trackio, or none; their files go to the run folder's trackers/ (docs/usage.md).",
    )
    tensorboard: bool = Field(True, description="false leaves tensorboard out of report_to (older configs).")

    @field_validator("report_to", mode="before")
    @classmethod
    def _tracker_names(cls, value: Any) -> Any:
        """`wandb` or `[tensorboard, wandb]`; `none` alone means no tracker."""
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            return value  # pydantic names the type error
        if "none" in names:
            if len(names) > 1:
                raise ValueError("'none' cannot be combined with trackers; write none or a list of trackers")
            return []
        for name in names:
            if name not in TRACKERS:
                hint = difflib.get_close_matches(name, [*TRACKERS, "none"], n=1)
                fix = f"did you mean '{hint[0]}'?" if hint else f"choose from {', '.join(TRACKERS)} or none"
                raise ValueError(f"unknown tracker '{name}'; {fix}")
        if len(set(names)) < len(names):
            raise ValueError("a tracker is listed twice; list each once")
        return names

    @property
    def trackers(self) -> list[str]:
        """The trackers this run logs to (report_to, without tensorboard when output.tensorboard=false)."""
        return [t for t in self.report_to if t != "tensorboard" or self.tensorboard]


def describe_validation_error(
    exc: ValidationError,
    root: type[BaseModel],
    prefix: str = "",
    noun: str = "config key",
    top: str = "config",
) -> str:
    """One line for the first validation error: the dotted key, what is wrong, and the fix.

    Shared by every YAML file we validate (configs, benchmark suites); `noun` names what a key is.
    """
    err = exc.errors()[0]
    # a union's member tags (`train.lr: float | Literal["auto"]` -> 'constrained-float') are not keys
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("-" in p or "[" in p)))
    msg = err["msg"].removeprefix("Value error, ")
    if not loc and not prefix:  # a check across sections (a model validator): its message says it all
        return f"{top}: {msg}"
    key = ".".join([prefix, *map(str, loc)] if prefix else map(str, loc))
    if err["type"] == "extra_forbidden":
        valid = _valid_keys(root, loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        fix = f"did you mean '{hint[0]}'?" if hint else f"valid keys here: {', '.join(valid)}"
        return f"unknown {noun} '{key}': {fix}"
    if err["type"] == "value_error" and msg.startswith(f"{key}."):  # a section's check names its keys
        return msg
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) or err["type"] == "missing" else f" (got {got!r})"
    return f"{noun} '{key}': {msg[0].lower()}{msg[1:]}{shown}"


def _valid_keys(root: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the model at `loc`, looking through list[...] and optional annotations."""
    model: type[BaseModel] | None = root
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part)) if model else None
        candidates = (field.annotation, *get_args(field.annotation)) if field else ()
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return sorted(model.model_fields) if model else []


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error (PyYAML keeps the last)."""


def _mapping_without_duplicates(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, (str, int, float, bool)) and key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"key '{key}' appears twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})",
                key_node.start_mark,
            )
        if isinstance(key, (str, int, float, bool)):
            seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def read_yaml_mapping(path: Path, what: str) -> dict:
    """A non-empty YAML file that must hold a mapping; `what` names it in the one-line errors."""
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not a YAML file; pass the file inside it")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}; check its permissions") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError(f"{what} {path} is UTF-16 text; save it as UTF-8")
    if b"\0" in data:
        raise UserError(f"{what} {path} is a binary file, not YAML text; pass the YAML file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    try:
        loaded = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None)
        if problem and "appears twice" in problem:
            raise UserError(f"{what} {path}: {problem}; keep one") from None
        raise UserError(f"{what} {path} is not valid YAML{where}; fix its syntax") from None
    if loaded is None:
        raise UserError(f"{what} {path} is empty (no keys); write its settings, or leave the file out")
    if not isinstance(loaded, dict):
        raise UserError(f"{what} {path} must hold a mapping of keys")
    return loaded


def apply_override(tree: dict, dotted: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (`lr=1e-4`, `targets=[q,v]`)."""
    if "=" not in dotted:
        raise UserError(f"override '{dotted}' is not key=value; write e.g. train.lr=1e-4")
    key, raw = dotted.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or "cannot parse it"
        raise UserError(
            f"override '{dotted}': the value is not valid YAML ({problem}); quote it or fix the brackets"
        ) from None
    node: Any = tree
    parts = key.strip().split(".")
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(
                    f"override '{key}': '{part}' is not an index of that list (0..{len(node) - 1})"
                )
            if isinstance(node[int(part)], str):  # `methods=[lora]` then `methods.0.r=16`
                node[int(part)] = {"name": node[int(part)]}
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise UserError(f"override '{key}': '{'.'.join(parts[:i])}' is a value, not a section")
        if part not in node or node[part] is None:
            node[part] = [] if nxt.isdigit() else {}
        node = node[part]
    last = parts[-1]
    if not isinstance(node, (dict, list)):
        raise UserError(f"override '{key}': '{'.'.join(parts[:-1])}' is a value, not a section")
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise UserError(f"override '{key}': '{last}' is not an index of that list")
        node[int(last)] = value
    else:
        node[last] = value
