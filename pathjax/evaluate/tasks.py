"""One entry point for every task: `run_task(task, dataset, embedder, **options)`."""

from __future__ import annotations

from pathjax.evaluate import cross_mag, probe, retrieval, zeroshot
from pathjax.evaluate.results import TaskResult

TASKS = ("zeroshot", "cross_mag", "linear_probe", "knn", "kshot", "retrieval")


def run_task(task: str, dataset, embedder, *, prompts=None, train_dataset=None, magnification=None,
             magnifications=None, batch_size=64, k=20, shots=(1, 2, 4, 8, 16), seeds=5,
             test_fraction=0.3, seed=0, progress=None, report=print) -> TaskResult:
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
  common = dict(batch_size=batch_size, progress=progress, report=report)
  if task != "cross_mag" and magnification:
    dataset = dataset.at_magnification(magnification)
    if train_dataset is not None:
      train_dataset = train_dataset.at_magnification(magnification)
  if task == "zeroshot":
    return zeroshot.run(dataset, embedder, prompts=prompts, **common)
  if task == "cross_mag":
    mags = tuple(magnifications or cross_mag.DEFAULT_MAGNIFICATIONS)
    return cross_mag.run(dataset, embedder, magnifications=mags, prompts=prompts, **common)
  probe_common = dict(train_dataset=train_dataset, test_fraction=test_fraction, seed=seed, **common)
  if task == "linear_probe":
    return probe.run_linear_probe(dataset, embedder, **probe_common)
  if task == "knn":
    return probe.run_knn(dataset, embedder, k=k, **probe_common)
  if task == "kshot":
    return probe.run_kshot(dataset, embedder, shots=tuple(shots), seeds=seeds, **probe_common)
  return retrieval.run(dataset, embedder, **common)
