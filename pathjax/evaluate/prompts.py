"""Zero-shot prompt files and CONCH's prompt-ensembled classifier.

A prompt file is JSON, the layout CONCH and open_clip use:

    {"classnames": {"ADI": ["adipose tissue", "fat"], "TUM": ["tumor", ...], ...},
     "templates": ["an H&E image of CLASSNAME.", "CLASSNAME.", ...]}

Keys of `classnames` are the dataset's labels (ImageFolder folder names, manifest labels);
their order is the class order of every metric (quadratic kappa reads it as ordinal).
Each template holds the placeholder `CLASSNAME` or `{}`. Files shipped with pathjax live in
`data/prompts/` and are found by bare name (`--prompts crc100k`).

Classifier (CONCH's protocol): for each class embed every synonym x template, L2-normalise
each embedding, average, L2-normalise the mean; logits = normalised image features @
classifier.T.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Sequence

import numpy as np

PLACEHOLDERS = ("CLASSNAME", "{}")
# CONCH's default ensemble, used when a dataset comes without a prompt file.
DEFAULT_TEMPLATES = (
    "CLASSNAME.", "a photomicrograph showing CLASSNAME.", "a photomicrograph of CLASSNAME.",
    "an image of CLASSNAME.", "an image showing CLASSNAME.", "an example of CLASSNAME.",
    "CLASSNAME is shown.", "this is CLASSNAME.", "there is CLASSNAME.",
    "a histopathological image showing CLASSNAME.", "a histopathological image of CLASSNAME.",
    "a histopathological photograph of CLASSNAME.", "a histopathological photograph showing CLASSNAME.",
    "shows CLASSNAME.", "presence of CLASSNAME.", "CLASSNAME is present.",
    "an H&E stained image of CLASSNAME.", "an H&E stained image showing CLASSNAME.",
    "an H&E image showing CLASSNAME.", "an H&E image of CLASSNAME.",
    "CLASSNAME, H&E stain.", "CLASSNAME, H&E.",
)


class PromptError(ValueError):
  """A prompt file that cannot be used, or labels it does not cover."""


@dataclasses.dataclass(frozen=True)
class Prompts:
  classnames: dict[str, list[str]]  # class -> synonyms, in class order
  templates: list[str]
  source: str = ""

  @property
  def classes(self) -> list[str]:
    return list(self.classnames)

  def texts(self, cls: str) -> list[str]:
    """Every synonym x template of one class."""
    return [fill(t, name) for name in self.classnames[cls] for t in self.templates]


def prompts_dir() -> str:
  """`data/prompts` of the source tree (or of an installed copy next to the package)."""
  here = os.path.dirname(os.path.abspath(__file__))
  return os.path.join(os.path.dirname(os.path.dirname(here)), "data", "prompts")


def fill(template: str, name: str) -> str:
  if "CLASSNAME" in template:
    return template.replace("CLASSNAME", name)
  return template.replace("{}", name)


def resolve_path(name_or_path: str) -> str:
  if os.path.exists(name_or_path):
    return name_or_path
  candidate = os.path.join(prompts_dir(), name_or_path if name_or_path.endswith(".json") else name_or_path + ".json")
  if os.path.exists(candidate):
    return candidate
  shipped = sorted(f[:-5] for f in os.listdir(prompts_dir()) if f.endswith(".json")) \
      if os.path.isdir(prompts_dir()) else []
  raise PromptError(f"prompt file {name_or_path!r} not found (neither a path nor a file in "
                    f"{prompts_dir()}); shipped prompt files: {', '.join(shipped) or 'none'}")


def parse_prompts(obj, source: str = "<prompts>") -> Prompts:
  if not isinstance(obj, dict) or "classnames" not in obj or "templates" not in obj:
    raise PromptError(f"{source}: a prompt file is a JSON object with 'classnames' "
                      "({class: [synonyms]}) and 'templates' ([\"... CLASSNAME ...\"])")
  classnames, templates = obj["classnames"], obj["templates"]
  if not isinstance(classnames, dict) or not classnames:
    raise PromptError(f"{source}: 'classnames' must be a non-empty object {{class: [synonyms]}}")
  names: dict[str, list[str]] = {}
  for cls, syn in classnames.items():
    syn = [syn] if isinstance(syn, str) else syn
    if not isinstance(syn, list) or not syn or not all(isinstance(s, str) and s.strip() for s in syn):
      raise PromptError(f"{source}: class {cls!r} needs a non-empty list of synonyms, got {syn!r}")
    names[str(cls)] = list(syn)
  if isinstance(templates, str):
    templates = [templates]
  if not isinstance(templates, list) or not templates:
    raise PromptError(f"{source}: 'templates' must be a non-empty list of strings")
  bad = [t for t in templates if not isinstance(t, str) or not any(p in t for p in PLACEHOLDERS)]
  if bad:
    raise PromptError(f"{source}: template(s) {bad!r} have no class placeholder; every template "
                      "must contain CLASSNAME or {} where the class name goes, e.g. "
                      "\"an H&E image of CLASSNAME.\"")
  return Prompts(names, list(templates), source)


def load_prompts(name_or_path: str) -> Prompts:
  path = resolve_path(name_or_path)
  try:
    with open(path, encoding="utf-8") as f:
      obj = json.load(f)
  except json.JSONDecodeError as e:
    raise PromptError(f"{path}: not valid JSON ({e})") from e
  return parse_prompts(obj, path)


def default_prompts(classes: Sequence[str]) -> Prompts:
  """Class names as their own synonyms (underscores as spaces) with CONCH's templates."""
  return Prompts({c: [c.replace("_", " ")] for c in classes}, list(DEFAULT_TEMPLATES), "<default>")


def match_labels(prompts: Prompts, labels: Sequence[str]) -> dict[str, str]:
  """Maps every dataset label onto a prompt class (exact, then case-insensitive).

  Raises PromptError listing both sets when a label has no class.
  """
  classes = prompts.classes
  lower = {c.lower(): c for c in classes}
  mapping, missing = {}, []
  for label in sorted(set(labels)):
    if label in prompts.classnames:
      mapping[label] = label
    elif label.lower() in lower:
      mapping[label] = lower[label.lower()]
    else:
      missing.append(label)
  if missing:
    raise PromptError(
        f"label(s) {missing} of the data are not classes of the prompt file {prompts.source}. "
        f"Data labels: {sorted(set(labels))}. Prompt classes: {classes}. Rename the labels or "
        "add the classes to the prompt file's 'classnames'.")
  return mapping


def build_classifier(prompts: Prompts, embed_texts: Callable[[list[str]], np.ndarray]) -> np.ndarray:
  """[C, E] class embeddings (CONCH's ensemble). `embed_texts(list of str) -> [N, E]`."""
  from pathjax.evaluate.features import l2_normalize
  all_texts, spans = [], []
  for cls in prompts.classes:
    texts = prompts.texts(cls)
    spans.append((len(all_texts), len(all_texts) + len(texts)))
    all_texts += texts
  emb = l2_normalize(np.asarray(embed_texts(all_texts)))
  weights = np.stack([l2_normalize(emb[a:b]).mean(0) for a, b in spans])
  return l2_normalize(weights).astype(np.float32)
