"""Deletion / insertion curves and the AUC table of a method comparison (Qt-free)."""

from __future__ import annotations

from napari_pdcr.metrics.faithfulness import DIRECTIONS, RANDOM

#: The random floor's line: grey, dashed.
RANDOM_STYLE = {"color": "0.55", "linestyle": "--"}


def plot_faithfulness_curves(curves, ax, direction: str = "deletion", fill: str = "patch_bank",
                             outcome: str = "dice", legend: bool = True):
    """One direction of a :class:`~napari_pdcr.metrics.FaithfulnessCurves`: every map's curve and the random floor.

    x: the fraction of ranked blocks removed (deletion) or restored (insertion); y: the
    outcome divided by the unperturbed image's. A map that ranks nothing (constant) is
    drawn dotted and marked "no ranking". Returns the ``Axes``.
    """
    d, f, o = DIRECTIONS.index(direction), curves.fills.index(fill), curves.outcomes.index(outcome)
    for name, values in curves.curves.items():
        area = curves.auc(name)[d, f, o]
        style = RANDOM_STYLE if name == RANDOM else {"linestyle": ":"} if name in curves.unranked else {}
        note = ", no ranking" if name in curves.unranked else ""
        ax.plot(curves.fractions, values[d, f, o], label=f"{name} ({area:.2f}{note})", **style)
    fill_text = "natural patches" if fill == "patch_bank" else fill
    ax.set_title(f"{direction} ({fill_text}, {outcome})")
    ax.set_xlabel("fraction of ranked blocks " + ("removed" if direction == "deletion" else "restored"))
    ax.set_ylabel(f"{outcome} / {outcome} of the image")
    ax.set_xlim(0, 1)
    if legend:
        # deletion curves fall from the top left, insertion curves rise to the top right
        ax.legend(title="method (AUC)", fontsize="small", title_fontsize="small",
                  loc="lower left" if direction == "deletion" else "lower right")
    return ax


def plot_auc_table(table: list[dict], ax, fills=("patch_bank", "blur"), outcome: str = "dice"):
    """The AUC table of :func:`~napari_pdcr.compare_methods` on ``ax`` (axis hidden): deletion and insertion AUC
    per fill (lower deletion, higher insertion = more faithful) and wall time. Returns the ``Table``."""
    columns = [f"{direction[:3]} {fill[0].upper()}" for direction in DIRECTIONS for fill in fills] + ["wall s"]
    cells = []
    for row in table:
        values = [f"{row[f'{direction} auc ({fill}, {outcome})']:.2f}" for direction in DIRECTIONS for fill in fills]
        wall = row.get("wall_s")
        cells.append(values + ["" if wall is None else f"{wall:.1f}"])
    labels = [row["method"] + ("" if row.get("ranked", True) else " *") for row in table]
    ax.axis("off")
    drawn = ax.table(cellText=cells, rowLabels=labels, colLabels=columns, loc="upper center", cellLoc="center")
    drawn.auto_set_font_size(False)
    drawn.set_fontsize(7)
    for cell in drawn.get_celld().values():
        cell.set_edgecolor(ax.xaxis.label.get_color())
        cell.set_facecolor("none")
        cell.get_text().set_color(ax.xaxis.label.get_color())
    fill_key = ", ".join(f"{fill[0].upper()}: {'natural patches' if fill == 'patch_bank' else fill}" for fill in fills)
    caption = f"AUC of the {outcome} curves: deletion lower /\ninsertion higher = more faithful;\n{fill_key}"
    if not all(row.get("ranked", True) for row in table):
        caption += "\n* constant map: no ranking, scored as the random floor"
    ax.set_title(caption, fontsize=6.5)
    return drawn
