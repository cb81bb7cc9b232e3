"""`leantune report SUITE`: the artefacts of a suite -> report.md (a README-ready table) + report.html.

Why a report is built only from artefacts: the artefacts are what we commit, so anyone can regenerate
the README's figures without rerunning anything. Ratios (time vs `full`, samples/s vs the HF baseline)
are taken between runs of the same repeat, which the runner measured back to back in one invocation,
never between numbers from different days. With repeats, a cell shows the median and the min-max spread.
"""

from __future__ import annotations

import base64
import html
import io
import json
import statistics
from collections.abc import Callable
from pathlib import Path

from leantune.bench.artefact import load_artefacts, metrics_path
from leantune.errors import UserError

MiB = 2**20


def _method_label(a: dict) -> str:
    parts = []
    for m in a["config"]["methods"]:
        if m["name"] in ("lora", "lora_sp"):
            parts.append(f"{m['name']} r{m.get('r')}")
        elif m["name"] == "freeze" and m.get("layers") is not None:
            parts.append(f"freeze {m['layers']}")
        else:
            parts.append(m["name"])
    label = " + ".join(parts)
    return f"{label} (HF Trainer)" if a["kind"] == "hf_baseline" else label


def _quality_metric(artefacts: list[dict]) -> str:
    tests = [a["metrics"]["test"] for a in artefacts]
    return "accuracy" if all("accuracy" in t for t in tests) else "loss"


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
            "accuracy" if self.metric == "accuracy" else "test loss",
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


# -- plots -----------------------------------------------------------------------------------------


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _scatter(table: Table, plt, x: Callable[[dict], float], xlabel: str, title: str) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    for i in table.ids:
        runs = list(table.by_id[i].values())
        xs = [x(a) for a in runs]
        ys = [a["metrics"]["test"].get(table.metric, float("nan")) for a in runs]
        ax.scatter(xs, ys, label=i)
        ax.annotate(
            i,
            (statistics.median(xs), statistics.median(ys)),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"test {table.metric}")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    png = _png(fig)
    plt.close(fig)
    return png


def _loss_curves(table: Table, plt, folder: Path) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    for n, i in enumerate(table.ids):
        first = min(table.by_id[i])
        for k in sorted(table.by_id[i]):
            path = metrics_path(folder, f"{i}-r{k}")
            if not path.is_file():
                continue
            pts = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "split" not in rec and isinstance(rec.get("loss"), (int, float)):
                    pts.append((rec["step"], rec["loss"]))
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    color=f"C{n}",
                    alpha=1.0 if k == first else 0.35,
                    label=i if k == first else None,
                    marker="." if len(pts) < 20 else None,
                )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    png = _png(fig)
    plt.close(fig)
    return png


def _scaling(table: Table, plt) -> str:
    """Training time and peak memory against tokens trained: linear time and flat memory are the goal."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for n, i in enumerate(table.ids):
        runs = list(table.by_id[i].values())
        tokens = [a["tokens_per_s"] * a["train_time_s"] / 1e3 for a in runs]
        left.scatter(tokens, [a["train_time_s"] for a in runs], color=f"C{n}", label=i)
        right.scatter(tokens, [a["peak_memory_bytes"] / MiB for a in runs], color=f"C{n}", label=i)
    for ax, ylabel in ((left, "training time (s)"), (right, "peak memory (MiB)")):
        ax.set_xlabel("tokens trained (thousands)")
        ax.set_ylabel(ylabel)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.suptitle("Scaling with the amount of training")
    png = _png(fig)
    plt.close(fig)
    return png


def html_report(table: Table, suite: str, context: list[str], folder: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = [
        (
            "Quality vs training time",
            _scatter(
                table, plt, lambda a: a["train_time_s"], "training time (s)", "Quality vs training time"
            ),
        ),
        (
            "Quality vs peak memory",
            _scatter(
                table,
                plt,
                lambda a: a["peak_memory_bytes"] / MiB,
                "peak memory (MiB)",
                "Quality vs peak memory",
            ),
        ),
        ("Training loss", _loss_curves(table, plt, folder)),
        ("Scaling", _scaling(table, plt)),
    ]
    header, rows = table.rows()
    esc = html.escape
    thead = "".join(f"<th>{esc(h)}</th>" for h in header)
    tbody = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    figs = "".join(
        f'<figure><img alt="{esc(t)}" src="data:image/png;base64,{png}"></figure>' for t, png in plots
    )
    notes = "".join(f"<p>{esc(line)}</p>" for line in context)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>leantune benchmark: {esc(suite)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }}
th {{ background: #f0f0f0; }} td:nth-child(-n+2) {{ text-align: left; }}
figure {{ display: inline-block; margin: 1em; }} p {{ max-width: 60em; }}
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
