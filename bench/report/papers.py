"""The report's section "Beside the papers": each result on a zoo network
(`certbench.zoo`, recognised by its weights' sha256) next to the figure its paper reports
at the same norm and epsilon, in the paper's metric."""

from __future__ import annotations

import html
import math

import pandas as pd

from certbench import zoo
from certbench.report.view import ResultsView

NOTE = ("Each row: a verifier's certified figure on a zoo network at its paper's norm and "
        "epsilon, in the paper's metric (VRA and certified accuracy: higher is better; "
        "verified error: lower), beside the paper's headline figure, which the paper "
        "measured with paper_verifier. The zoo's cards record how each network was trained "
        "(`certbench zoo`).")


def papers_table(results: ResultsView) -> pd.DataFrame:
    """One row per ok cell on a zoo network whose grid holds its paper's epsilon."""
    built = {}
    for name, entry in zoo.catalog().items():
        card = zoo.card(name)
        if card is not None:
            built[card["weights_sha256"]] = entry
    rows = []
    for cell in results.ok.itertuples():
        entry = built.get(cell.checkpoint_sha256)
        if entry is None or cell.norm != entry.paper.norm:
            continue
        accuracy = results.accuracy(cell.cell_key)
        at = [acc for eps, acc in accuracy.items() if math.isclose(eps, entry.paper.eps)]
        if not at:
            continue
        rows.append({"network": entry.name, "verifier": cell.shown, "norm": entry.paper.norm,
                     "eps": entry.paper.eps, "metric": entry.paper.metric,
                     "certbench": zoo.as_metric(entry.paper.metric, at[0]),
                     "paper": entry.paper.value, "paper_verifier": entry.measure.verifier,
                     "source": entry.paper.source})
    return pd.DataFrame(rows)


def papers_section(results: ResultsView) -> tuple[str, str]:
    """The section as (Markdown, HTML); empty when no result is on a zoo network."""
    table = papers_table(results)
    if table.empty:
        return "", ""
    shown = table.map(lambda v: "-" if pd.isna(v) else f"{v:.4f}" if isinstance(v, float) else v)
    md = f"## Beside the papers\n\n{NOTE}\n\n{shown.to_markdown(index=False)}\n\n"
    page = (f"<section id='papers'><h2>Beside the papers</h2><p class='note'>"
            f"{html.escape(NOTE)}</p><div class='scroll'>{shown.to_html(index=False)}</div>"
            "</section>")
    return md, page
