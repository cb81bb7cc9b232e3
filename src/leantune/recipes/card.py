"""The model card (README.md) written into a run's saved model: what it is, how it was made, how it scored.

peft writes a template card with empty fields; a user who copies the adapter folder elsewhere should find
the base model, the methods with their settings, the data, the metrics and the command to reproduce it in
the folder itself, so the card is rendered from the run's summary and resolved config.
"""

from __future__ import annotations

import yaml

from leantune import __version__

SHOWN_METRICS = ("accuracy", "f1", "precision", "recall", "mcc", "loss", "perplexity", "bleu", "rougeL")


def _method_line(method: dict) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in method.items() if k != "name")
    return f"`{method['name']}`" + (f" ({settings})" if settings else "")


def _metric_rows(summary: dict) -> list[str]:
    rows = []
    for split in ("validation", "test"):
        metrics = summary.get(split) or {}
        rows += [
            f"| {split} {k} | {metrics[k]:.4f} |" for k in SHOWN_METRICS if isinstance(metrics.get(k), float)
        ]
    return rows


def model_card(summary: dict, base_name: str, is_adapter: bool) -> str:
    cfg, params, train = summary["config"], summary["params"], summary["train"]
    data = cfg["data"]
    rows = summary.get("data", {})
    methods = " + ".join(m["name"] for m in cfg["methods"])
    load = (
        f"from peft import PeftModel\nfrom transformers import AutoModel\n\n"
        f'base = AutoModel.from_pretrained("{base_name}")  # the task class of your run, e.g. '
        f"AutoModelForSequenceClassification\nmodel = PeftModel.from_pretrained(base, FOLDER)"
        if is_adapter
        else "from transformers import AutoModel\n\nmodel = AutoModel.from_pretrained(FOLDER)"
    )
    lines = [
        "---",
        f"base_model: {base_name}",
        f"library_name: {'peft' if is_adapter else 'transformers'}",
        f"tags: [leantune, {', '.join(m['name'] for m in cfg['methods'])}]",
        "---",
        f"# {methods} on {base_name}",
        "",
        f"Fine-tuned with leantune {__version__} ({cfg['task']}).",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base_name}` (leantune `model.name`: `{cfg['model']['name']}`) |",
        f"| methods | {'; '.join(_method_line(m) for m in cfg['methods'])} |",
        f"| data | `{data['source']}`: {rows.get('train', '?')} train / {rows.get('validation', '?')} "
        f"validation / {rows.get('test', '?')} test rows |",
        f"| trainable parameters | {params['trainable']:,} of {params['total']:,} "
        f"({params['trainable_pct']:.3f}%) |",
        f"| steps | {train['steps']} ({train['epochs_completed']} epochs, "
        f"batch {cfg['train']['batch_size']}, lr {_lr_text(summary)}) |",
        *_metric_rows(summary),
        "",
        "## Load",
        "",
        "```python",
        load,
        "```",
        "",
        "## Reproduce",
        "",
        "Save the config below as `config.yaml` and run `leantune train config.yaml` (the run folder holds "
        "the same file).",
        "",
        "```yaml",
        yaml.safe_dump(cfg, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _lr_text(summary: dict) -> str:
    """train.lr, or under `lr: auto` the rate the range test chose."""
    auto = summary.get("lr_auto")
    return f"auto ({auto['lr']:.3g} from a range test)" if auto else str(summary["config"]["train"]["lr"])
