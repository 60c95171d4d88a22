"""How a study spends its trials: warm starts, coarse-to-fine stages and gradient refinement.

- `schedule.py`: the stage plan recorded on the study (which finished-trial count belongs to which stage).
- `loop.py`: runs the plan; each stage's sampler is built when the stage starts, from the study's state.
- `coarse.py`: coarse stages (one value per model, or per model and kind of unit) as an Optuna sampler.
- `refine.py`: AdaMerging-style refinement, back-propagating through the merge; its result is a trial.
- `gold.py`: the search split's gold answers through lm-eval's Task API, and batched log-likelihoods.
"""
