"""mergekit recipes, read and written: the one home of the mergekit YAML format.

- ``settings``: parameter settings (scalars, gradients, filters) and their value at one tensor and layer.
- ``schema``: the recipe as frozen data (``models:`` and ``slices:`` forms) and each parameter's value per
  slice, model and tensor with mergekit's precedence and defaults; round-trip dump.
- ``layout``: a recipe laid out against its checkpoints, output tensor by output tensor (frankenmerge slices).
- ``inputs``: a recipe file resolved for ``python -m optimizer.merge`` (checkpoints located and checked, the
  ``merge_optimizer`` extension key, per-tensor parameter values).
- ``write``: a study's MergePlan as a recipe document and its exported YAML text.

Facts about methods (defaults, types, base policy) come from ``optimizer.merge.registry``, never from here.
"""

from optimizer.merge.recipe.inputs import EXTENSION_KEYS, MERGEKIT_EXTENSION, load_recipe, resolve
from optimizer.merge.recipe.schema import Condition, Recipe, Slice, Source, evaluate, layer_fraction
from optimizer.merge.recipe.write import dump_recipe, mergekit_ref, plan_doc, recipe_doc

__all__ = ["EXTENSION_KEYS", "MERGEKIT_EXTENSION", "Condition", "Recipe", "Slice", "Source", "dump_recipe",
           "evaluate", "layer_fraction", "load_recipe", "mergekit_ref", "plan_doc", "recipe_doc", "resolve"]
