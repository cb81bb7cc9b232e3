"""Benchmarks: run a suite of training jobs side by side and turn them into JSON artefacts and a report.

Why a harness of its own and not timed unit tests: performance numbers are noisy and machine-bound, so
they live in artefacts (one JSON per run and repeat, with the machine, versions and a matmul peak
measured in the same invocation), and ratios are only ever taken between runs of one invocation.

- `suite.py`     the suite YAML (benchmarks/suites/<name>.yaml) as a validated pydantic model
- `runner.py`    `leantune bench`: each run in a fresh subprocess -> <results>/<suite>/<id>-r<k>.json
- `artefact.py`  what one artefact holds, built from the run's summary.json; atomic writes
- `peak.py`      the machine's dense matmul peak and the model-FLOP count of a run
- `hf_baseline.py` the same job with transformers.Trainer + peft, the baseline we measure against
- `report.py`    `leantune report`: markdown table + HTML with plots from the artefacts

This package must stay cheap to import (the CLI's `--help`): torch and friends are imported lazily.
"""
