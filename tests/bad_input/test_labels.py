"""Non-ASCII labels are labels like any other: '²' is not an integer (str.isdigit says it is)."""

from __future__ import annotations

import pytest

from leantune.config import DataConfig
from leantune.data.tasks import infer_label_names, label_id
from leantune.errors import UserError


def test_superscript_label_is_a_class_not_a_crash():
    rows = [{"label": v} for v in ("1", "0", "²", "10")]
    assert infer_label_names(rows, "label") == sorted(["0", "1", "10", "²"])


def test_non_ascii_labels_map_to_ids():
    names = infer_label_names([{"label": v} for v in ("négatif", "positif", "中性")], "label")
    assert label_id({"label": "中性", "_line": 2}, "label", names, "f.csv") == names.index("中性")


def test_superscript_outside_named_labels_names_the_line():
    with pytest.raises(UserError, match="line 4: label '²'"):
        label_id({"label": "²", "_line": 4}, "label", ["neg", "pos"], "f.csv")


def test_missing_label_marker_names_the_line():
    with pytest.raises(UserError, match="line 9: 'label' is 'NaN'"):
        label_id({"label": "NaN", "_line": 9}, "label", ["neg", "pos"], "f.csv")
    assert DataConfig().label_column == "label"
