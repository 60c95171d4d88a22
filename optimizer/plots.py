"""The report's pictures: Optuna's own plots (optuna.visualization.matplotlib) plus the coefficient heatmap.

Everything is read from the study (trials, their params and user attrs, the held-out and reference numbers
the export cached on it); no model is loaded. `write_plots` returns the files it wrote and, for each plot it
did not draw, why, so the report can say so instead of silently leaving a picture out.

- `history.png`: Optuna's optimization history, with the baseline trials marked and labelled, each
  re-evaluated trial's held-out score beside its search score, and the base/experts alone as dashed lines.
- `coefficients.png`: the exported trial's coefficients as models x units heatmaps, one panel per merge
  parameter (`weight/<model>/<unit>`, `density/<model>/<unit>`, ...; global parameters as a one-row panel).
- `importances.png`, `slice.png`, `contour.png`: Optuna's parameter importances (its default evaluator,
  PED-ANOVA) and the slice / contour plots of the most important parameters.
- `pareto.png` (several objectives): Optuna's Pareto-front plot.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

MAX_IMPORTANCES = 30  # bars in importances.png; more parameters: the top ones, importances renormalised over them
MAX_SLICES = 4
MIN_TRIALS_CONTOUR = 10  # fewer points make a contour of interpolation artefacts
MIN_CONTOUR_SHARE = 0.5  # ... and so do two parameters that explain little of the objective
MAX_ANNOTATED_UNITS = 40  # heatmap cells carry their value up to this many units
MAX_PARETO_HEATMAPS = 4
DPI = 110
FILES = ("history.png", "coefficients.png", "importances.png", "slice.png", "contour.png", "pareto.png")


@dataclass
class Plots:
    """What `write_plots` produced: file name -> caption, and plot name -> why it was not drawn."""

    written: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def markdown(self) -> list[str]:
        """Report lines: each picture with its caption, then the skipped ones with their reason."""
        lines = ["## Plots", ""]
        for name, caption in self.written.items():
            lines += [f"**{caption}**", "", f"![{name}]({name})", ""]
        lines += [f"- {name}: not drawn ({why})" for name, why in self.skipped.items()]
        return lines + ([""] if self.skipped else [])


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path, layout: bool = True) -> None:
    """Write and close `fig`. layout=False for Optuna's figures with a colorbar spanning several axes, which
    tight_layout would misplace (they are cropped to their content instead)."""
    if layout:
        fig.tight_layout()
        fig.savefig(path, dpi=DPI)
    else:
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
    _pyplot().close(fig)


def _done(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def exported_trial(study: optuna.Study, run_dir: Path) -> tuple[FrozenTrial, str] | None:
    """The trial the export wrote to `run_dir/best/` (its scores.json names it), else the best search trial.

    Returns (trial, how it was chosen), or None for a study without a completed trial or with several
    objectives (there is no single best).
    """
    done = {t.number: t for t in _done(study)}
    if not done or len(study.directions) != 1:
        return None
    scores = run_dir / "best" / "scores.json"
    if scores.is_file():
        try:
            best = json.loads(scores.read_text(encoding="utf-8"))["best"]
            if best["trial"] in done:
                return done[best["trial"]], f"exported, chosen by {best.get('chosen_by', 'search')} score"
        except (ValueError, KeyError, TypeError):
            pass
    return study.best_trial, "best search score"


def _sign(study: optuna.Study) -> float:
    return -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0


def plot_history(study: optuna.Study, path: Path) -> None:
    """Optuna's optimization history plus baselines, held-out scores and the references (see module doc)."""
    from optuna.visualization.matplotlib import plot_optimization_history

    ax = plot_optimization_history(study, target_name="objective (search split)")
    done = {t.number: t for t in _done(study)}
    base = [t for t in done.values() if "baseline" in t.user_attrs]
    if base:
        ax.scatter([t.number for t in base], [t.value for t in base], marker="*", s=160, color="C3",
                   zorder=4, label="baseline")
        for t in base:
            ax.annotate(t.user_attrs["baseline"], (t.number, t.value), textcoords="offset points",
                        xytext=(6, 6), fontsize=8, color="C3")
    held = {int(k): v["objective"] for k, v in (study.user_attrs.get("heldout") or {}).items()
            if int(k) in done and isinstance(v.get("objective"), (int, float))}
    if held:
        xs = sorted(held)
        for x in xs:
            ax.plot([x, x], [done[x].value, held[x]], color="C2", lw=0.8, alpha=0.6, zorder=2)
        ax.scatter(xs, [held[x] for x in xs], marker="D", s=40, facecolors="none", edgecolors="C2",
                   linewidths=1.5, zorder=5, label="held-out score (top-k, baselines)")
    refs = {k.rsplit("/", 1)[0]: v["objective"] for k, v in (study.user_attrs.get("references") or {}).items()
            if k.endswith("/search") and isinstance(v.get("objective"), (int, float))}
    styles = ["--", ":", "-.", (0, (5, 2, 1, 2))]
    for i, (name, value) in enumerate(sorted(refs.items())):
        ax.axhline(value, color=f"C{(i + 4) % 10}", ls=styles[i % len(styles)], lw=1.2, alpha=0.9,
                   label=f"{name} alone ({value:.4f})")
    ax.set_title(f"{study.study_name}: optimization history")
    ax.set_xlabel("trial")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0)
    ax.figure.set_size_inches(10, 5)
    _save(ax.figure, path)


def _panels(trial: FrozenTrial, space: dict[str, Any]) -> list[tuple[str, list[str], list[str], list[list[float]],
                                                                     tuple[float, float]]]:
    """Per merge parameter: (name, row labels, unit labels, values[row][unit], (low, high) bounds)."""
    order = list(space.get("params") or trial.params)
    order += [n for n in trial.params if n not in order]
    models = list(space.get("models") or [])
    kinds: dict[str, dict[str, dict[str, float]]] = {}
    units: dict[str, list[str]] = {}
    bounds: dict[str, tuple[float, float]] = {}
    for name in order:
        if name not in trial.params:
            continue
        parts = name.split("/")
        if len(parts) == 3:
            kind, row, unit = parts
        elif len(parts) == 2:
            (kind, unit), row = parts, "all models"
        else:
            continue
        kinds.setdefault(kind, {}).setdefault(row, {})[unit] = float(trial.params[name])
        if unit not in units.setdefault(kind, []):
            units[kind].append(unit)
        dist = trial.distributions[name]
        low, high = bounds.get(kind, (math.inf, -math.inf))
        bounds[kind] = (min(low, getattr(dist, "low", low)), max(high, getattr(dist, "high", high)))
    out = []
    for kind, rows in kinds.items():
        names = [m for m in models if m in rows] + [r for r in rows if r not in models]
        values = [[rows[r].get(u, math.nan) for u in units[kind]] for r in names]
        out.append((kind, names, units[kind], values, bounds[kind]))
    return out


def plot_coefficients(trials: list[tuple[FrozenTrial, str]], space: dict[str, Any], path: Path) -> bool:
    """Heatmaps (models x units) of each trial's coefficients, one panel per merge parameter.

    Args:
        trials: (trial, caption) pairs, drawn top to bottom.
        space: the study's `space` user attr (model order, parameter order, pinned values).
        path: the PNG to write.

    Returns False when no trial has a parameter of the `<param>/<model>/<unit>` or `<param>/<unit>` form.
    """
    plt = _pyplot()
    panels = [(t, caption, p) for t, caption in trials for p in _panels(t, space)]
    if not panels:
        return False
    n_units = max(len(p[2]) for _, _, p in panels)
    width = min(max(7.0, 0.55 * n_units + 3.0), 40.0)
    heights = [len(p[1]) + 1.6 for _, _, p in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 0.42 * sum(heights) + 0.6),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (trial, caption, (kind, rows, units, values, (low, high))) in zip(axes[:, 0], panels, strict=True):
        ax.grid(False)  # Optuna's plots switch on a style with a grid; it would cross the cells
        im = ax.imshow(values, aspect="auto", cmap="viridis", vmin=low, vmax=high, interpolation="nearest")
        step = max(1, math.ceil(len(units) / MAX_ANNOTATED_UNITS))
        ax.set_xticks(range(0, len(units), step), units[::step], rotation=45 if len(units) > 8 else 0,
                      ha="right" if len(units) > 8 else "center", fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=9)
        if len(units) <= MAX_ANNOTATED_UNITS:
            mid = (low + high) / 2
            for r, row in enumerate(values):
                for u, v in enumerate(row):
                    if v == v:
                        ax.text(u, r, f"{v:.2f}", ha="center", va="center", fontsize=7,
                                color="black" if v > mid else "white")
        value = f"value {trial.value:.4f}" if trial.values and len(trial.values) == 1 else \
            f"values {', '.join(f'{v:.4f}' for v in trial.values or [])}"
        tag = f" [{trial.user_attrs['baseline']}]" if "baseline" in trial.user_attrs else ""
        ax.set_title(f"{kind}: trial {trial.number}{tag} ({caption}; {value})", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
    pinned = space.get("pinned") or {}
    if pinned:
        fig.suptitle("pinned: " + ", ".join(f"{k}={v}" for k, v in pinned.items()), fontsize=9)
    _save(fig, path)
    return True


def _heatmap_trials(study: optuna.Study, run_dir: Path) -> list[tuple[FrozenTrial, str]]:
    if len(study.directions) > 1:
        front = sorted(study.best_trials, key=lambda t: t.number)[:MAX_PARETO_HEATMAPS]
        return [(t, "Pareto front") for t in front]
    chosen = exported_trial(study, run_dir)
    if chosen is None:
        return []
    out = [chosen]
    if "baseline" in chosen[0].user_attrs:
        # A baseline is uniform by construction; show what the search itself found beside it.
        searched = sorted((t for t in _done(study) if "baseline" not in t.user_attrs),
                          key=lambda t: (_sign(study) * t.value, t.number))
        if searched:
            out.append((searched[0], "best non-baseline trial by search score"))
    return out


def _importances(study: optuna.Study) -> dict[str, float]:
    return optuna.importance.get_param_importances(study)


def write_plots(study: optuna.Study, out: Path, run_dir: Path) -> Plots:
    """Draw every plot that fits the study into `out` (PNG files); see the module docstring.

    Args:
        study: the study (read only).
        out: the report folder.
        run_dir: `runs/<study>` (its `best/scores.json` names the exported trial).
    """
    result = Plots()
    for name in FILES:  # a picture an earlier report drew but this one does not must not linger
        (out / name).unlink(missing_ok=True)
    try:
        _pyplot()
    except ImportError:
        result.skipped["all plots"] = "matplotlib is not installed"
        return result
    done = _done(study)
    if not done:
        result.skipped["all plots"] = "no completed trial"
        return result
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        multi = len(study.directions) > 1
        if multi:
            from optuna.visualization.matplotlib import plot_pareto_front

            if len(study.directions) <= 3:
                ax = plot_pareto_front(study, target_names=study.metric_names)
                ax.figure.set_size_inches(7, 5)
                _save(ax.figure, out / "pareto.png")
                result.written["pareto.png"] = "Pareto front (Optuna)"
            else:
                result.skipped["pareto.png"] = f"{len(study.directions)} objectives (Optuna plots 2 or 3)"
        else:
            plot_history(study, out / "history.png")
            result.written["history.png"] = ("Optimization history (Optuna) with baselines (stars), held-out "
                                             "scores (diamonds) and the models alone (dashed)")
        heat = _heatmap_trials(study, run_dir)
        if heat and plot_coefficients(heat, study.user_attrs.get("space") or {}, out / "coefficients.png"):
            result.written["coefficients.png"] = "Merge coefficients per model and unit"
        else:
            result.skipped["coefficients.png"] = "no per-unit merge parameter in the trials"
        if multi:
            result.skipped["importances.png"] = "several objectives"
            return result
        _optuna_param_plots(study, done, out, result)
    return result


def _optuna_param_plots(study: optuna.Study, done: list[FrozenTrial], out: Path, result: Plots) -> None:
    from optuna.visualization.matplotlib import plot_contour, plot_param_importances, plot_slice

    if len({t.value for t in done}) < 2 or not done[0].params:
        result.skipped["importances.png"] = "fewer than two distinct completed trials"
        return
    try:
        importances = _importances(study)
    except (RuntimeError, ValueError, ZeroDivisionError) as e:
        result.skipped["importances.png"] = f"Optuna could not estimate importances ({e})"
        return
    ranked = list(importances)
    top = ranked[:MAX_IMPORTANCES]
    ax = plot_param_importances(study, params=top if len(ranked) > MAX_IMPORTANCES else None)
    ax.figure.set_size_inches(8, 0.3 * len(top) + 1.5)
    title = "Parameter importances (PED-ANOVA)" if len(top) == len(ranked) else \
        f"Parameter importances (PED-ANOVA) among the top {len(top)} of {len(ranked)}"
    ax.set_title(title, loc="left")
    _save(ax.figure, out / "importances.png")
    result.written["importances.png"] = "Parameter importances (Optuna, PED-ANOVA)"
    axes = plot_slice(study, params=ranked[:MAX_SLICES])
    _save((axes.flat[0] if hasattr(axes, "flat") else axes).figure, out / "slice.png", layout=False)
    result.written["slice.png"] = f"Objective against the {min(len(ranked), MAX_SLICES)} most important parameters"
    share = sum(importances[p] for p in ranked[:2]) / (sum(importances.values()) or 1.0)
    if len(ranked) >= 2 and len(done) >= MIN_TRIALS_CONTOUR and share >= MIN_CONTOUR_SHARE:
        ax = plot_contour(study, params=ranked[:2])
        _save(ax.figure, out / "contour.png", layout=False)
        result.written["contour.png"] = (f"Objective over the two most important parameters ({100 * share:.0f}% "
                                         "of the importance)")
    elif len(ranked) >= 2:
        result.skipped["contour.png"] = (
            f"the two most important parameters carry {100 * share:.0f}% of the importance over "
            f"{len(done)} completed trials; a contour needs {100 * MIN_CONTOUR_SHARE:.0f}% and "
            f"{MIN_TRIALS_CONTOUR} trials, or it shows interpolation between unrelated points")
    else:
        result.skipped["contour.png"] = "only one searched parameter (see slice.png)"
