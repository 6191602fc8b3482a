"""Evaluation tasks, an open registry: `register_task` adds one, `run_task` runs one by name.

A task is `run(dataset, embedder, **options) -> TaskResult`; `needs` names the predict
functions it uses (keys of `recipe.predict_fns(params)`, e.g. "image", "text", "slide"), so
an evaluator can refuse a model that lacks one before any data is read. A new task module
registers itself at import:

    @register_task("slide_retrieval", needs=("slide", "text"))
    def run(dataset, embedder, *, batch_size=64, report=print, **unused): ...

and is found by name once imported, or by `module.path:name` (imported on demand).
Options a task does not take are ignored, so one set of evaluation fields serves all.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

from pathjax.evaluate.results import TaskResult


class TaskError(ValueError):
  """An unknown task name or a task module that cannot be imported."""


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  run: Callable[..., TaskResult]
  needs: tuple[str, ...]
  per_magnification: bool = True  # a single `magnification` option selects the data first
  # Tasks over a recipe's own data (slide tasks): make_inputs(eval_config, recipe) ->
  # (load() -> (dataset, train_dataset), embedder(params) -> the task's embedder), used by
  # pathjax.evaluate.registry instead of a data spec and the image/text embedder.
  make_inputs: Callable | None = None


_TASKS: dict[str, Task] = {}


def register_task(name: str, *, needs: tuple[str, ...] = ("image",), per_magnification: bool = True,
                  make_inputs: Callable | None = None):
  """Decorator: registers `run(dataset, embedder, **options)` as task `name`."""
  def decorate(run):
    _TASKS[name] = Task(name, run, tuple(needs), per_magnification, make_inputs)
    return run
  return decorate


def task_names() -> list[str]:
  return sorted(_TASKS)


def get_task(name: str) -> Task:
  """The task registered as `name`; `module.path:name` imports the module first."""
  if name not in _TASKS and ":" in name:
    module, _, _ = name.partition(":")
    try:
      importlib.import_module(module)
    except ModuleNotFoundError as e:
      raise TaskError(f"task {name!r}: cannot import {module} ({e})") from None
  if name not in _TASKS:
    raise TaskError(f"unknown task {name!r}; valid tasks: {', '.join(task_names())} "
                     "(or module.path:name for a task module that registers itself)")
  return _TASKS[name]


def run_task(task: str, dataset, embedder, *, magnification=None, train_dataset=None,
             **options) -> TaskResult:
  """Runs task `task`; `magnification` selects that magnification of the data first."""
  spec = get_task(task)
  if spec.per_magnification and magnification:
    dataset = dataset.at_magnification(magnification)
    if train_dataset is not None:
      train_dataset = train_dataset.at_magnification(magnification)
  return spec.run(dataset, embedder, train_dataset=train_dataset, **options)


# ----------------------------------------------------------------------------- built-ins

from pathjax.evaluate import cross_mag, probe, retrieval, zeroshot  # noqa: E402  (registry first)


@register_task("zeroshot", needs=("image", "text"))
def _zeroshot(dataset, embedder, *, prompts=None, batch_size=64, progress=None, report=print,
              **unused):
  return zeroshot.run(dataset, embedder, prompts=prompts, batch_size=batch_size,
                      progress=progress, report=report)


@register_task("cross_mag", needs=("image", "text"), per_magnification=False)
def _cross_mag(dataset, embedder, *, magnifications=None, prompts=None, batch_size=64,
               progress=None, report=print, **unused):
  mags = tuple(magnifications or cross_mag.DEFAULT_MAGNIFICATIONS)
  return cross_mag.run(dataset, embedder, magnifications=mags, prompts=prompts,
                       batch_size=batch_size, progress=progress, report=report)


def _probe_options(options: dict) -> dict:
  keys = ("train_dataset", "test_fraction", "seed", "batch_size", "progress", "report")
  return {k: options[k] for k in keys if k in options}


@register_task("linear_probe")
def _linear_probe(dataset, embedder, **options):
  return probe.run_linear_probe(dataset, embedder, **_probe_options(options))


@register_task("knn")
def _knn(dataset, embedder, *, k=20, **options):
  return probe.run_knn(dataset, embedder, k=k, **_probe_options(options))


@register_task("kshot")
def _kshot(dataset, embedder, *, shots=(1, 2, 4, 8, 16), seeds=5, **options):
  return probe.run_kshot(dataset, embedder, shots=tuple(shots), seeds=seeds,
                         **_probe_options(options))


@register_task("retrieval", needs=("image", "text"))
def _retrieval(dataset, embedder, *, batch_size=64, progress=None, report=print, **unused):
  return retrieval.run(dataset, embedder, batch_size=batch_size, progress=progress, report=report)


from pathjax.evaluate import slides as _slides  # noqa: E402,F401  (registers the slide tasks)
from pathjax.evaluate import instruct as _instruct  # noqa: E402,F401  (registers slide chat tasks)
from pathjax.evaluate import slide_localization as _slide_localization  # noqa: E402,F401
