"""What a run tells its user: a start banner with what is trained, a loud warning when it learned nothing."""

from __future__ import annotations

from leantune.config import load_config
from leantune.recipes.train import quality_warnings, run_train


def test_a_run_at_the_majority_class_is_flagged():
    at = quality_warnings({"test": {"accuracy": 0.59375, "majority_accuracy": 0.59375}})
    assert len(at) == 1 and "test accuracy 0.5938 is at or below the majority class (0.5938)" in at[0]
    assert quality_warnings({"test": {"accuracy": 0.8, "majority_accuracy": 0.6}}) == []
    # without a test split the validation split decides; generation tasks have no majority class
    assert (
        "validation accuracy"
        in quality_warnings({"test": {}, "validation": {"accuracy": 0.4, "majority_accuracy": 0.6}})[0]
    )
    assert quality_warnings({"test": {"loss": 2.0, "perplexity": 7.4}}) == []


def test_the_banner_says_what_is_trained_and_the_summary_keeps_the_warnings(base_overrides, capsys):
    summary = run_train(load_config(None, [*base_overrides, "train.max_steps=2"]))
    out, err = capsys.readouterr()
    banner = next(line for line in out.splitlines() if line.startswith("leantune: training"))
    p = summary["params"]
    assert f"lora on {summary['config']['model']['name']} (classification)" in banner
    assert f"trainable {p['trainable']:,} of {p['total']:,}" in banner
    rows = summary["data"]
    assert f"data {rows['train']}/{rows['validation']}/{rows['test']} train/validation/test rows" in banner
    assert summary["warnings"] == quality_warnings(summary)
    assert all(f"leantune: warning: {w}" in err for w in summary["warnings"])


def test_version_print_config_and_dry_run_write_nothing(base_overrides, tmp_path, capsys):
    import yaml

    from leantune import __version__
    from leantune.cli import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"leantune {__version__}"
    assert main(["train", *base_overrides, "train.lr=0.01", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == 0.01 and printed["train"]["weight_decay"] is not None  # defaults too
    assert main(["train", *base_overrides, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (
        "dry run, would train lora" in out and "first batch: input_ids (16, " in out and "labels (16,)" in out
    )
    assert not (tmp_path / "run").exists()


def test_methods_lists_each_with_one_line():
    import contextlib
    import io

    from leantune.cli import main
    from leantune.methods.registry import available_methods

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["methods"]) == 0
    lines = buf.getvalue().splitlines()
    assert [ln.split()[0] for ln in lines] == available_methods()
    assert all(len(ln.split(None, 1)) == 2 and len(ln) < 130 for ln in lines)
