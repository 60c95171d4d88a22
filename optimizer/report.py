"""`python -m optimizer.report study_name=S`: a Markdown report and plots of a study, from storage alone.

Reads only the study (no model is loaded): trials, best values, references and held-out numbers cached by
the run, parameter importances, and the merge/eval time split. Writes `runs/<study>/report/`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna

from optimizer.plots import write_plots


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarize(study: optuna.Study) -> dict[str, Any]:
    """Numbers of a study as a dict (also written as report.json)."""
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    states = {s.name: sum(t.state == s for t in trials) for s in optuna.trial.TrialState}
    out: dict[str, Any] = {
        "study": study.study_name, "states": {k: v for k, v in states.items() if v},
        "space": study.user_attrs.get("space", {}), "references": study.user_attrs.get("references", {}),
        "merge_seconds_mean": _mean([t.user_attrs["merge_seconds"] for t in done if "merge_seconds" in t.user_attrs]),
        "eval_seconds_mean": _mean([t.user_attrs["eval_seconds"] for t in done if "eval_seconds" in t.user_attrs]),
        "heldout": study.user_attrs.get("heldout", {}),
    }
    if study.user_attrs.get("comparison"):
        out["comparison"] = study.user_attrs["comparison"]
    stages = stage_summary(study)
    if stages:
        out["stages"] = stages
    if done and len(study.directions) == 1:
        best = study.best_trial
        out["best"] = {"trial": best.number, "value": best.value, "scores": best.user_attrs.get("scores", {})}
        if len(done) >= 3 and best.params:
            try:
                imp = optuna.importance.get_param_importances(study)
                out["importances"] = dict(list(imp.items())[:15])
            except (RuntimeError, ValueError):  # too few distinct trials for the estimator
                pass
    elif done:
        out["pareto_front"] = [{"trial": t.number, "values": t.values} for t in study.best_trials]
    return out


def stage_summary(study: optuna.Study) -> list[dict[str, Any]]:
    """Per stage of the recorded search plan: its trials, the best search value in it and where it started."""
    from optimizer.search.schedule import PLAN_ATTR, STARTS_ATTR

    plan = study.user_attrs.get(PLAN_ATTR) or []
    if not plan or len(study.directions) != 1:
        return []
    sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
    starts = study.user_attrs.get(STARTS_ATTR, {})
    out = []
    for st in plan:
        mine = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if t.user_attrs.get("stage") == st["name"]]
        best = max(mine, key=lambda t: (sign * t.value, -t.number), default=None)
        out.append({"name": st["name"], "kind": st["kind"], "coarse": st.get("coarse"), "trials": len(mine),
                    "best_trial": best.number if best else None, "best_value": best.value if best else None,
                    "started_from": starts.get(st["name"])})
    return out


def comparison_markdown(comp: dict[str, Any]) -> list[str]:
    """The export's bottom line as a Markdown table (the numbers of `best/scores.json`)."""
    split = "held-out" if comp.get("split") == "heldout" else "search"

    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, (int, float)) else "-"

    lines = ["## Result", "", "| | model | search | held-out |", "|---|---|---|---|",
             *[f"| {r['what']} | {r['name']} | {cell(r.get('search'))} | {cell(r.get('heldout'))} |"
               for r in comp.get("rows", [])], ""]
    gains = ", ".join(f"{k} **{v:+.4f}**" for k, v in (comp.get("gain") or {}).items() if v is not None)
    if gains:
        lines += [f"Gain of the exported trial ({split}): {gains}.", ""]
    if comp.get("baseline_wins"):
        lines += [f"No searched trial beat the best baseline on the {split} split: the export is that baseline.", ""]
    return lines


def markdown(summary: dict[str, Any]) -> str:
    lines = [f"# Study `{summary['study']}`", "", f"Trials: {summary['states']}", ""]
    sp = summary.get("space", {})
    if sp:
        lines += [f"Method `{sp.get('method')}`, granularity `{sp.get('granularity')}`, models {sp.get('models')}, "
                  f"{len(sp.get('params', []))} searched parameters.", ""]
    if summary.get("comparison"):
        lines += comparison_markdown(summary["comparison"])
    if summary.get("stages"):
        lines += ["## Search stages", "", "| stage | kind | trials | best trial | best (search) | started from |",
                  "|---|---|---|---|---|---|",
                  *[f"| {st['name']} | {st['kind']}{' ' + st['coarse'] if st.get('coarse') else ''} | {st['trials']} "
                    f"| {st['best_trial'] if st['best_trial'] is not None else '-'} | "
                    f"{format(st['best_value'], '.4f') if st['best_value'] is not None else '-'} | "
                    f"{st['started_from'] if st['started_from'] is not None else '-'} |" for st in summary["stages"]],
                  ""]
    if "best" in summary:
        b = summary["best"]
        lines += ["## Best trial (search split)", "", f"Trial {b['trial']}: **{b['value']:.4f}**", "",
                  "| task | score |", "|---|---|", *[f"| {k} | {v:.4f} |" for k, v in b["scores"].items()], ""]
    refs = summary.get("references") or {}
    if refs:
        lines += ["## References", "", "| model/split | objective |", "|---|---|",
                  *[f"| {k} | {v['objective']:.4f} |" for k, v in sorted(refs.items())], ""]
    ho = summary.get("heldout") or {}
    if ho:
        lines += ["## Held-out re-evaluations", "", "| trial | held-out objective |", "|---|---|",
                  *[f"| {k} | {v['objective']:.4f} |" for k, v in sorted(ho.items(), key=lambda kv: int(kv[0]))], ""]
    if summary.get("importances"):
        lines += ["## Parameter importances (PED-ANOVA, Optuna's default)", "", "| parameter | importance |", "|---|---|",
                  *[f"| {k} | {v:.3f} |" for k, v in summary["importances"].items()], ""]
    if summary.get("pareto_front"):
        lines += ["## Pareto front", "", *[f"- trial {r['trial']}: {r['values']}" for r in summary["pareto_front"]], ""]
    m, e = summary.get("merge_seconds_mean"), summary.get("eval_seconds_mean")
    if m is not None and e is not None:
        lines += ["## Time per trial", "", f"merge {m:.3f} s, evaluation {e:.3f} s "
                  f"({100 * m / (m + e):.1f}% merging)", ""]
    return "\n".join(lines)


def report(cfg: Any) -> int:
    from optimizer.session import console
    from optimizer.study import build_storage, stored_study

    run_dir = Path(cfg.run_root) / cfg.study_name
    storage = build_storage(cfg.storage, run_dir)
    study = stored_study(cfg, run_dir, storage)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(study)
    (out / "report.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    plots = write_plots(study, out, run_dir)
    text = markdown(summary)
    (out / "report.md").write_text("\n".join([text, *plots.markdown()]), encoding="utf-8")
    console.print(text)
    pictures = f" with {', '.join(plots.written)}" if plots.written else ""
    console.print(f"report written to {out / 'report.md'}{pictures}")
    from optimizer.eval.judge.fastchat import show_result_command, write_layout

    fastchat = write_layout(study, storage, run_dir)  # judge studies: answers/judgments for FastChat's tools
    if fastchat is not None:
        console.print(f"FastChat layout written to {fastchat}; per-trial table: {show_result_command(fastchat)}")
    return 0


if __name__ == "__main__":
    from optimizer.cli import hydra_entry

    hydra_entry(report)()
