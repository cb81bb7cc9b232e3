"""`leantune report SUITE`: the artefacts of a suite -> report.md (a README-ready table) + report.html.

Why a report is built only from artefacts: the artefacts are what we commit, so anyone can regenerate
the README's figures without rerunning anything. Ratios (time vs `full`, samples/s vs the HF baseline)
are taken between runs of the same repeat, which the runner measured back to back in one invocation,
never between numbers from different days. With repeats, a cell shows the median and the min-max spread.
"""

from __future__ import annotations

import html
import statistics
from collections.abc import Callable
from pathlib import Path

from leantune.bench.artefact import load_artefacts
from leantune.errors import UserError

MiB = 2**20


def _method_label(a: dict) -> str:
    parts = []
    for m in a["config"]["methods"]:
        if m["name"] in ("lora", "lora_sp"):
            parts.append(f"{m['name']} r{m.get('r')}")
        elif m["name"] == "freeze" and m.get("layers") is not None:
            parts.append(f"freeze {m['layers']}")
        elif m["name"] == "grad_approx" and m.get("mode", "approx") != "approx":
            parts.append(f"grad_approx {m['mode']}")  # the exact control must not read as the approximator
        else:
            parts.append(m["name"])
    label = " + ".join(parts)
    return f"{label} (HF Trainer)" if a["kind"] == "hf_baseline" else label


def _quality_metric(artefacts: list[dict]) -> str:
    """The test metric every run has: accuracy (classification), MSE (regression), micro F1
    (multi-label), else the loss."""
    tests = [a["metrics"]["test"] for a in artefacts]
    return next((m for m in ("accuracy", "mse", "micro_f1") if all(m in t for t in tests)), "loss")


def _cell(values: list[float], fmt: str | None = None, suffix: str = "") -> str:
    """The median, with the min-max spread when the values differ at the shown precision; '–' when none.

    `fmt` None picks the precision from the magnitude (3 significant digits or more), for times and rates
    that range from milliseconds (tiny smoke models) to minutes.
    """
    if not values:
        return "–"
    med = statistics.median(values)
    if fmt is None:
        fmt = ".0f" if abs(med) >= 100 else ".1f" if abs(med) >= 10 else ".2f" if abs(med) >= 1 else ".3f"
    lo, hi = format(min(values), fmt), format(max(values), fmt)
    if lo == hi:
        return format(med, fmt) + suffix
    return f"{format(med, fmt)}{suffix} ({lo}–{hi})"


def _trainable_pct(a: dict) -> float:
    """The mean active share for methods that train changing subsets (see `params_with_active_share`)."""
    return a["params"].get("trainable_active_pct", a["params"]["trainable_pct"])


def _test(key: str) -> Callable[[dict], float | None]:
    return lambda a: a["metrics"]["test"].get(key)


def did_not_learn(artefact: dict) -> bool:
    """A classification run whose test accuracy ends at or below the majority class share: a constant
    guess scores as much, so its quality cells compare nothing."""
    test = (artefact.get("metrics") or {}).get("test") or {}
    acc, majority = test.get("accuracy"), test.get("majority_accuracy")
    return acc is not None and majority is not None and acc <= majority


DID_NOT_LEARN = " (did not learn)"


class Table:
    """The artefacts grouped by run id (suite order) and repeat, with per-repeat ratios."""

    def __init__(self, artefacts: list[dict], order: list[str] | None = None) -> None:
        ids = list(dict.fromkeys(a["run_id"] for a in artefacts))
        if order:
            ids = [i for i in order if i in ids] + [i for i in ids if i not in order]
        self.ids = ids
        self.by_id: dict[str, dict[int, dict]] = {i: {} for i in ids}
        for a in artefacts:
            self.by_id[a["run_id"]][a["repeat"]] = a
        full_ft = [
            i for i in ids if self.first(i)["kind"] == "leantune" and self.first(i)["methods"] == ["full"]
        ]
        self.full = "full" if "full" in self.by_id else next(iter(full_ft), None)
        self.hf = next((i for i in ids if self.first(i)["kind"] == "hf_baseline"), None)
        self.metric = _quality_metric(artefacts)
        shots = {m["shots"] for a in artefacts if (m := a["metrics"].get("mmlu"))}
        self.mmlu_header = f"MMLU {'/'.join(map(str, sorted(shots)))}-shot" if shots else None
        # run ids with a repeat at or below the majority class: labelled in every table
        self.no_learning = [i for i in ids if any(did_not_learn(a) for a in self.by_id[i].values())]

    def first(self, run_id: str) -> dict:
        return self.by_id[run_id][min(self.by_id[run_id])]

    def values(self, run_id: str, get: Callable[[dict], float | None]) -> list[float]:
        return [v for a in self.by_id[run_id].values() if (v := get(a)) is not None]

    def ratios(self, run_id: str, ref: str | None, get: Callable[[dict], float]) -> tuple[list[float], bool]:
        """get(run) / get(ref) for every repeat both have (never across repeats), and whether any pair
        comes from different invocations (a resumed or partly rerun suite: not measured side by side)."""
        if ref is None:
            return [], False
        runs, refs = self.by_id[run_id], self.by_id[ref]
        pairs = [k for k in sorted(runs) if k in refs and get(refs[k])]
        crossed = any(runs[k].get("invocation") != refs[k].get("invocation") for k in pairs)
        return [get(runs[k]) / get(refs[k]) for k in pairs], crossed

    def _ratio_cell(self, run_id: str, ref: str | None, get: Callable[[dict], float]) -> str:
        values, crossed = self.ratios(run_id, ref, get)
        return _cell(values, ".2f", "x") + ("*" if crossed else "")

    def rows(self) -> tuple[list[str], list[list[str]]]:
        """Header and one row per run id; a ratio cell ends in '*' when it pairs different invocations."""
        header = [
            "run",
            "method",
            "trainable %",
            "train time (s)",
            f"time vs {self.full}" if self.full else "time vs full",
            "samples/s",
            f"samples/s vs {self.hf}" if self.hf else "samples/s vs HF",
            "peak memory (MiB)",
            "accuracy" if self.metric == "accuracy" else f"test {self.metric}",
            "F1",
            "MCC",
            "% of fp32 peak",
        ]
        if self.mmlu_header:
            header.append(self.mmlu_header)
        rows = []
        for i in self.ids:
            frac = self.values(i, lambda a: (a.get("flops") or {}).get("fraction_of_fp32_peak"))
            rows.append(
                [
                    i,
                    _method_label(self.first(i)),
                    _cell(self.values(i, _trainable_pct), ".3f"),
                    _cell(self.values(i, lambda a: a["train_time_s"])),
                    self._ratio_cell(i, self.full, lambda a: a["train_time_s"]),
                    _cell(self.values(i, lambda a: a["samples_per_s"])),
                    self._ratio_cell(i, self.hf, lambda a: a["samples_per_s"]),
                    _cell(self.values(i, lambda a: a["peak_memory_bytes"] / MiB), ".0f"),
                    _cell(self.values(i, _test(self.metric)), ".4f")
                    + (DID_NOT_LEARN if i in self.no_learning else ""),
                    _cell(self.values(i, _test("f1")), ".4f"),
                    _cell(self.values(i, _test("mcc")), ".4f"),
                    _cell([100 * f for f in frac], ".2f"),
                ]
            )
            if self.mmlu_header:
                mmlu = self.values(i, lambda a: (a["metrics"].get("mmlu") or {}).get("accuracy"))
                rows[-1].append(_cell(mmlu, ".3f"))
        return header, rows


def _context_lines(artefacts: list[dict]) -> list[str]:
    a = artefacts[0]
    m, v = a["machine"], a["versions"]
    peaks = [x["matmul_peak"] for x in artefacts if x.get("matmul_peak")]
    fp32 = sorted({round(p["fp32_gflops"]) for p in peaks})
    bf16 = sorted({round(p["bf16_gflops"]) for p in peaks})
    repeats = max(x["repeat"] for x in artefacts)
    invocations = len({x.get("invocation") for x in artefacts})
    mixed = ""
    if invocations > 1:
        mixed = (
            f" From {invocations} bench invocations: a ratio marked * pairs runs that were not measured "
            "side by side (`leantune bench SUITE --rerun` measures them again together)."
        )
    loads = [x["machine"]["load_avg_1m_5m_15m"][0] for x in artefacts if "load_avg_1m_5m_15m" in x["machine"]]
    busy = ""
    # A run's own threads already load every core (load ~ cpu_count); more than that is other work.
    if loads and max(loads) > (m.get("cpu_count") or 1) * 1.25:
        busy = (
            f" The machine was busy with other work during some runs (1-min load average up to "
            f"{max(loads):.1f} on {m.get('cpu_count')} CPUs): times are upper bounds and ratios are noisy."
        )
    lines = [
        f"Machine: {m.get('processor')} ({m.get('cpu_count')} CPUs, {m.get('torch_threads')} torch threads, "
        f"device {m.get('device')}); torch {v.get('torch')}, transformers {v.get('transformers')}, "
        f"peft {v.get('peft')}.",
        f"Matmul peak measured in the same invocation ({peaks[0]['size'] if peaks else '?'}^2): "
        f"{'/'.join(map(str, fp32)) or '?'} GFLOP/s fp32, {'/'.join(map(str, bf16)) or '?'} GFLOP/s bf16.",
        f"Repeats: {repeats}" + ("; cells show median (min–max)." if repeats > 1 else ".") + mixed + busy,
        "Ratios are taken between runs of the same repeat (measured back to back); quality is on the test "
        "split; peak memory is the process RSS (CUDA: max allocated); % of fp32 peak counts "
        "the model FLOPs a run really did (2·N forward over the blocks run, 2·N backward from the lowest "
        "trainable block, 2·N weight gradients for trainable weights; skipped and cached work left out), "
        "embedding lookups excluded.",
    ]
    if any("trainable_active_pct" in x["params"] for x in artefacts):
        lines.append(
            "Trainable % of a method that trains a changing subset (LISA) is the mean share that had "
            "gradients and optimizer state per step; over the run every parameter can change."
        )
    return lines


def markdown(table: Table, suite: str, context: list[str]) -> str:
    header, rows = table.rows()
    out = [
        f"# Benchmark: {suite}",
        "",
        *[f"{line}  " for line in context],
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out + _epoch_times(table)) + "\n"


def _epoch_times(table: Table) -> list[str]:
    """Training seconds per epoch (runs of more than one epoch), e.g. to show what a cache saves later."""
    ids = [i for i in table.ids if len(table.first(i).get("epoch_train_time_s") or []) > 1]
    if not ids:
        return []
    epochs = max(len(table.first(i)["epoch_train_time_s"]) for i in ids)
    out = [
        "",
        "Training time per epoch (s); last column: the first epoch's time over the mean of the later ones "
        "(without a cache it shows how much the machine's load drifted).",
        "",
        "| run | " + " | ".join(f"epoch {e + 1}" for e in range(epochs)) + " | epoch 1 / later |",
        "|" + "---|" * (epochs + 2),
    ]
    for i in ids:
        cells = [_cell(table.values(i, lambda a, e=e: _epoch(a, e))) for e in range(epochs)]
        ratio = [
            t[0] / (sum(t[1:]) / len(t[1:]))
            for a in table.by_id[i].values()
            if len(t := a["epoch_train_time_s"]) > 1
        ]
        out.append(f"| {i} | " + " | ".join(cells) + " | " + _cell(ratio, ".2f", "x") + " |")
    return out


def _epoch(artefact: dict, epoch: int) -> float | None:
    times = artefact.get("epoch_train_time_s") or []
    return times[epoch] if epoch < len(times) else None


# -- the HTML page --------------------------------------------------------------------------------


def _figures(table: Table, folder: Path, plt) -> list[tuple[str, str, str]]:
    """(heading, note, PNG) for every figure the artefacts have data for (leantune.bench.plots)."""
    from leantune.bench import plots

    quality = _test(table.metric)
    label = "accuracy" if table.metric == "accuracy" else f"test {table.metric}"
    panels = [
        (f"test {table.metric}", quality),
        ("test F1", _test("f1")),
        ("training time (s)", lambda a: a["train_time_s"]),
        ("peak memory (MiB)", lambda a: a["peak_memory_bytes"] / MiB),
        ("trainable %", _trainable_pct),
        ("samples/s", lambda a: a["samples_per_s"]),
    ]
    figures = [
        (
            "Each metric per run",
            "One panel per metric, runs in suite order; filled marker: median, hollow: each repeat.",
            plots.metric_panels(table, plt, panels),
        ),
        (
            "Quality against cost",
            "Each run named beside its point (median of repeats).",
            plots.scatter_panels(
                table,
                plt,
                [
                    ("training time (s)", lambda a: a["train_time_s"], label, quality),
                    ("peak memory (MiB)", lambda a: a["peak_memory_bytes"] / MiB, label, quality),
                ],
            ),
        ),
        (
            "Scaling with the amount of training",
            "Training time should grow linearly with the tokens trained, peak memory stay flat.",
            plots.scatter_panels(
                table,
                plt,
                [
                    (
                        "tokens trained (thousands)",
                        plots.tokens_k,
                        "training time (s)",
                        lambda a: a["train_time_s"],
                    ),
                    (
                        "tokens trained (thousands)",
                        plots.tokens_k,
                        "peak memory (MiB)",
                        lambda a: a["peak_memory_bytes"] / MiB,
                    ),
                ],
            ),
        ),
        (
            "Loss and metric curves per run",
            "From each run's logged metrics (metrics.jsonl); faint lines: later repeats.",
            plots.curve_panels(table, plt, folder),
        ),
    ]
    confusion, derived = plots.confusion_panels(table, plt)
    note = "Test split, first repeat; rows are the true class (colour: share of the row), cells hold counts."
    if derived:
        note += (
            " * derived exactly from the artefact's test accuracy, precision, recall and row count "
            "(binary runs whose artefacts predate the recorded matrix; checked by recomputing all three)."
        )
    figures.append(("Confusion matrices", note, confusion))
    return [(h, n, p) for h, n, p in figures if p]


def html_report(table: Table, suite: str, context: list[str], folder: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    header, rows = table.rows()
    esc = html.escape
    thead = "".join(f"<th>{esc(h)}</th>" for h in header)
    tbody = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    figs = "".join(
        f'<section><h2>{esc(h)}</h2><p class="note">{esc(note)}</p>'
        f'<figure><img alt="{esc(h)}" src="data:image/png;base64,{png}"></figure></section>'
        for h, note, png in _figures(table, folder, plt)
    )
    notes = "".join(f"<p>{esc(line)}</p>" for line in context)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>leantune benchmark: {esc(suite)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }}
th {{ background: #f0f0f0; }} td:nth-child(-n+2) {{ text-align: left; }}
figure {{ margin: 0.5em 0 2em 0; }} img {{ max-width: 100%; height: auto; }}
p {{ max-width: 60em; }} p.note {{ color: #555; font-size: 0.9em; }}
</style></head><body>
<h1>Benchmark: {esc(suite)}</h1>
{notes}
<table><thead><tr>{thead}</tr></thead><tbody>{tbody}</tbody></table>
{figs}
</body></html>
"""


def check_learned(table: Table, suite: str, allow: bool | list[str]) -> list[str]:
    """Refuse (UserError) a table whose runs end at or below the majority class unless the suite allows
    them; return the loud context line for those it allows (empty when every run learned)."""
    from fnmatch import fnmatch

    from leantune.errors import name_some

    if not table.no_learning:
        return []
    allowed = allow is True or all(
        any(fnmatch(i, pattern) for pattern in allow or []) for i in table.no_learning
    )
    shown = name_some(table.no_learning)
    if not allowed:
        barred = [i for i in table.no_learning if not any(fnmatch(i, p) for p in allow or [])]
        raise UserError(
            f"suite '{suite}': {name_some(barred)} ended at or below the majority class (test accuracy <= "
            "majority share), so a quality table would rank methods that learned nothing; no report "
            "written. Make them learn (more data or steps, their own lr), or set allow_no_learning: true "
            "in the suite for a time-only suite (or list those run ids there)"
        )
    if allow is True:
        return [
            f"**DID NOT LEARN: a time-only table.** {shown} ended at or below the majority class; "
            "their quality columns compare nothing (the suite sets allow_no_learning)."
        ]
    return [
        f"**DID NOT LEARN:** {shown} ended at or below the majority class (allowed by the suite's "
        "allow_no_learning, e.g. the diverging end of an lr sweep); their rows are marked."
    ]


def run_report(suite_arg: str, results: Path | None = None) -> tuple[Path, Path]:
    from leantune.atomic import write_text_atomic
    from leantune.bench.runner import DEFAULT_RESULTS
    from leantune.bench.suite import load_suite, resolve_suite_path

    order = None
    name = suite_arg
    allow: bool | list[str] = False
    try:
        suite = load_suite(resolve_suite_path(suite_arg))
        name, order, allow = suite.name, [r.id for r in suite.runs], suite.allow_no_learning
    except UserError:
        if suite_arg.endswith((".yaml", ".yml")):
            raise
        name = Path(suite_arg).name  # a suite without its YAML: report whatever artefacts exist
    folder = (results or DEFAULT_RESULTS) / name
    artefacts = load_artefacts(folder)
    if not artefacts:
        raise UserError(f"no benchmark artefacts in {folder}; run `leantune bench {suite_arg}` first")
    table = Table(artefacts, order)
    context = check_learned(table, name, allow) + _context_lines(artefacts)
    md_path, html_path = folder / "report.md", folder / "report.html"
    write_text_atomic(md_path, markdown(table, name, context))
    write_text_atomic(html_path, html_report(table, name, context, folder))
    print(f"wrote {md_path} and {html_path}")
    return md_path, html_path
