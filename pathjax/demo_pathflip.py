"""The demo's PathFLIP part: alignment on the PathAlign part's slide embeddings and reports,
then localization on held-out slides whose tissue classes are known.

PathFLIP (configs/pathflip.py:smoke with regions = 2 x 2 blocks of the patch grid), starting
from PathAlign stage 1's Q-Former, trains on the training slides' MR-PLIP patch embeddings and
reports: L_slide (caption InfoNCE) +
L_region (text-conditioned region embeddings against subcaptions: by default each report's
tissues named, `finding_phrases`, as region descriptions; or the paper's sentence
sampler). Then, on the held-out slides, for every tissue class
present on a slide, its name as the text -> heatmap (region attention x within-region patch
attention) -> pointing game (hit when the top patch is of that class; chance = the class's
share of the slide's tissue) and heatmap AUC against the class mask (truth.npz). One
heatmap is written as a PNG over the slide's thumbnail (`pathjax localize`).

Every step is a library call behind a `pathjax` subcommand; rerunning reuses a finished run.
"""

from __future__ import annotations

import os
import time

# Regions of 2 x 2 patches: the demo's slides have ~40-64 patches at 10x (8 x 8 grid).
# The Q-Former starts from PathAlign stage 1's (init_dir), as the paper's starts from a
# pretrained one: from scratch its text tower maps every tissue name to one direction at
# initialisation (cos 1.00 between all six; BERT's std-0.02 init leaves [CLS] almost
# unmixed), and after 480 steps localization reached 1.20x chance (heatmap AUC 0.57) against
# 1.94x (AUC 0.76) from PathAlign's Q-Former, 2.07x (AUC 0.74) after 720 steps. Maps averaged
# over the 4 translations of the 2 x 2 grid (pathflip.slide_heatmaps), from PathAlign stage 1
# of 400 steps x 32 slides, seeds 0/1/2: 2.01x/2.71x/2.58x (AUC 0.83/0.89/0.87); from 200 x 16
# 2.51x/1.87x/2.78x. Steps cost ~0.1 s here; compiling and the evaluation dominate the part's time.
DEFAULTS = dict(steps=720, batch_size=16, region_size=4, num_regions=12, lr=2e-3,
                finding_subcaptions=True)


def _step(title: str) -> float:
  print(f"\n== {title}", flush=True)
  return time.perf_counter()


def _done(t0: float) -> None:
  print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)


def finding_phrases(report: str) -> list[str]:
  """The tissues a report names, in order of first mention ("adipose tissue", "fibrous
  stroma"): the region descriptions the later PathFLIP version reads from its data, written
  here by rule from the report text alone. Amounts ("extensive", "about 45% of the tissue")
  are left out: they describe the slide, not a region, and with them most other slides'
  subcaptions would still name a tissue the anchor slide shows in different words (a
  negative the region loss cannot tell from a positive). A report naming no known tissue
  gives itself."""
  from pathjax.wsi import synth
  text = report.lower()
  found = [(text.find(n), n) for n in synth.REPORT_NAMES.values() if n in text]
  return [n for _, n in sorted(found)] or [report]


def write_subcaptions(reports: str, path: str) -> str:
  """data.subcaptions for every report: {"slide", "subcaptions": finding_phrases(report)}."""
  import json
  from pathjax.input.reports import read_reports
  rows = [{"slide": e.slide, "subcaptions": finding_phrases(e.report)}
          for e in read_reports(reports).entries.values()]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  os.replace(tmp, path)
  return path


def run(out: str, *, embeddings: str, reports: str, tokenizer: str, truth: str, slides: str,
        heldout_pattern: str, steps: int = DEFAULTS["steps"], batch_size: int = DEFAULTS["batch_size"],
        region_size: int = DEFAULTS["region_size"], num_regions: int = DEFAULTS["num_regions"],
        lr: float = DEFAULTS["lr"], finding_subcaptions: bool = DEFAULTS["finding_subcaptions"],
        init_dir: str = "", overrides: tuple[str, ...] = ()) -> dict:
  """Trains and evaluates PathFLIP under `out`/pathflip.

  embeddings / reports / tokenizer: the PathAlign part's artefacts; truth: its truth.npz
  file(s) (comma-separated); slides: the folder of held-out slide files (thumbnails);
  heldout_pattern: a regex over slide ids that marks the held-out slides; init_dir: a model
  directory whose Q-Former PathFLIP starts from (PathAlign stage 1's export; "" = from scratch).
  """
  from pathjax import localize
  from pathjax.demo_pathalign import _config, _last, monitors
  from pathjax.embed_slides import open_slide_embeddings
  from pathjax.evaluate import slide_localization as sl
  from pathjax.evaluate.registry import eval_config
  from pathjax.recipes.pathflip import load_model
  from pathjax import train as train_lib
  from pathjax.wsi import synth

  root = os.path.join(out, "pathflip")
  workdir = os.path.join(root, "run")
  dim = int(open_slide_embeddings(embeddings).dim)
  overrides = list(overrides)
  if finding_subcaptions:  # one finding per subcaption instead of the paper's sentence sampler
    overrides.append("data.subcaptions=" + write_subcaptions(reports, os.path.join(root, "subcaptions.jsonl")))
  if init_dir:  # the paper starts from a pretrained Q-Former; here PathAlign's, same slides
    overrides.insert(0, f"model.init_dir={init_dir}")
  overrides = [f"data.embeddings={embeddings}", f"data.reports={reports}", f"input.tokenizer={tokenizer}",
               f"data.truth={truth}", f"data.heldout_pattern={heldout_pattern}",
               f"model.qformer.encoder_width={dim}", "model.regions=grid",
               f"model.region_size={region_size}", f"model.num_regions={num_regions}",
               f"batch_size={batch_size}", f"total_steps={steps}", f"optimizer.lr={lr}",
               f"log_every={max(steps // 4, 1)}",
               f"checkpoint_every={steps}", "export_model=true"] + overrides
  start = f"from the Q-Former of {init_dir}" if init_dir else "from scratch"
  t0 = _step(f"F1. PathFLIP alignment {start} (L_slide + L_region; regions = {region_size}-patch blocks "
             f"of the grid, {num_regions} per slide) for {steps} steps, then held-out "
             f"localization (pathjax train --config=configs/pathflip.py:smoke --workdir "
             f"{workdir} --config.model.regions=grid ...)")
  # Slide<->report retrieval is PathAlign's demo; add
  # eval_config(kind="slide_retrieval", data="heldout", every=steps) to see PathFLIP's.
  config = _config("pathflip.py:smoke", overrides,
                   [eval_config(kind="localization", data="heldout", every=steps)])
  train_lib.train(config, workdir)
  last = _last(workdir)
  results: dict = {"loss": last["loss"], "slide_loss": last.get("slide"),
                   "region_loss": last.get("region"), "monitors": monitors(last),
                   "region_probs": (last.get("region_pos_prob"), last.get("region_neg_prob"))}
  results["retrieval"] = {k.split("/", 1)[1]: v for k, v in last.items()
                          if k.startswith("slide_retrieval/")}
  results["localization"] = {k.split("/", 1)[1]: v for k, v in last.items()
                             if k.startswith("localization/")}
  _done(t0)

  t0 = _step("F2. a localization heatmap for one held-out slide (pathjax localize)")
  model = load_model(os.path.join(workdir, "model"))
  emb = open_slide_embeddings(embeddings)
  import re
  held = [s for s in emb.slide_ids if re.search(heldout_pattern, s)]
  truths = sl.read_truths(truth)
  present = lambda s: {c: f for c, f in truths[s].fractions.items() if f >= 0.05}
  with_truth = [s for s in held if s in truths]
  sid = next((s for s in with_truth if len(present(s)) > 1), with_truth[0])
  fr = present(sid)
  # The second most common class: a heatmap that has to pick out part of the slide.
  cls = sorted(fr, key=lambda c: -fr[c])[1 if len(fr) > 1 else 0]
  text = synth.REPORT_NAMES[cls]
  prefix = os.path.join(root, f"{sid}_{cls}")
  made = localize.localize(os.path.join(workdir, "model"), sid, text, prefix, embeddings=embeddings,
                           slides=slides, overwrite=True, model=model)
  print(f"   {sid}, '{text}' ({fr[cls]:.0%} of the tissue): {made['png']} over "
        f"{made['painted_over']}; raw map {made['npy']}")
  results["heatmap"] = {"slide": sid, "class": cls, "text": text, "share": fr[cls], **made}
  _done(t0)
  return results


def print_summary(results: dict) -> None:
  print("PathFLIP on held-out synthetic slides:")
  r = results.get("retrieval", {})
  from pathjax.demo_pathalign import print_monitors, print_retrieval
  m = dict(results.get("monitors", {}))
  focus = m.pop("region_attention_focus", None)   # printed with the region head below
  print_monitors(m)
  pos, neg = results.get("region_probs", (None, None))
  if pos is not None and focus is not None:
    # A region head stuck at a constant gives every pair the same p; attention focus 0 is
    # uniform attention over regions (maps that cannot localize).
    print(f"  region head, last training step: p(match) {pos:.3f} for the slide's own "
          f"subcaptions vs {neg:.3f} for other slides'; region attention focus "
          f"{focus:.3f} (0 uniform over regions, 1 one region)")
  print_retrieval(r)
  loc = results.get("localization", {})
  if "pointing_game" in loc:
    print(f"  localization over {int(loc.get('pairs', 0))} (slide, class) pairs: pointing game "
          f"{loc['pointing_game']:.3f} vs chance {loc['pointing_chance']:.3f} "
          f"({loc['pointing_over_chance']:.2f}x; goal >= 2x), heatmap AUC {loc['heatmap_auc']:.3f}")
  h = results.get("heatmap")
  if h:
    print(f"  heatmap: {h['png']} ({h['slide']}, '{h['text']}')")


def main(argv=None) -> int:
  """Runs the part on an existing PathAlign demo output (`--from DIR/pathalign`)."""
  import argparse
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--from", dest="src", required=True, help="the PathAlign part's folder (OUT/pathalign)")
  parser.add_argument("--out", required=True)
  parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
  parser.add_argument("--sentence-subcaptions", action="store_true",
                      help="the paper's subcaption sampler (sentences) instead of the reports' "
                           "findings one by one (finding_phrases)")
  parser.add_argument("--from-scratch", action="store_true",
                      help="a fresh Q-Former instead of PathAlign stage 1's")
  args, overrides = parser.parse_known_args(argv)
  overrides = [o[len("--config."):] for o in overrides if o.startswith("--config.")]
  from pathjax.demo_pathalign import HELDOUT_PREFIX
  src = args.src
  t0 = time.perf_counter()
  results = run(args.out, embeddings=os.path.join(src, "embeddings"),
                reports=os.path.join(src, "reports.jsonl"), tokenizer=os.path.join(src, "tokenizer"),
                truth=",".join(os.path.join(src, "slides", s, "truth.npz") for s in ("train", "heldout")),
                slides=os.path.join(src, "slides", "heldout"), heldout_pattern=f"^{HELDOUT_PREFIX}",
                steps=args.steps, finding_subcaptions=not args.sentence_subcaptions,
                init_dir="" if args.from_scratch else os.path.join(src, "stage1", "model"),
                overrides=tuple(overrides))
  print()
  print_summary(results)
  print(f"\nPathFLIP part finished in {time.perf_counter() - t0:.0f} s")
  return 0


if __name__ == "__main__":
  import sys
  sys.exit(main())
