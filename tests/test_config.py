"""Config loading: YAML + dotted overrides, defaults documented in configs/default.yaml, round trips."""

from __future__ import annotations

from pathlib import Path

import pytest

from leantune.config import Config, apply_override, dump_config, load_config
from leantune.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_default_yaml_documents_exactly_the_defaults():
    assert load_config(CONFIGS / "default.yaml") == Config()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.methods


def test_overrides_parse_yaml_values_and_list_indices():
    cfg = load_config(
        None,
        [
            "train.lr=1e-4",
            "methods.0.r=16",
            "methods.0.target_modules=[query, key]",
            "train.max_grad_norm=null",
            "train.mixed_precision=bf16",
        ],
    )
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.methods[0].r == 16 and cfg.methods[0].target_modules == ["query", "key"]
    assert cfg.train.max_grad_norm is None and cfg.train.mixed_precision == "bf16"


def test_methods_list_combines_plugins_in_order():
    cfg = load_config(None, ["methods=[{name: freeze, layers: 2}, lora]"])
    assert [m.name for m in cfg.methods] == ["freeze", "lora"]
    assert cfg.methods[0].layers == 2 and cfg.methods[1].r == 8


def test_dump_and_reload_round_trip(tmp_path):
    cfg = load_config(None, ["methods=[{name: freeze, layers: 1}]", "data.label_names=[a, b]"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(path)
    assert again == cfg and type(again.methods[0]).__name__ == "FreezeConfig"


def test_override_index_out_of_range():
    with pytest.raises(UserError, match="not an index"):
        apply_override({"methods": [{"name": "lora"}]}, "methods.3.r=4")


def test_metric_default_follows_task():
    assert load_config(None, []).metric == "accuracy"
    assert load_config(None, ["task=causal_lm"]).metric == "loss"
