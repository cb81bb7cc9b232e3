"""The bench report laid out for many runs: distinct styles, labels that do not overlap, confusion
matrices (recorded or derived exactly), every figure present, and the page rendered by a real Chromium.
Built from synthetic artefacts (no training), 17 runs like the seed002 suite."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from leantune.bench import plots
from leantune.bench.report import Table, html_report

N_RUNS = 17


def _artefact(i: int, repeat: int = 1) -> dict:
    acc = 0.6 + 0.01 * i
    tp, fp, fn, tn = 100 + i, 30, 40 - i, 130  # n = 300
    p, r = tp / (tp + fp), tp / (tp + fn)
    return {
        "schema": 1,
        "run_id": f"run_{i:02d}_lora",
        "kind": "leantune",
        "repeat": repeat,
        "invocation": "x",
        "task": "classification",
        "methods": ["lora"],
        "config": {"methods": [{"name": "lora", "r": 8}], "data": {"label_names": ["neg", "pos"]}},
        "data": {"train": 1000, "validation": 300, "test": 300},
        "train_time_s": 30.0 + (i % 4),  # clusters: points and labels crowd together
        "samples_per_s": 30.0 + i,
        "tokens_per_s": 1000.0,
        "peak_memory_bytes": (800 + 5 * (i % 3)) * 2**20,
        "params": {"trainable_pct": 0.1 * i, "trainable": i, "total": 100},
        "metrics": {
            "test": {
                "accuracy": (tp + tn) / 300 if i % 2 else acc,
                "precision": p,
                "recall": r,
                "f1": 2 * p * r / (p + r),
                "loss": 0.5,
            },
            "confusion": None
            if i % 2
            else {"labels": ["neg", "pos"], "matrix": [[tn + i, fp], [fn, tp - i]]},
        },
    }


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> tuple[Path, list[dict]]:
    folder = tmp_path_factory.mktemp("many")
    arts = [_artefact(i) for i in range(N_RUNS)]
    for a in arts:
        lines = [{"step": s, "epoch": 0, "loss": 0.7 - 0.01 * s} for s in range(10, 70, 10)]
        lines.append({"step": 63, "epoch": 0, "split": "validation", "accuracy": 0.7, "loss": 0.6})
        text = "".join(json.dumps(x) + "\n" for x in lines)
        (folder / f"{a['run_id']}-r1.metrics.jsonl").write_text(text)
    return folder, arts


@pytest.fixture(scope="module")
def page(suite) -> str:
    folder, arts = suite
    return html_report(Table(arts), "many", ["context"], folder)


def test_styles_are_distinct_for_many_runs():
    styles = [plots.run_style(i) for i in range(56)]
    assert len(set(styles)) == 56  # 8 Okabe-Ito colours x 7 markers
    assert {c for c, _ in styles} == set(plots.OKABE_ITO)


def test_confusion_recorded_or_derived_exactly():
    recorded = _artefact(0)
    assert plots.confusion_of(recorded) == (["neg", "pos"], [[130, 30], [40, 100]], False)
    derived = _artefact(1)  # no matrix: counts from accuracy, precision, recall and n = 300
    labels, matrix, was_derived = plots.confusion_of(derived)
    assert was_derived and labels == ["neg", "pos"] and matrix == [[130, 30], [39, 101]]
    derived["metrics"]["test"]["accuracy"] += 0.01  # numbers no confusion matrix can give: none drawn
    assert plots.confusion_of(derived) is None


def test_direct_labels_do_not_overlap():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    pts = [(30 + (i % 3), 0.7 + 0.002 * i, f"run_{i:02d}_lora") for i in range(N_RUNS)]  # one crowded spot
    ax.scatter([p[0] for p in pts], [p[1] for p in pts])
    ax.margins(x=0.5, y=0.5)
    fig.tight_layout()
    plots.direct_labels(ax, pts)
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in ax.texts]
    plt.close(fig)
    assert len(boxes) == N_RUNS
    overlaps = [(i, j) for i in range(len(boxes)) for j in range(i) if boxes[i].overlaps(boxes[j])]
    assert not overlaps


def test_report_has_every_figure(page):
    headings = [
        "Each metric per run",
        "Quality against cost",
        "Scaling with the amount of training",
        "Loss and metric curves per run",
        "Confusion matrices",
    ]
    for h in headings:
        assert f"<h2>{h}</h2>" in page
    assert page.count('src="data:image/png;base64,') == len(headings)
    assert "* derived exactly" in page  # odd runs have no recorded matrix
    assert page.count("<tr>") == 1 + N_RUNS


CHROMIUMS = ("chromium", "chromium-headless-shell", "chromium-browser", "google-chrome", "chrome")


def chromium() -> str | None:
    return next((found for name in CHROMIUMS if (found := shutil.which(name))), None)


def test_report_renders_in_real_chromium(page, tmp_path):
    browser = chromium()
    if browser is None:
        reason = (
            f"no Chromium on PATH (looked for {', '.join(CHROMIUMS)}); apt install chromium-headless-shell"
        )
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    html = tmp_path / "report.html"
    html.write_text(page)
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1400,7000",
            f"--screenshot={shot}",
            html.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    assert img.size == (1400, 7000)
    colours = img.getcolors(maxcolors=1400 * 7000) or []
    # the plots were decoded and drawn: their palette is on the page, not only text and table rules
    orange, blue = (0xE6, 0x9F, 0x00), (0x56, 0xB4, 0xE9)
    near = lambda c, ref: all(abs(a - b) <= 12 for a, b in zip(c, ref, strict=True))  # noqa: E731
    assert sum(n for n, c in colours if near(c, orange)) > 200
    assert sum(n for n, c in colours if near(c, blue)) > 200
    rows = [img.crop((0, y, 1400, y + 500)) for y in range(0, 7000, 500)]
    inked = [sum(n for n, c in r.convert("L").getcolors(1400 * 500) if c < 128) for r in rows]
    assert sum(1 for k in inked if k > 500) >= 8  # content down the page: the figures, not a blank tail
