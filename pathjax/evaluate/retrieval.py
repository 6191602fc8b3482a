"""Image <-> text retrieval over paired data: Recall@1/5/10 both ways.

Pairs are examples with a caption (records with captions, a manifest's `caption` column,
slides' caption files). Identical caption strings are one text candidate: image->text is
correct when the image's own caption string is retrieved, text->image when any image with
that caption is; with all captions distinct this is the usual one-to-one protocol.
"""

from __future__ import annotations

import numpy as np

from pathjax.evaluate import data as data_lib
from pathjax.evaluate import features as features_lib
from pathjax.evaluate import metrics as metrics_lib
from pathjax.evaluate.results import TaskResult, format_table

KS = (1, 5, 10)


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray, image_to_text: np.ndarray) -> dict[str, float]:
  """image_to_text[i] = index of image i's text among the text candidates."""
  sim = image_emb @ text_emb.T
  pos = np.zeros(sim.shape, bool)
  pos[np.arange(len(image_to_text)), image_to_text] = True
  i2t = metrics_lib.recall_at_k(sim, pos, KS)
  t2i = metrics_lib.recall_at_k(sim.T, pos.T, KS)
  out = {f"i2t_R@{k}": v for k, v in i2t.items()}
  out.update({f"t2i_R@{k}": v for k, v in t2i.items()})
  out["mean_recall"] = float(np.mean(list(i2t.values()) + list(t2i.values())))
  return out


def run(dataset: data_lib.Dataset, embedder: features_lib.Embedder, *, batch_size: int = 64,
        progress=None, report=print) -> TaskResult:
  embedder.require_text("retrieval")
  paired = dataset.subset([i for i, c in enumerate(dataset.captions) if c])
  if not len(paired):
    raise data_lib.DataError(f"{dataset.name}: retrieval needs captions (records with captions, a "
                             "manifest with a `caption` column, or slides with a captions file); "
                             "none found")
  feats = features_lib.extract_features(paired, embedder, batch_size=batch_size, progress=progress,
                                        report=report)
  texts = list(dict.fromkeys(feats.captions))
  index = {t: k for k, t in enumerate(texts)}
  target = np.asarray([index[c] for c in feats.captions], np.int64)
  text_emb = embedder.text(texts)
  metrics = retrieval_metrics(feats.embeddings, text_emb, target)
  metrics["num_images"] = float(len(feats))
  metrics["num_texts"] = float(len(texts))
  sim = feats.embeddings @ text_emb.T
  order = np.argsort(-sim, axis=1, kind="stable")
  rank = np.argmax(order == target[:, None], axis=1)
  rows = [{"id": feats.ids[i], "caption": feats.captions[i], "top1_text": texts[order[i, 0]],
           "rank_of_caption": int(rank[i]) + 1} for i in range(len(feats))]
  summary = format_table([{"direction": d, **{f"R@{k}": metrics[f"{d}_R@{k}"] for k in KS}}
                          for d in ("i2t", "t2i")], ["direction"] + [f"R@{k}" for k in KS])
  return TaskResult("retrieval", metrics, rows,
                    info={"skipped": feats.skipped, "warnings": dataset.warnings}, summary=summary)
