"""Evaluation: zero-shot (CONCH prompt ensembles), cross-magnification, linear probe, kNN,
k-shot and retrieval, over the data formats pathology users have.

  data.py      data specs -> Dataset (imagefolder, csv/jsonl, tfds, records, slides), MPP rescaling
  features.py  Embedder (model directory or recipe), extract_features, save_features
  prompts.py   prompt files and the ensembled zero-shot classifier
  metrics.py   numpy metrics (scikit-learn's definitions)
  zeroshot.py, cross_mag.py, probe.py, retrieval.py   the tasks; tasks.run_task dispatches
  registry.py  make_evaluator(eval_config, recipe) for config.evals inside training
  cli.py       `pathjax eval`
"""
