"""`python -m optimizer.export study_name=S [trial=N]`: (re-)export a trial of an existing study.

The study's own stored configuration is used (models, method, granularity, evaluator), so the command needs
only the study name (and `storage=...` / `run_root=...` if those differ from the defaults).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from optimizer import UserError


def export(cfg: Any) -> int:
    from optimizer.export.write import export_best
    from optimizer.session import console, load, prepare
    from optimizer.study import stored_study

    run_dir = Path(cfg.run_root) / cfg.study_name
    study = stored_study(cfg, run_dir)
    stored = OmegaConf.create(study.user_attrs.get("config") or {})
    run_cfg = OmegaConf.merge(cfg, stored, {"storage": OmegaConf.to_container(cfg.storage),
                                           "run_root": cfg.run_root, "trial": cfg.trial})
    s = prepare(run_cfg)
    done = {t.number: t for t in study.get_trials(deepcopy=False)
            if t.state.name == "COMPLETE"}
    if not done:
        raise UserError(f"study {cfg.study_name!r} has no completed trial to export.")
    if cfg.trial is not None and cfg.trial not in done:
        raise UserError(f"trial={cfg.trial} is not a completed trial of {cfg.study_name!r}; completed: "
                        f"{sorted(done)[:20]}{' ...' if len(done) > 20 else ''}.")
    load(s)
    trial = done[cfg.trial] if cfg.trial is not None else None
    dest = s.run_dir / ("best" if trial is None else f"trial_{trial.number}")
    console.print(f"written to {export_best(s, study, trial, dest=dest)}")
    return 0
