"""`pathjax eval`: zero-shot, cross-magnification, probes and retrieval from the command line.

    pathjax eval --model DIR --task zeroshot --data imagefolder:/data/CRC-VAL-HE-7K?mpp=0.5 \
        --prompts crc100k --out eval/crc
    pathjax eval --workdir workdirs/smoke --task cross_mag --data slides:/data/synth --out eval/xmag
    pathjax eval --model DIR --task linear_probe --train-data tfds:patch_camelyon:train \
        --data tfds:patch_camelyon:test --out eval/pcam

Writes OUT/metrics.json, OUT/predictions.csv and the task's PNG plots, and prints a table.
Data specs are described in pathjax.evaluate.data (`pathjax eval --help-data`).
"""

from __future__ import annotations

import argparse
import os
import sys

from pathjax.evaluate import tasks as tasks_lib


def register(parser: argparse.ArgumentParser) -> None:
  src = parser.add_mutually_exclusive_group()
  src.add_argument("--model", help="a model directory (pathjax convert / the trainer's export)")
  src.add_argument("--workdir", help="a training workdir; its model directory DIR/model is evaluated")
  parser.add_argument("--task", default="zeroshot",
                      help=f"a registered task ({', '.join(tasks_lib.task_names())}) or "
                           "module.path:name of a task module")
  parser.add_argument("--data", help="data spec: imagefolder:DIR, csv:FILE, jsonl:FILE, "
                      "tfds:NAME[:SPLIT], records:DIR[@MAG], slides:DIR (options after '?', e.g. ?mpp=0.5)")
  parser.add_argument("--train-data", help="probes: training data spec (default: a stratified split of --data)")
  parser.add_argument("--prompts", help="zero-shot prompt file (a path or a name in data/prompts)")
  parser.add_argument("--out", help="output directory (default: eval_out/TASK)")
  parser.add_argument("--magnification", type=float, help="evaluate at this magnification (rescaled from MPP)")
  parser.add_argument("--magnifications", default="5,10,20,40", help="cross_mag: magnifications (default 5,10,20,40)")
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--limit", type=int, default=0, help="evaluate a random subset of at most N examples")
  parser.add_argument("--k", type=int, default=20, help="knn: neighbours")
  parser.add_argument("--shots", default="1,2,4,8,16", help="kshot: examples per class")
  parser.add_argument("--seeds", type=int, default=5, help="kshot: random draws per shot count")
  parser.add_argument("--test-fraction", type=float, default=0.3, help="probes without --train-data")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--labels", help="slide_zeroshot: a slide -> class file (JSON {slide: "
                      "label}, JSON lines or CSV slide,label); --data then a records:DIR[@MAG] "
                      "or slides:DIR spec whose patches are pooled per slide (MI-Zero)")
  parser.add_argument("--topk", default="", help="slide_zeroshot with a patch model: the k of "
                      "top-k pooling, comma-separated (default MI-Zero's 1,5,10,50,100)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  parser.add_argument("--help-data", action="store_true", help="describe data specs and exit")


def _model_dir(args) -> str:
  if args.model:
    return args.model
  path = os.path.join(args.workdir, "model")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{args.workdir} has no model directory 'model' yet (the trainer writes "
                            "WORKDIR/model when it exports); pass --model DIR to evaluate another one")
  return path


def main(args) -> int:
  from pathjax.evaluate import data as data_lib
  from pathjax.evaluate import features as features_lib
  from pathjax.evaluate import prompts as prompts_lib

  if args.help_data:
    print(data_lib.__doc__)
    return 0
  if not (args.model or args.workdir) or not args.data:
    print("pathjax eval: error: --model DIR (or --workdir DIR) and --data SPEC are required", file=sys.stderr)
    return 2
  try:
    topk = tuple(int(k) for k in args.topk.split(",") if k) or None
  except ValueError:
    print(f"pathjax eval: error: --topk {args.topk!r}: comma-separated integers, e.g. 1,5,10",
          file=sys.stderr)
    return 2
  out = args.out or os.path.join("eval_out", args.task)
  from pathjax.config_lib import ConfigError
  from pathjax.workdir import check_writable_dir
  if os.path.exists(out) and not os.path.isdir(out):
    print(f"pathjax eval: error: --out {out} is an existing file; eval writes a folder "
          "(metrics.json, predictions.csv, plots): choose a folder path", file=sys.stderr)
    return 2
  try:  # before minutes of embedding, not after
    check_writable_dir(out, "--out")
  except ConfigError as e:
    print(f"pathjax eval: error: {e}", file=sys.stderr)
    return 2
  try:
    from pathjax.models.model_dir import ModelDirError
  except ImportError:  # pragma: no cover
    ModelDirError = ValueError
  from pathjax.evaluate.slides import SlideEvalError
  expected = (data_lib.DataError, prompts_lib.PromptError, features_lib.EmbedderError, ModelDirError,
              FileNotFoundError, tasks_lib.TaskError, SlideEvalError)
  try:
    task = tasks_lib.get_task(args.task)  # an unknown task fails before any data is read
    dataset = data_lib.load_dataset(args.data)
    for w in dataset.warnings:
      print(f"warning: {w}", file=sys.stderr)
    if args.limit:
      dataset = dataset.limit(args.limit, seed=args.seed)
    train = data_lib.load_dataset(args.train_data) if args.train_data else None
    if train is not None:
      for w in train.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if args.task in ("zeroshot", "cross_mag") and args.prompts:
      prompts_lib.load_prompts(args.prompts)  # a bad prompt file fails before the model loads
    embedder = features_lib.Embedder.from_model_dir(_model_dir(args))
    if "text" in task.needs:
      embedder.require_text(args.task)
    result = tasks_lib.run_task(
        args.task, dataset, embedder, prompts=args.prompts, train_dataset=train,
        magnification=args.magnification,
        magnifications=[float(m) for m in args.magnifications.split(",") if m],
        batch_size=args.batch_size, k=args.k, shots=[int(s) for s in args.shots.split(",") if s],
        seeds=args.seeds, test_fraction=args.test_fraction, seed=args.seed,
        labels=args.labels, topk=topk,
        progress=False if args.no_progress else None,
        report=lambda s: print(s, file=sys.stderr))
  except expected as e:
    print(f"pathjax eval: error: {e}", file=sys.stderr)
    return 2
  result.info.update(model=embedder.name, data=args.data, train_data=args.train_data)
  try:
    written = result.write(out)
  except OSError as e:
    print(f"pathjax eval: error: cannot write {e.filename or out}: {e.strerror or e}",
          file=sys.stderr)
    return 2
  print(f"{args.task} on {dataset.name} ({args.data}) with {embedder.name}")
  print(result.summary)
  print(f"wrote {os.path.abspath(out)}: " + ", ".join(sorted(os.path.basename(p) for p in written.values())))
  return 0
