"""The demo's PathAlign part: slides -> patch embeddings -> Q-Former -> retrieval and reports.

Synthetic slides with a report each -> `pathjax embed-slides` with the ViT the MR-PLIP part
just trained (frozen) -> an offline WordPiece tokenizer -> PathAlign stage 1 (ITC + ITG,
configs/pathalign.py:smoke,no_itm: on these reports ITM stays at the label entropy and only
adds noise to the shared Q-Former) -> held-out slide<->report retrieval against chance. Then a tiny
decoder LLM is pretrained on the training reports (configs/causal_lm.py:smoke) and frozen,
PathAlign stage 2 trains the projection of the Q-Former's queries into its input, and the
model writes a report for every held-out slide: BLEU / ROUGE-L against the most frequent
training report (the baseline a model that ignores the slide would reach).

Every step is a library call behind a `pathjax` subcommand; rerunning reuses finished steps.
"""

from __future__ import annotations

import json
import os
import time

HELDOUT_PREFIX = "pa-heldout"


def _step(title: str) -> float:
  print(f"\n== {title}", flush=True)
  return time.perf_counter()


def _done(t0: float) -> None:
  print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)


def _config(spec: str, overrides: list[str], evals=()):
  from pathjax import config_lib
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  name, _, variant = spec.partition(":")
  config = config_lib.load_config(os.path.join(here, "configs", name) + f":{variant}", overrides)
  config.unlock()
  config.evals = list(evals)
  return config


def _last(workdir: str) -> dict:
  from pathjax.metrics_log import read_metrics
  return read_metrics(workdir)[-1]


def run(out: str, *, vision_model: str, train_slides: int, heldout_slides: int, slide_size: int,
        patch_size: int, magnification: float, stage1_steps: int, llm_steps: int,
        stage2_steps: int, region_px: int = 1000, stage1_batch: int = 32) -> dict:
  """Runs the PathAlign demo under `out`/pathalign with the patch encoder `vision_model`."""
  from pathjax import train as train_lib
  from pathjax.embed_slides import embed_slides
  from pathjax.evaluate.registry import eval_config
  from pathjax.input import tokenize
  from pathjax.input.reports import read_reports, write_reports
  from pathjax.wsi import synth

  root = os.path.join(out, "pathalign")
  results: dict = {}
  t0 = _step(f"P1. synthesize {train_slides} + {heldout_slides} slides with reports and embed "
             f"their tissue patches at {magnification:g}x with the MR-PLIP vision tower "
             "(pathjax synth-slides; pathjax embed-slides)")
  paths, lines = [], []
  for split, n, seed, prefix in (("train", train_slides, 11, "pa-train"),
                                 ("heldout", heldout_slides, 12, HELDOUT_PREFIX)):
    d = os.path.join(root, "slides", split)
    reports_path = os.path.join(d, "reports.jsonl")
    if not os.path.exists(reports_path):
      # Tissue regions about half a slide across: compositions then differ between slides
      # (one to four classes dominate), as they do between real slides and their reports.
      synth.write_synthetic_slides(d, n, seed=seed, size=slide_size, prefix=prefix,
                                   magnifications=(magnification,), patch_size=patch_size,
                                   region_px=region_px)
    paths += sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".svs"))
    split_lines = [{"slide": e.slide, "report": e.report}
                   for e in read_reports(reports_path).entries.values()]
    lines += split_lines
    results[f"{split}_reports"] = [l["report"] for l in split_lines]
  reports = os.path.join(root, "reports.jsonl")
  write_reports(reports, lines)
  emb = os.path.join(root, "embeddings")
  summary = embed_slides(vision_model, emb, magnification=magnification, slides=paths,
                         batch_size=64, patch_size=patch_size, progress=False, log=lambda s: None)
  manifest = summary.get("manifest") or json.load(open(os.path.join(emb, "manifest.json")))
  dim = int(manifest["dim"])
  patches = [s.get("patches", 0) for s in manifest["slides"] if s.get("status") == "done"]
  print(f"   {len(patches)} slides embedded, {min(patches)}-{max(patches)} patches of "
        f"dimension {dim} each; {len(set(results['train_reports']))} distinct training reports")
  _done(t0)

  t0 = _step("P2. a WordPiece tokenizer for the reports (pathjax tokenizer train --kind wordpiece)")
  tok = os.path.join(root, "tokenizer")
  if not os.path.exists(os.path.join(tok, "tokenizer.json")):
    tokenize.train_wordpiece_tokenizer([l["report"] for l in lines], tok, vocab_size=600)
  _done(t0)

  data = [f"data.embeddings={emb}", f"data.reports={reports}", f"input.tokenizer={tok}",
          f"model.qformer.encoder_width={dim}", f"data.heldout_pattern=^{HELDOUT_PREFIX}",
          "input.text_len=64",
          "export_model=true"]
  stage1 = os.path.join(root, "stage1")
  t0 = _step(f"P3. PathAlign stage 1 (ITC + ITG) for {stage1_steps} steps of {stage1_batch} slides "
             f"(pathjax train --config=configs/pathalign.py:smoke,no_itm --workdir {stage1} ...)")
  config = _config("pathalign.py:smoke,no_itm", data + [f"total_steps={stage1_steps}",
                                                 f"batch_size={stage1_batch}",
                                                 f"log_every={max(stage1_steps // 4, 1)}"],
                   [eval_config(kind="slide_retrieval", data="heldout", every=stage1_steps, k=5)])
  train_lib.train(config, stage1)
  last = _last(stage1)
  results["retrieval"] = {k.split("/", 1)[1]: v for k, v in last.items()
                          if k.startswith("slide_retrieval/")}
  results["stage1_loss"] = last["loss"]
  results["monitors"] = monitors(last)
  _done(t0)

  llm = os.path.join(root, "report_lm")
  t0 = _step(f"P4. pretrain a tiny decoder LLM on the training reports for {llm_steps} steps, "
             f"then freeze it (pathjax train --config=configs/causal_lm.py:smoke --workdir {llm})")
  train_reports = os.path.join(root, "slides", "train", "reports.jsonl")
  config = _config("causal_lm.py:smoke", [f"data.path={train_reports}",
                                          f"data.tokenizer_cache={os.path.join(root, 'lm_tokenizer')}",
                                          f"total_steps={llm_steps}",
                                          f"log_every={max(llm_steps // 3, 1)}"])
  train_lib.train(config, llm)
  results["llm_loss"] = _last(llm)["loss"]
  _done(t0)

  stage2 = os.path.join(root, "stage2")
  t0 = _step(f"P5. PathAlign stage 2: Q-Former queries -> soft prompt of the frozen LLM, "
             f"{stage2_steps} steps; reports for the held-out slides")
  config = _config("pathalign.py:smoke,stage2", data[:2] + data[3:] + [
      f"model.init_dir={os.path.join(stage1, 'model')}", f"model.llm_dir={os.path.join(llm, 'model')}",
      f"input.tokenizer={os.path.join(stage1, 'model', 'tokenizer')}",
      # The tiny LLM has only ever read reports: no text prompt (an instruction it never saw
      # would cost most of its 64-token window); the soft tokens alone say which report.
      "model.prompt=", "model.llm_text_len=72",
      f"total_steps={stage2_steps}", f"log_every={max(stage2_steps // 4, 1)}"],
      [eval_config(kind="report_generation", data="heldout", every=stage2_steps)])
  train_lib.train(config, stage2)
  last = _last(stage2)
  results["generation"] = {k.split("/", 1)[1]: v for k, v in last.items()
                           if k.startswith("report_generation/")}
  results["reports"] = _heldout_reports(os.path.join(stage2, "model"), root)
  _done(t0)
  return results


def _heldout_reports(model: str, root: str) -> dict:
  """Every held-out slide's report from the exported stage-2 model (what `pathjax generate
  --model DIR --slide ID` prints), and whether it names the slide's dominant tissue first:
  a check of conditioning on the slide that BLEU's phrasing overlap does not make."""
  import numpy as np

  from pathjax.input.reports import read_reports
  from pathjax.slide_report import SlideReportModel
  from pathjax.wsi import synth
  heldout = os.path.join(root, "slides", "heldout")
  truth = synth.read_truth(os.path.join(heldout, synth.TRUTH_NAME))
  true_reports = {e.slide: e.report for e in read_reports(os.path.join(heldout, "reports.jsonl")).entries.values()}
  ids = sorted(truth)
  model_ = SlideReportModel(model)
  inputs = [model_.slide_inputs(s) for s in ids]
  m = max(x["features"].shape[1] for x in inputs)
  pad = lambda a, value=0: np.concatenate(
      [np.pad(x[a], [(0, 0), (0, m - x[a].shape[1])] + [(0, 0)] * (x[a].ndim - 2),
              constant_values=value) for x in inputs])
  generated = model_.recipe.generate(model_.params, pad("features"), pad("coords"),
                                     pad("patch_mask", False), max_new_tokens=96)
  dominant = [synth.dominant_class(truth[s].fractions) for s in ids]
  named = [synth.dominant_class_named(g) for g in generated]
  counts = {c: dominant.count(c) for c in set(dominant)}
  return {"slide": ids[0], "generated": generated[0], "true": true_reports[ids[0]],
          "dominant_named": float(np.mean([a == b for a, b in zip(named, dominant)])),
          "dominant_constant": max(counts.values()) / len(ids), "n": len(ids)}


def print_retrieval(r: dict) -> None:
  """Held-out slide<->report top-1 / top-5 against chance, from slide_retrieval's metrics."""
  for direction in ("slide_to_report", "report_to_slide"):
    top1, chance = r.get(f"{direction}/itc_top1"), r.get(f"{direction}/chance_top1")
    if top1 is not None and chance:
      print(f"  {direction.replace('_', ' ')}: top-1 {top1:.3f}, top-5 "
            f"{r.get(f'{direction}/itc_top5', float('nan')):.3f}; chance top-1 {chance:.3f} "
            f"({top1 / chance:.1f}x chance)")


def monitors(metrics: dict) -> dict:
  """The collapse monitors (monitor_*) of a logged training step, by name."""
  return {k[len("monitor_"):]: v for k, v in sorted(metrics.items()) if k.startswith("monitor_")}


def print_monitors(m: dict) -> None:
  """One line of collapse monitors (spread ~1 healthy, 0 collapsed; unrelated cos ~0
  healthy, 1 collapsed)."""
  if m:
    print("  collapse monitors, last training step (spread: ~1 healthy, 0 collapsed; unrelated "
          "cos: ~0 healthy, 1 collapsed):\n    "
          + ", ".join(f"{k} {v:.3f}" for k, v in m.items()))


def print_summary(results: dict) -> None:
  r = results.get("retrieval", {})
  print("PathAlign on held-out synthetic slides (stage 1, ITC):")
  print_monitors(results.get("monitors", {}))
  print_retrieval(r)
  g = results.get("generation", {})
  bleu, base = g.get("model/bleu"), g.get("most_frequent_report/bleu")
  if bleu is not None:
    print(f"  report generation (stage 2, frozen LLM): BLEU {bleu:.1f}, ROUGE-L "
          f"{g.get('model/rouge_l', float('nan')):.1f}; most frequent training report: BLEU "
          f"{base:.1f}, ROUGE-L {g.get('most_frequent_report/rouge_l', float('nan')):.1f}")
  rep = results.get("reports")
  if rep:
    print(f"  generated reports name the slide's dominant tissue first for {rep['dominant_named']:.2f} "
          f"of {rep['n']} held-out slides (a writer blind to the slide: at most "
          f"{rep['dominant_constant']:.2f})")
    print(f"  {rep['slide']} (pathjax generate --model demo_out/pathalign/stage2/model --slide "
          f"{rep['slide']}):\n    generated: {rep['generated']}\n    true:      {rep['true']}")
