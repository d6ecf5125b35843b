"""`certbench report`: a self-contained HTML page and a Markdown twin from the Parquet
results alone.

    OUT/index.html     figures embedded as base64 PNG, opens without a server
    OUT/report.md      the same tables, figures linked from OUT/figures/
    OUT/figures/*.png

Sections, in order: soundness violations (in red, only if any), per-model tables (and, for
randomized smoothing, the noise draws per sample and per certified point next to fixed-N
CERTIFY's), certified accuracy versus epsilon, cost versus strength, peak memory,
certified-radius curves, tightness (certified radius / smallest adversarial distance), provenance.

A results folder of `certbench vnncomp` (``instances.parquet``) gets a section of its own:
instances per answer and verifier, soundness conflicts in red, and the competition's cactus
plot; with ``--official DIR``, the competition's score of every participant and of certbench
on the same instances, their curves in the cactus plot, and certbench's answers against
their consensus in red. Probabilistic
certificates (randomized smoothing) are marked everywhere: a dagger after
the verifier's name in tables and legends, dashed lines in figures. Only cells with status
``ok`` enter the figures; failed cells are listed in the tables with their status.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from certbench.errors import UserError  # noqa: E402
from certbench.report.official import (  # noqa: E402
    read_official,
    score_table,
    scored,
    wrong_lines,
)
from certbench.report.papers import papers_section  # noqa: E402
from certbench.report.summary import conflict_lines, solved_table  # noqa: E402
from certbench.report.view import (  # noqa: E402
    ATTACK_ROW,
    PROB_MARK,
    PROB_NOTE,
    WINNERS_NOTE,
    ResultsView,
)
from certbench.store import INSTANCES, ResultsStore  # noqa: E402
from certbench.verifiers import get_verifier  # noqa: E402

TABLE_NOTE = ("cert@eps: certified accuracy; #cert / #not / #falsified / #abstain / #timeout / "
              "#error: (sample, epsilon) pairs per verdict; violations: certified samples the "
              "attack flipped; PGD upper bound: robust accuracy can be no higher (not a "
              "certificate). A complete verifier (bab, exact) without timeouts gives the "
              "true robust accuracy: the gap from it to each incomplete method is that "
              "method's looseness, the gap to the PGD bound the attack's.")
SECTIONS = ("violations", "winners", "tables", "certified-vs-eps", "cost-vs-strength", "memory",
            "radius", "tightness", "provenance")
plt.rcParams.update({"figure.dpi": 110, "font.size": 9, "axes.grid": True,
                     "grid.alpha": 0.3, "savefig.bbox": "tight"})


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


MARKERS = "osD^vP*Xph<>"


def _line_style(results: ResultsView, shown: str, probabilistic: bool) -> dict:
    """Dashed for probabilistic; one marker per verifier, so that lines lying on top of
    each other (two methods with the same figures) stay visible."""
    index = sorted(results.ok["shown"].unique()).index(shown)
    return {"linestyle": "--" if probabilistic else "-", "marker": MARKERS[index % 11],
            "markersize": 4, "markerfacecolor": "none"}


def _panels(results: ResultsView, title: str):
    """A grid of axes: one row per model, one column per norm."""
    models = sorted(results.ok["model"].unique())
    norms = sorted(results.ok["norm"].unique())
    fig, axes = plt.subplots(len(models), len(norms), squeeze=False, layout="constrained",
                             figsize=(4.6 * len(norms), 2.6 * len(models) + 1.0))
    fig.suptitle(title)
    return fig, axes, models, norms


def _norm_panels(results: ResultsView, height: float = 4.0):
    """One axes per norm, side by side."""
    norms = sorted(results.ok["norm"].unique())
    fig, axes = plt.subplots(1, len(norms), squeeze=False, figsize=(5.5 * len(norms), height))
    return fig, axes[0], norms


def _shared_legend(fig, axes) -> None:
    """One legend for all panels, below them (the panels stay readable)."""
    entries = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    if not entries:  # e.g. the radius figure when no verifier reports a radius
        return
    fig.legend(entries.values(), entries.keys(), loc="outside lower center",
               ncol=min(4, len(entries)), fontsize=7.5)


def figure_certified_vs_eps(results: ResultsView) -> bytes:
    fig, axes, models, norms = _panels(results, "Certified accuracy versus epsilon")
    data = results.certified.merge(results.ok, on="cell_key")
    for r, model in enumerate(models):
        for c, norm in enumerate(norms):
            ax = axes[r][c]
            part = data[(data["model"] == model) & (data["norm"] == norm)]
            for label, cell in part.groupby("shown", sort=True):
                ax.plot(cell["eps"], cell["certified_acc"], label=label,
                        **_line_style(results, label, bool(cell["probabilistic"].iloc[0])))
            attack = part.dropna(subset=["attack_upper_bound"]).groupby("eps")[
                "attack_upper_bound"].first()
            if not attack.empty:
                ax.plot(attack.index, attack.values, color="black", linestyle=":",
                        label="PGD upper bound")
            if not part.empty:
                ax.axhline(part["clean_acc"].iloc[0], color="grey", linewidth=0.8,
                           label="clean accuracy")
            ax.set_title(f"{model}, l{norm}")
            ax.set_xlabel(f"epsilon (l{norm}, pixel scale [0, 1])")
            ax.set_ylabel("certified accuracy")
            ax.set_ylim(-0.02, 1.02)
    _shared_legend(fig, axes)
    return _png(fig)


def _strength_eps(results: ResultsView, norm: str) -> float:
    """The epsilon the cost figure uses: the middle of the norm's grid."""
    grid = sorted(results.certified.merge(results.ok[results.ok["norm"] == norm],
                                          on="cell_key")["eps"].unique())
    return float(grid[(len(grid) - 1) // 2]) if grid else float("nan")


def figure_cost_vs_strength(results: ResultsView) -> bytes:
    fig, axes, norms = _norm_panels(results)
    markers = MARKERS
    models = sorted(results.ok["model"].unique())
    labels = sorted(results.ok["shown"].unique())
    colours = {label: plt.cm.tab10(i % 10) for i, label in enumerate(labels)}
    data = results.certified.merge(results.ok, on="cell_key")
    for ax, norm in zip(axes, norms, strict=True):
        eps = _strength_eps(results, norm)
        part = data[(data["norm"] == norm) & np.isclose(data["eps"], eps)]
        for _, row in part.iterrows():
            ax.scatter(row["per_sample_s"] * 1e3, row["certified_acc"],
                       color=colours[row["shown"]],
                       marker=markers[models.index(row["model"]) % len(markers)],
                       facecolors="none" if row["probabilistic"] else None)
        ax.set_xscale("log")
        ax.set_xlabel("time per sample (ms, log scale)")
        ax.set_ylabel(f"certified accuracy at eps = {eps:g}")
        ax.set_title(f"Cost versus strength, l{norm}")
        handles = [plt.Line2D([], [], color=colours[lb], marker="o", linestyle="", label=lb)
                   for lb in labels]
        handles += [plt.Line2D([], [], color="black", marker=markers[i % len(markers)],
                               linestyle="", label=m) for i, m in enumerate(models)]
        ax.legend(handles=handles, fontsize=6.5, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    return _png(fig)


def figure_memory(results: ResultsView) -> bytes:
    ok = results.ok.dropna(subset=["peak_mem_bytes"])
    bars = results.ok["shown"].nunique() * results.ok["model"].nunique()
    fig, axes, norms = _norm_panels(results, max(4.0, 1.5 + 0.13 * bars))
    kinds = ", ".join(sorted(ok["mem_kind"].dropna().unique())) or "none"
    for ax, norm in zip(axes, norms, strict=True):
        table = ok[ok["norm"] == norm].pivot_table(
            index="shown", columns="model", values="peak_mem_bytes", aggfunc="max") / 2**20
        if not table.empty:
            table.plot.barh(ax=ax, width=0.8)
            if (table > 0).all().all() and table.max().max() > 50 * table.min().min():
                ax.set_xscale("log")  # spans decades: a linear axis hides the small cells
        ax.set_xlabel(f"peak memory (MiB; {kinds})")
        ax.set_ylabel("verifier")
        ax.set_title(f"Peak memory per cell, l{norm}")
        ax.legend(fontsize=6.5, title="model", title_fontsize=7, loc="upper left",
                  bbox_to_anchor=(1, 1))
    fig.tight_layout()
    return _png(fig)


def _per_sample(results: ResultsView) -> pd.DataFrame:
    """One row per cell and sample (radius and attack distance repeat across epsilon)."""
    samples = results.samples.drop_duplicates(["cell_key", "sample_index"])
    return samples.merge(results.ok, on="cell_key")


def figure_radius(results: ResultsView) -> bytes:
    fig, axes, models, norms = _panels(results, "Certified radius: fraction of samples "
                                       "certified correctly at radius >= r")
    data = _per_sample(results)
    for r, model in enumerate(models):
        for c, norm in enumerate(norms):
            ax = axes[r][c]
            part = data[(data["model"] == model) & (data["norm"] == norm)]
            for label, cell in part.groupby("shown", sort=True):
                radius = np.where(cell["prediction"] == cell["label"],
                                  cell["radius"].fillna(0.0), 0.0)
                if np.isnan(cell["radius"]).all():
                    continue  # the method gives no radius
                xs = np.sort(radius)
                ys = 1.0 - np.arange(len(xs)) / len(xs)
                ax.step(xs, ys, where="post", label=label,
                        linestyle="--" if cell["probabilistic"].iloc[0] else "-")
            ax.set_title(f"{model}, l{norm}")
            ax.set_xlabel(f"radius r (l{norm})")
            ax.set_ylabel("fraction of samples")
            ax.set_ylim(-0.02, 1.02)
    _shared_legend(fig, axes)
    return _png(fig)


def tightness_table(results: ResultsView) -> pd.DataFrame:
    """Per model, norm and verifier: the median and 10th percentile of certified radius /
    smallest adversarial distance over samples with both (1 = tight)."""
    data = _per_sample(results)
    if "adv_distance" not in data:
        return pd.DataFrame()
    data = data[np.isfinite(data["adv_distance"]) & (data["adv_distance"] > 0)
                & data["radius"].notna()]
    data = data.assign(ratio=data["radius"] / data["adv_distance"])
    grouped = data.groupby(["model", "norm", "shown"])["ratio"]
    return pd.DataFrame({"median": grouped.median(), "p10": grouped.quantile(0.1),
                         "n": grouped.size()}).reset_index()


def smoothing_draws_table(results: ResultsView) -> pd.DataFrame:
    """Per randomized-smoothing cell: mean noise draws per sample (selection and
    estimation) and per certified point (samples certified at the grid's smallest
    epsilon), next to fixed-N CERTIFY's n0 + n, and the time per sample."""
    samples = _per_sample(results)
    if "noise_draws" not in samples:
        return pd.DataFrame()
    rows = []
    for key, cell in samples.dropna(subset=["noise_draws"]).groupby("cell_key"):
        meta = results.ok.set_index("cell_key").loc[key]
        options = json.loads(meta["options"])
        try:  # a user's verifier may not be registered in this process
            verifier = get_verifier(meta["method"], **options)
            fixed = verifier.n0 + verifier.n
        except (KeyError, TypeError, ValueError, AttributeError):
            fixed = float("nan")
        certified = results.samples[(results.samples["cell_key"] == key)
                                    & results.samples["certified"]]["sample_index"].unique()
        rows.append({
            "model": meta["model"], "verifier": meta["shown"], "norm": meta["norm"],
            "mode": "sequential" if options.get("sequential") else "fixed N",
            "draws/sample": round(cell["noise_draws"].mean()),
            "draws/certified": _rounded(
                cell[cell["sample_index"].isin(certified)]["noise_draws"].mean()),
            "fixed N draws": fixed,
            "ms/sample": meta["per_sample_s"] * 1e3,
        })
    table = pd.DataFrame(rows)
    if not table.empty:
        table["fewer"] = table["fixed N draws"] / table["draws/sample"]
        table = table.sort_values(["model", "norm", "verifier"]).reset_index(drop=True)
    return table


def _rounded(value: float) -> int | float:
    return value if np.isnan(value) else round(value)


def figure_tightness(results: ResultsView) -> bytes:
    data = _per_sample(results)
    fig, axes, norms = _norm_panels(results)
    for ax, norm in zip(axes, norms, strict=True):
        if "adv_distance" in data:
            part = data[(data["norm"] == norm) & np.isfinite(data["adv_distance"])
                        & (data["adv_distance"] > 0) & data["radius"].notna()]
            labels = sorted(part["shown"].unique())
            ratios = [(part[part["shown"] == lb]["radius"]
                       / part[part["shown"] == lb]["adv_distance"]).to_numpy() for lb in labels]
            if labels:
                ax.boxplot(ratios, orientation="horizontal", tick_labels=labels, showfliers=False)
        ax.axvline(1.0, color="red", linewidth=0.8)
        ax.set_xlabel("certified radius / smallest adversarial distance found (1 = tight)")
        ax.set_title(f"Tightness, l{norm} (all models pooled)")
    fig.tight_layout()
    return _png(fig)


VERDICT_COLUMNS = {"certified": "#cert", "not_certified": "#not", "falsified": "#falsified",
                   "abstain": "#abstain", "timeout": "#timeout", "error": "#error"}


def model_tables(results: ResultsView) -> dict[str, pd.DataFrame]:
    """Per model and norm: one row per verifier (view.py's `cell_table`, and the attack's
    upper bound); the ``#`` columns count (sample, epsilon) pairs per verdict (``#not``:
    not certified)."""
    verdicts = results.samples.groupby(["cell_key", "verdict"]).size().unstack(fill_value=0)
    tables = {}
    for (model, norm), group in results.cells.groupby(["model", "norm"], sort=True):
        table = results.cell_table(group)
        status = table.pop("status")
        violations = table.pop("violations") if "violations" in table else None
        for verdict, short in VERDICT_COLUMNS.items():
            if verdict in verdicts:
                table[short] = verdicts[verdict].reindex(table.index).fillna(0).astype(int)
        table["status"] = status
        if violations is not None:
            table["violations"] = violations
        attack = results.attack_row(group)
        if attack is not None:
            table = pd.concat([table, attack])
        tables[f"{model}, l{norm}"] = table.reset_index(drop=True)
    return tables


def provenance(results: ResultsView, folder: Path) -> dict[str, str]:
    cells = results.cells
    versions = sorted(set(cells["versions"].dropna()))
    devices = sorted(set(cells["device"].dropna()))
    return {
        "results": str(folder),
        "matrix": ", ".join(sorted(set(cells.get("matrix", pd.Series()).dropna()))) or "-",
        "matrix file": ", ".join(sorted(set(cells.get("matrix_file", pd.Series()).dropna())))
        or "-",
        "device": ", ".join(devices),
        "git commit": ", ".join(sorted(set(cells["git_commit"].dropna()))) or "-",
        "runs": ", ".join(sorted(set(cells["run_id"].dropna()))),
        "dates (UTC)": f"{cells['started_at'].min()} to {cells['finished_at'].max()}",
        "library versions": "; ".join(
            ", ".join(f"{k} {v}" for k, v in json.loads(text).items()) for text in versions),
    }


FIGURES = {
    "certified-vs-eps": ("Certified accuracy versus epsilon", figure_certified_vs_eps,
                         "One panel per model and norm; dotted: PGD's upper bound on robust "
                         "accuracy; grey: clean accuracy; dashed: probabilistic."),
    "cost-vs-strength": ("Cost versus strength", figure_cost_vs_strength,
                         "Certified accuracy at the middle epsilon of each grid against "
                         "certification time per sample; colour: verifier, marker: model; "
                         "hollow: probabilistic."),
    "memory": ("Peak memory", figure_memory,
               "Peak memory of each cell (setup, warm-up and certification). On CUDA: "
               "max_memory_allocated; on CPU (rss): growth of the resident-set high-water "
               "mark of the cell's own worker process over its level with the model "
               "loaded (cells run with --executor inline share one process and may read "
               "low)."),
    "radius": ("Certified radius", figure_radius,
               "Fraction of samples correctly classified with certified radius at least r "
               "(verifiers that report a radius)."),
    "tightness": ("Tightness", figure_tightness,
                  "Certified radius over the smallest adversarial distance PGD found, per "
                  "sample; sound methods stay at or below 1."),
}


def _fmt(value) -> str:
    if isinstance(value, float):
        return "-" if np.isnan(value) else f"{value:.3g}"
    return str(value)


def marked(table: pd.DataFrame, mark) -> pd.DataFrame:
    """``table`` formatted for reading, with the best value of each ``cert@`` column among
    the deterministic verifiers' rows passed through ``mark`` (bold): not the PGD row, an
    upper bound, nor smoothing's, a probabilistic certificate."""
    shown = table.map(_fmt)
    rows = ~table["verifier"].astype(str).str.endswith(PROB_MARK) & (
        table["verifier"] != "~ " + ATTACK_ROW) & (table["verifier"] != ATTACK_ROW)
    for column in (c for c in table.columns if str(c).startswith("cert@")):
        values = table.loc[rows, column].astype(float)
        if values.notna().any() and values.max() > 0:
            best = rows & (table[column].astype(float) == values.max())
            shown.loc[best, column] = shown.loc[best, column].map(mark)
    return shown


PLOT_FLOOR_S = 0.01


def figure_cactus(table: pd.DataFrame, official: pd.DataFrame | None = None) -> bytes:
    """VNN-COMP's cactus plot: per benchmark, for each verifier the verification times of
    its solved instances (unsat or sat) sorted, against their count. With the
    competition's results, their participants' curves on the same instances beside
    (thin, dashed), every tool's time after its overhead as the competition counts it."""
    if official is not None:
        table = scored(official, table).rename(columns={"tool": "verifier"})
    benchmarks = sorted(table["benchmark"].unique())
    columns = min(4, len(benchmarks))
    rows_of_plots = -(-len(benchmarks) // columns)
    fig, axes = plt.subplots(rows_of_plots, columns, squeeze=False,
                             figsize=(4.6 * columns, 3.6 * rows_of_plots), layout="constrained")
    for ax in axes.flat[len(benchmarks):]:
        ax.set_visible(False)
    for ax, benchmark in zip(axes.flat, benchmarks, strict=False):
        rows = table[table["benchmark"] == benchmark]
        for i, (verifier, group) in enumerate(sorted(rows.groupby("verifier"))):
            times = np.sort(group.loc[group["result"].isin(["unsat", "sat"]), "time_s"])
            times = np.maximum(times, PLOT_FLOOR_S)  # a log axis: no zero times
            theirs = official is not None and not verifier.startswith("certbench ")
            ax.step(np.arange(1, len(times) + 1), times, where="post", label=verifier,
                    marker=MARKERS[i % len(MARKERS)], markersize=2 if theirs else 3,
                    markevery=max(1, len(times) // 8), linewidth=0.7 if theirs else 1.6,
                    linestyle="--" if theirs else "-")
        ax.set(title=f"{benchmark} ({rows['instance'].nunique()} instances)",
               xlabel="instances solved", ylabel="verification time (s)", yscale="log")
        ax.legend(fontsize=6.5 if official is not None else 7.5)
    return _png(fig)


VNN_NOTE = ("unsat: proved (no input in the box reaches the unsafe set); sat: counterexample "
            "accepted by the competition's judge (onnxruntime; box and unsafe set each with "
            "its tolerance of 1e-4); unknown: not decided; timeout: over the "
            "instance's timeout; error: the verifier failed. Times: median verification time of "
            "solved instances and median overhead (loading, parsing, prepare).")
CACTUS_CAPTION = ("Cactus plot (VNN-COMP's standard figure): the k-th point of a line is the "
                  "time the verifier needed for its k-th fastest solved instance; further "
                  "right is more solved, lower is faster.")


SCORE_NOTE = ("The competition's 2022 score on the instances certbench answered: correct "
              "unsat or sat 10 points, wrong -100 (against the participants' consensus), "
              "+2 / +1 to the fastest / second fastest correct answer (times after each "
              "tool's overhead, at least 1 s, within 0.2 s equal). certbench ran on another "
              "machine, possibly at scaled timeouts: its time bonus compares across hardware.")


def vnncomp_section(table: pd.DataFrame, out: Path,
                    official: pd.DataFrame | None = None) -> tuple[str, str]:
    """The VNN-COMP section as Markdown and HTML; writes figures/cactus.png. With the
    competition's results (`official.read_official`), the score table beside them and
    certbench's answers against their consensus (in red)."""
    image = figure_cactus(table, official)
    (out / "figures" / "cactus.png").write_bytes(image)
    summary = solved_table(table).map(_fmt)
    alarms = conflict_lines(table)
    md_score, html_score = [], ""
    if official is not None:
        alarms += wrong_lines(official, table)
        scores = score_table(official, table).map(_fmt)
        md_score = ["### Beside the competition's participants", "", SCORE_NOTE, "",
                    scores.to_markdown(index=False), ""]
        html_score = (f"<h3>Beside the competition's participants</h3><p class='note'>"
                      f"{html.escape(SCORE_NOTE)}</p><div class='scroll'>"
                      f"{scores.to_html(index=False)}</div>")
    md = "\n".join(["## VNN-COMP instances", "", VNN_NOTE, "", *[f"**{a}**" for a in alarms],
                    "", summary.to_markdown(index=False), "", *md_score,
                    "![cactus plot](figures/cactus.png)", "", CACTUS_CAPTION, ""])
    data = base64.b64encode(image).decode()
    red = "".join(f"<p class='violations'>{html.escape(a)}</p>" for a in alarms)
    page = (f"<section id='vnncomp'><h2>VNN-COMP instances</h2><p class='note'>"
            f"{html.escape(VNN_NOTE)}</p>{red}{summary.to_html(index=False)}{html_score}"
            f"<img alt='cactus plot' src='data:image/png;base64,{data}'>"
            f"<p class='note'>{html.escape(CACTUS_CAPTION)}</p></section>")
    return md, page


def _vnncomp_provenance(table: pd.DataFrame, folder: Path) -> dict[str, str]:
    versions = sorted(set(table["versions"].dropna()))
    return {
        "results": str(folder),
        "benchmarks": ", ".join(sorted(table["benchmark"].unique())),
        "device": ", ".join(sorted(set(table["device"].dropna()))),
        "git commit": ", ".join(sorted(set(table["git_commit"].dropna()))) or "-",
        "runs": ", ".join(sorted(set(table["run_id"].dropna()))),
        "dates (UTC)": f"{table['started_at'].min()} to {table['finished_at'].max()}",
        "library versions": "; ".join(
            ", ".join(f"{k} {v}" for k, v in json.loads(text).items()) for text in versions),
    }


def _vnncomp_report(folder: Path, out: Path, table: pd.DataFrame,
                    official: pd.DataFrame | None) -> Path:
    md, page = vnncomp_section(table, out, official)
    name = folder.name
    prov = _vnncomp_provenance(table, folder)
    lines = [f"# certbench report: {name}", "", md, "## Provenance", ""]
    lines += [f"- **{k}**: {v}" for k, v in prov.items()]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
                   for k, v in prov.items())
    index = out / "index.html"
    index.write_text(
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>certbench report: "
        f"{html.escape(name)}</title><style>{CSS}</style></head><body><h1>certbench report: "
        f"{html.escape(name)}</h1>{page}<section id='provenance'><h2>Provenance</h2><table>"
        f"{rows}</table></section></body></html>", encoding="utf-8")
    return index


def build_report(results_dir: str | Path, out: str | Path,
                 official: str | Path | None = None) -> Path:
    """Write OUT/index.html, OUT/report.md and OUT/figures/; returns the HTML path.
    ``official``: a folder of the competition's results, scored beside certbench's
    VNN-COMP answers (`official`)."""
    folder, out = Path(results_dir), Path(out)
    official = read_official(official) if official is not None else None
    vnn = ResultsStore(folder).read(INSTANCES)
    if not vnn.empty and not ResultsStore(folder).path("cells").exists():
        (out / "figures").mkdir(parents=True, exist_ok=True)
        return _vnncomp_report(folder, out, vnn, official)
    results = ResultsView.load(folder)
    if results.ok.empty:
        raise UserError(f"{folder}: no cell finished with status ok; nothing to plot")
    (out / "figures").mkdir(parents=True, exist_ok=True)
    images = {}
    for key, (_, draw, _) in FIGURES.items():
        images[key] = draw(results)
        (out / "figures" / f"{key}.png").write_bytes(images[key])
    tables = model_tables(results)
    draws = smoothing_draws_table(results)
    if not draws.empty:
        tables["Randomized smoothing: noise draws"] = draws
    tight = tightness_table(results)
    prov = provenance(results, folder)
    violations = results.violation_lines() + results.unchecked_lines()
    has_prob = bool(results.cells["probabilistic"].any())
    name = prov["matrix"]
    extra = vnncomp_section(vnn, out, official) if not vnn.empty else ("", "")
    gls = gls_section(results, folder, out)
    papers = papers_section(results)
    extra = (extra[0] + gls[0] + papers[0], extra[1] + gls[1] + papers[1])
    winners = results.winners()
    (out / "report.md").write_text(
        _markdown(name, tables, tight, prov, violations, has_prob, winners, extra[0]),
        encoding="utf-8")
    page = out / "index.html"
    page.write_text(_html(name, tables, tight, prov, violations, has_prob, images, winners,
                          extra[1]), encoding="utf-8")
    return page


def _markdown(name, tables, tight, prov, violations, has_prob, winners, vnncomp_md="") -> str:
    lines = [f"# certbench report: {name}", ""]
    if violations:
        lines += ["## Soundness violations", ""] + [f"- **{v}**" for v in violations] + [""]
    lines += ["## Who wins where", "", WINNERS_NOTE, "",
              winners.map(_fmt).to_markdown(index=False), ""]
    lines += ["## Results per model", "", TABLE_NOTE, ""]
    if has_prob:
        lines += [PROB_NOTE, ""]
    for title, table in tables.items():
        lines += [f"### {title}", "", marked(table, "**{}**".format).to_markdown(index=False), ""]
    for key, (title, _, caption) in FIGURES.items():
        lines += [f"## {title}", "", f"![{title}](figures/{key}.png)", "", caption, ""]
        if key == "tightness" and not tight.empty:
            lines += [tight.map(_fmt).to_markdown(index=False), ""]
    lines += [vnncomp_md] if vnncomp_md else []
    lines += ["## Provenance", ""] + [f"- **{k}**: {v}" for k, v in prov.items()]
    return "\n".join(lines) + "\n"


CSS = """
body { font-family: system-ui, sans-serif; max-width: 1300px; margin: 2em auto; padding: 0 1em;
       color: #222; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.78em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.15em 0.4em; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
tr:last-child td { color: #555; font-style: italic; }
.violations { border: 2px solid #c00; color: #c00; padding: 0.5em 1em; }
.note { color: #555; font-size: 0.9em; }
img { max-width: 100%; }
"""


def _html(name, tables, tight, prov, violations, has_prob, images, winners,
          vnncomp_html="") -> str:
    esc = html.escape
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>certbench report: {esc(name)}</title><style>{CSS}</style></head><body>",
             f"<h1>certbench report: {esc(name)}</h1>"]
    nav = " · ".join(f"<a href='#{s}'>{s}</a>" for s in SECTIONS
                     if s != "violations" or violations)
    parts.append(f"<p class='note'>{nav}</p>")
    if violations:
        items = "".join(f"<li>{esc(v)}</li>" for v in violations)
        parts.append(f"<section id='violations' class='violations'><h2>Soundness violations"
                     f"</h2><ul>{items}</ul></section>")
    parts.append(f"<section id='winners'><h2>Who wins where</h2><p class='note'>"
                 f"{esc(WINNERS_NOTE)}</p><div class='scroll'>"
                 f"{winners.map(_fmt).to_html(index=False)}</div></section>")
    parts.append(f"<section id='tables'><h2>Results per model</h2>"
                 f"<p class='note'>{esc(TABLE_NOTE)}</p>")
    if has_prob:
        parts.append(f"<p class='note'>{esc(PROB_NOTE)}</p>")
    for title, table in tables.items():
        shown = marked(table.map(lambda v: esc(v) if isinstance(v, str) else v),
                       "<b>{}</b>".format)
        parts.append(f"<h3>{esc(title)}</h3><div class='scroll'>"
                     f"{shown.to_html(index=False, escape=False)}</div>")
    parts.append("</section>")
    for key, (title, _, caption) in FIGURES.items():
        data = base64.b64encode(images[key]).decode()
        parts.append(f"<section id='{key}'><h2>{esc(title)}</h2>"
                     f"<img alt='{esc(title)}' src='data:image/png;base64,{data}'>"
                     f"<p class='note'>{esc(caption)}</p>")
        if key == "tightness" and not tight.empty:
            parts.append(tight.map(_fmt).to_html(index=False))
        parts.append("</section>")
    parts.append(vnncomp_html)
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in prov.items())
    parts.append(f"<section id='provenance'><h2>Provenance</h2><table>{rows}</table></section>")
    parts.append("</body></html>")
    return "\n".join(parts)


# -- Gaussian Loss Smoothing: the paradox of certified training ----------------------------
PARADOX_CAPTION = ("Certified accuracy of models trained on each relaxation (x axis) by each "
                   "optimiser (GRAD: plain gradients; PGPE, RGS: Gaussian Loss Smoothing), "
                   "one panel per certifying verifier (rows) and epsilon (columns); the grey "
                   "tick is the model's clean accuracy; with several seeds, the bar is their "
                   "mean and the whisker their range.")
LANDSCAPE_CAPTION = ("Robust loss CE(-m, y) along one random direction d in weight space "
                     "(theta + t d, d scaled per tensor to the tensor's norm) on 100 training "
                     "points at the training epsilon: raw (solid) and its Gaussian smoothing "
                     "over the weights at sigma (dashed, the same draws at every t).")
PARADOX_TABLE_NOTE = ("Certified accuracy per training optimiser and relaxation (rows) and "
                      "certifying verifier at each epsilon (columns, verifier@eps); clean: "
                      "clean accuracy on the evaluated points; train_s: wall-clock training "
                      "time from the checkpoint card, as measured when it was trained (a shared "
                      "machine inflates it), where training.parquet is present.")
OPTIMISER_ORDER = ("GRAD", "PGPE", "RGS")
RELAXATION_ORDER = ("IBP", "CROWN-IBP", "CROWN", "alpha-CROWN")


def paradox_models(results: ResultsView, folder: Path | None) -> pd.DataFrame:
    """Model -> optimiser, training relaxation and training seed (and training cost where
    known): from ``training.parquet`` (`certbench.training.paradox`) when the folder has one,
    else from the recipe, and for GLS recipes the bound and for every model the seed in the
    run's matrix file, if readable (seed 0, the matrix default, otherwise)."""
    from certbench.training.recipes import training_relaxation

    if folder is not None and (folder / "training.parquet").exists():
        table = pd.read_parquet(folder / "training.parquet")
        if "seed" not in table:
            table["seed"] = 0
        return table.dropna(subset=["optimiser"])[["model", "optimiser", "relaxation",
                                                   "seed", "train_time_s"]]
    from certbench.matrix import load_matrix

    cells = results.cells
    models = cells.drop_duplicates("model")
    specs = {}
    sources = models["matrix_file"].dropna().unique() if "matrix_file" in cells else []
    for source in sources:
        try:
            spec = load_matrix(str(source).removeprefix("packaged: "))
        except Exception:  # a moved or edited matrix file: GLS models get the default bound
            continue
        specs.update({m.name: m for m in spec.models})
    rows = []
    for r in models.itertuples():
        spec = specs.get(r.model)
        kind = training_relaxation(r.recipe, spec.recipe_args if spec else {})
        if kind:
            rows.append({"model": r.model, "optimiser": kind[0], "relaxation": kind[1],
                         "seed": spec.seed if spec else 0})
    return pd.DataFrame(rows, columns=["model", "optimiser", "relaxation", "seed"])


def paradox_table(results: ResultsView, kinds: pd.DataFrame) -> pd.DataFrame:
    """One row per model, ordered by optimiser, relaxation and seed: clean accuracy,
    training time where known, and certified accuracy per certifying verifier and epsilon."""
    ok = results.ok[~results.ok["probabilistic"]].merge(kinds, on="model")
    data = results.certified.merge(ok, on="cell_key")
    wide = data.pivot_table(index=["optimiser", "relaxation", "model", "seed"],
                            columns=["shown", "eps"], values="certified_acc")
    wide.columns = [f"{v}@{e:g}" for v, e in wide.columns]
    table = wide.reset_index()
    clean = ok.groupby("model")["clean_acc"].first()
    table.insert(4, "clean", table["model"].map(clean))
    if "train_time_s" in kinds:
        table.insert(5, "train_s", table["model"].map(kinds.set_index("model")["train_time_s"]))
    return _paradox_order(table, ["optimiser", "relaxation", "seed"])


def _paradox_order(table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    order = {o: i for i, o in enumerate(OPTIMISER_ORDER)}
    rel = {r: i for i, r in enumerate(RELAXATION_ORDER)}
    keys = {"optimiser": order, "relaxation": rel}
    return table.sort_values(columns, key=lambda c: c.map(keys[c.name]) if c.name in keys
                             else c).reset_index(drop=True)


TIGHT_NOTE = ("Tight minus IBP: for each optimiser and each relaxation tighter than IBP, "
              "the certified accuracy of the model trained on it minus that of the model "
              "trained on IBP with the same seed, per certifying verifier at each epsilon: "
              "mean over the seeds, [min, max] and n (seeds present on both sides). Paper's "
              "sign, what the literature reports for the training relaxation: + better than "
              "IBP, - worse. GRAD + CROWN-IBP: + (Zhang et al. 2020); GRAD + CROWN: - (the "
              "paradox, Jovanovic et al. 2022); PGPE or RGS + a tight relaxation: + (Balauca "
              "et al. 2025, abstract: Gaussian Loss Smoothing removes the paradox).")


def paper_sign(optimiser: str, relaxation: str) -> str:
    """The literature's sign of (tight-trained minus IBP-trained), see TIGHT_NOTE."""
    if optimiser == "GRAD":
        return "+" if relaxation == "CROWN-IBP" else "-"
    return "+" if optimiser in ("PGPE", "RGS") else ""


def tight_minus_ibp(table: pd.DataFrame) -> pd.DataFrame:
    """From `paradox_table`: per (optimiser, relaxation other than IBP) and verifier@eps,
    the seed-paired differences to the same optimiser's IBP-trained model, as
    "mean [min, max]" with the number of pairs; a seed with two models on one side (two
    widths, say) is ambiguous and left out; empty if no optimiser has a pair."""
    metrics = [c for c in table.columns if "@" in c]

    def by_seed(models: pd.DataFrame) -> pd.DataFrame:  # seeds with one model only
        indexed = models.set_index(["optimiser", "seed"])[metrics]
        return indexed[~indexed.index.duplicated(keep=False)]

    ibp = by_seed(table[table["relaxation"] == "IBP"])
    rows = []
    for (optimiser, relaxation), group in table.groupby(["optimiser", "relaxation"]):
        if relaxation == "IBP":
            continue
        mine = by_seed(group)
        paired = mine.index.intersection(ibp.index)
        if paired.empty:
            continue
        diff = mine.loc[paired] - ibp.loc[paired]
        row = {"optimiser": optimiser, "relaxation": relaxation, "n": len(paired),
               "paper's sign": paper_sign(optimiser, relaxation)}
        for c in metrics:
            d = diff[c].dropna()
            row[c] = (f"{d.mean():+.3f} [{d.min():+.3f}, {d.max():+.3f}]" if len(d) else "-")
        rows.append(row)
    return _paradox_order(pd.DataFrame(rows), ["optimiser", "relaxation"]) if rows else \
        pd.DataFrame()


def figure_paradox(results: ResultsView, kinds: pd.DataFrame) -> bytes:
    ok = results.ok[~results.ok["probabilistic"]].merge(kinds, on="model")
    data = results.certified.merge(ok, on="cell_key")
    verifiers = sorted(data["shown"].unique())
    eps_grid = sorted(data["eps"].unique())
    relaxations = [r for r in RELAXATION_ORDER if r in set(data["relaxation"])]
    optimisers = [o for o in OPTIMISER_ORDER if o in set(data["optimiser"])]
    fig, axes = plt.subplots(len(verifiers), len(eps_grid), squeeze=False,
                             layout="constrained", sharey=True,
                             figsize=(3.2 * len(eps_grid), 2.2 * len(verifiers) + 0.8))
    fig.suptitle("Certified accuracy by relaxation used in training and optimiser")
    width = 0.8 / max(len(optimisers), 1)
    for r, verifier in enumerate(verifiers):
        for c, eps in enumerate(eps_grid):
            ax = axes[r][c]
            part = data[(data["shown"] == verifier) & (data["eps"] == eps)]
            for k, optimiser in enumerate(optimisers):
                rows = part[part["optimiser"] == optimiser].groupby("relaxation")[
                    ["certified_acc", "clean_acc"]].agg(["mean", "min", "max"])
                present = [rel for rel in relaxations if rel in rows.index]
                xs = [relaxations.index(rel) + (k - (len(optimisers) - 1) / 2) * width
                      for rel in present]
                cert = rows.loc[present, "certified_acc"]
                spread = [cert["mean"] - cert["min"], cert["max"] - cert["mean"]]
                ax.bar(xs, cert["mean"], width, yerr=spread, capsize=2, label=optimiser,
                       color=f"C{k}")
                ax.scatter(xs, rows.loc[present, ("clean_acc", "mean")], marker="_",
                           color="grey", s=60, zorder=3)
            ax.set_xticks(range(len(relaxations)), relaxations)
            ax.set_ylim(0, 1.02)
            ax.set_title(f"{verifier}, eps {eps:g}")
            if c == 0:
                ax.set_ylabel("certified accuracy")
    _shared_legend(fig, axes)
    return _png(fig)


def figure_landscape(table: pd.DataFrame) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 3.6), layout="constrained")
    for k, (bound, curve) in enumerate(table.groupby("bound", sort=True)):
        ax.plot(curve["t"], curve["raw"], color=f"C{k}", label=f"{bound}, raw")
        ax.plot(curve["t"], curve["smoothed"], color=f"C{k}", linestyle="--",
                label=f"{bound}, smoothed (sigma {curve['sigma'].iloc[0]:g})")
    first = table.iloc[0]
    ax.set_title(f"Certified loss along a random direction: {first['model']}, "
                 f"eps {first['eps']:g}")
    ax.set_xlabel("t (step along d, in units of each tensor's norm)")
    ax.set_ylabel("robust cross-entropy")
    ax.legend()
    return _png(fig)


def gls_section(results: ResultsView, folder: Path | None, out: Path) -> tuple[str, str]:
    """The paradox section (Markdown, HTML) when the results hold models trained by
    certified-training recipes of at least two optimisers or relaxations; writes
    figures/paradox.png (and figures/landscape.png from ``landscape.parquet``)."""
    kinds = paradox_models(results, folder)
    if kinds.empty or len(kinds[["optimiser", "relaxation"]].drop_duplicates()) < 2:
        return "", ""
    esc = html.escape
    table = paradox_table(results, kinds)
    figures = [("paradox", "Certified accuracy by training relaxation and optimiser",
                figure_paradox(results, kinds), PARADOX_CAPTION)]
    if folder is not None and (folder / "landscape.parquet").exists():
        figures.append(("landscape", "Certified loss along a random direction",
                        figure_landscape(pd.read_parquet(folder / "landscape.parquet")),
                        LANDSCAPE_CAPTION))
    md = ["## The paradox of certified training", "", PARADOX_TABLE_NOTE, "",
          table.map(_fmt).to_markdown(index=False), ""]
    page = [f"<section id='paradox'><h2>The paradox of certified training</h2>"
            f"<p class='note'>{esc(PARADOX_TABLE_NOTE)}</p>"
            f"<div class='scroll'>{table.map(_fmt).to_html(index=False)}</div>"]
    tight = tight_minus_ibp(table)
    if not tight.empty:
        md += ["### Tight minus IBP", "", TIGHT_NOTE, "", tight.to_markdown(index=False), ""]
        page.append(f"<h3>Tight minus IBP</h3><p class='note'>{esc(TIGHT_NOTE)}</p>"
                    f"<div class='scroll'>{tight.to_html(index=False)}</div>")
    for key, title, image, caption in figures:
        (out / "figures" / f"{key}.png").write_bytes(image)
        md += [f"### {title}", "", f"![{title}](figures/{key}.png)", "", caption, ""]
        data = base64.b64encode(image).decode()
        page.append(f"<h3>{esc(title)}</h3><img alt='{esc(title)}' "
                    f"src='data:image/png;base64,{data}'><p class='note'>{esc(caption)}</p>")
    page.append("</section>")
    return "\n".join(md) + "\n", "\n".join(page)
