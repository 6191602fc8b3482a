"""Instruction data for slide-level chat (pathjax.recipes.slide_instruct).

File format (JSON lines, one conversation a line; a user can write the same for real data):

    {"slide": "slide-007",
     "messages": [{"role": "user", "content": "<image>\\nWhich tissue dominates ...?\\nA. ..."},
                  {"role": "assistant", "content": "B"}],
     "task": "mcq", "answer": "B", "choices": ["stroma", "tumor", ...]}   # optional fields

Exactly one `<image>` (IMAGE) per conversation marks where the slide's visual tokens go
(LLaVA style); it is a split point of the rendered text, not a vocabulary token, so any
tokenizer works (the text before and after it is tokenized separately). `task` selects
conversations per training stage (`data.tasks`) and evaluation task ("caption", "mcq",
"open"; missing = "chat"); `answer` is the gold letter of a multiple-choice question.

Synthetic data (`synthetic_instructions`) comes from the ground truth of synthetic slides
(`synth.read_truth`: each class's share of the tissue) and their reports: captioning (the
report), multiple-choice A-D (which tissue dominates, which is absent, roughly what share
one tissue covers; distractors from the other classes or share bins; answered with the
letter, or with the option's text for an LLM that cannot look a letter up among the
options) and open questions (which tissues are present; is there tumor). Deterministic per
(seed, slide).

Chat encoding (`ChatEncoder`): the tokenizer's own chat template renders the conversation;
the assistant turns' spans are found by rendering growing prefixes of the conversation
(`render(messages[:k], add_generation_prompt=True)` is the text before turn k), so the loss
mask covers exactly the assistant text and its end-of-turn marker, for any template that
renders prefixes consistently (checked; a template that rewrites earlier turns is refused).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from pathjax.config_lib import ConfigError
from pathjax.input.json_lines import json_objects

IMAGE = "<image>"
TASKS = ("caption", "mcq", "open", "chat")
LETTERS = "ABCD"
# A ChatML-style template for tokenizers that have none (the demo's tiny report LLM). The
# tokenizer's eos closes every turn, so generation stops on it, and the newline between turns
# opens the next turn: an assistant turn's targets end at eos (a base LM's hidden state after
# eos is one it was never trained to continue from). `<|im_start|>` is plain text.
CHATML_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if not loop.first %}\n{% endif %}<|im_start|>"
    "{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}\n{% endif %}<|im_start|>assistant\n{% endif %}")
SHARE_BINS = ("under 10%", "10 to 25%", "25 to 50%", "over 50%")

_CAPTION_ASKS = ("Describe this slide.", "Write the pathology report for this slide.",
                 "What does this whole-slide image show?", "Summarise the findings on this slide.")


class InstructionError(ValueError):
  """An instruction file that cannot be used (the message names the file, line and fix)."""


def _share_bin(f: float) -> int:
  return 0 if f < 0.10 else 1 if f < 0.25 else 2 if f < 0.50 else 3


ANSWER_WITH = {"letter": "Answer with the letter of the correct option.",
               "option": "Answer with the correct option."}


def _mcq(rng, question: str, correct: str, distractors: Sequence[str], answer_with: str) -> dict:
  """A user/assistant pair for an A-D question with `correct` placed at a random letter; the
  assistant answers with the letter (`answer_with="letter"`, PathFLIP's format) or with the
  option's text ("option"); both are scored by exact choice match (parse_choice)."""
  picks = list(rng.choice(len(distractors), size=3, replace=False))
  choices = [distractors[i] for i in picks]
  pos = int(rng.integers(4))
  choices.insert(pos, correct)
  body = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
  prompt = f"{IMAGE}\n{question}\n{body}\n{ANSWER_WITH[answer_with]}"
  reply = LETTERS[pos] if answer_with == "letter" else correct
  return {"messages": [{"role": "user", "content": prompt},
                       {"role": "assistant", "content": reply}],
          "task": "mcq", "answer": LETTERS[pos], "choices": choices}


def slide_instructions(slide: str, fractions: Mapping[str, float], report: str | None, *,
                       seed: int = 0, classes: Sequence[str] | None = None,
                       mcq_per_slide: int = 3, present_at: float = 0.03,
                       answer_with: str = "letter") -> list[dict]:
  """Conversations for one slide: one caption (when a report is given), `mcq_per_slide`
  multiple-choice questions (kinds cycled: dominant, absent, share; answered with the letter
  or the option's text, `answer_with`) and two open questions. Deterministic per (seed,
  slide)."""
  if answer_with not in ANSWER_WITH:
    raise ValueError(f"answer_with {answer_with!r}: valid {', '.join(ANSWER_WITH)}")
  import zlib
  from pathjax.wsi.synth import TISSUE_CLASSES
  classes = list(classes or TISSUE_CLASSES)
  rng = np.random.default_rng([int(seed), zlib.crc32(slide.encode())])
  frac = {c: float(fractions.get(c, 0.0)) for c in classes}
  out: list[dict] = []
  if report:
    ask = _CAPTION_ASKS[int(rng.integers(len(_CAPTION_ASKS)))]
    out.append({"messages": [{"role": "user", "content": f"{IMAGE}\n{ask}"},
                             {"role": "assistant", "content": report}], "task": "caption"})
  ranked = sorted(classes, key=lambda c: -frac[c])
  present = [c for c in ranked if frac[c] >= present_at]
  absent = [c for c in classes if frac[c] == 0.0]
  kinds = ["dominant", "absent", "share"]
  start = int(rng.integers(len(kinds)))
  made = 0
  for i in range(3 * max(mcq_per_slide, 0)):
    if made >= mcq_per_slide:
      break
    kind = kinds[(start + i) % len(kinds)]
    if kind == "dominant" and frac[ranked[0]] > 0:
      q = _mcq(rng, "Which tissue dominates this slide?", ranked[0], ranked[1:], answer_with)
    elif kind == "absent" and absent and len(present) >= 3:
      q = _mcq(rng, "Which tissue is absent from this slide?", absent[int(rng.integers(len(absent)))],
               present, answer_with)
    elif kind == "share" and present:
      c = present[int(rng.integers(len(present)))]
      k = _share_bin(frac[c])
      q = _mcq(rng, f"Roughly what share of the tissue is {c}?", SHARE_BINS[k],
               [b for j, b in enumerate(SHARE_BINS) if j != k], answer_with)
    else:
      continue
    out.append(q)
    made += 1
  if present:
    listing = ", ".join(present[:-1]) + (" and " if len(present) > 1 else "") + present[-1]
    out.append({"messages": [{"role": "user", "content": f"{IMAGE}\nWhich tissue types are present?"},
                             {"role": "assistant", "content": f"{listing[0].upper()}{listing[1:]}."}],
                "task": "open"})
  t = frac.get("tumor", 0.0)
  if "tumor" in frac:
    answer = (f"Yes, tumor makes up about {round(t * 20) * 5}% of the tissue." if t >= present_at
              else "No tumor is seen.")
    out.append({"messages": [{"role": "user", "content": f"{IMAGE}\nIs there tumor on this slide?"},
                             {"role": "assistant", "content": answer}], "task": "open"})
  return [dict(r, slide=slide) for r in out]


def synthetic_instructions(truth: Mapping[str, Any], reports: Mapping[str, str] | None = None, *,
                           seed: int = 0, mcq_per_slide: int = 3, answer_with: str = "letter"
                           ) -> list[dict]:
  """Conversations for every slide of `truth` ({slide: SlideTruth}, synth.read_truth), in
  sorted slide order; `reports` ({slide: text}) adds a captioning conversation per slide."""
  out = []
  for sid in sorted(truth):
    out += slide_instructions(sid, truth[sid].fractions, (reports or {}).get(sid), seed=seed,
                              mcq_per_slide=mcq_per_slide, answer_with=answer_with)
  return out


def text_only_conversations(records: Iterable[Mapping[str, Any]], texts: Mapping[str, str], *,
                            tasks: Sequence[str] = ("mcq", "open")) -> list[dict]:
  """The conversations of `records` with each slide's text (`texts`: {slide: report}) in
  place of its `<image>`: the same questions asked about the report instead of the slide.
  Chat data for a base LM (pathjax.recipes.causal_lm, data.field "messages") to learn the
  chat format and the answer styles before it learns to read slides (what a published chat
  LLM arrives knowing). Slides without a text are left out."""
  out = []
  for r in records:
    text = texts.get(r.get("slide", ""))
    if r.get("task") not in tasks or not text:
      continue
    msgs = [dict(m, content=m["content"].replace(IMAGE, text.strip())) for m in r["messages"]]
    out.append({**r, "messages": msgs})
  return out


def write_instructions(path: str, records: Iterable[Mapping[str, Any]]) -> str:
  """Writes JSON lines atomically (a temporary file renamed into place)."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(dict(r)) + "\n")
  os.replace(tmp, path)
  return path


def write_synthetic_instructions(slides_dir: str, out_path: str | None = None, *, seed: int = 0,
                                 mcq_per_slide: int = 3) -> str:
  """instructions.jsonl for a `pathjax synth-slides` directory (its truth.npz and
  reports.jsonl); returns the path written (default: next to them)."""
  from pathjax.input.reports import read_reports
  from pathjax.wsi import synth
  truth_path = os.path.join(slides_dir, synth.TRUTH_NAME)
  if not os.path.isfile(truth_path):
    raise InstructionError(f"{slides_dir} has no {synth.TRUTH_NAME}; write the slides with "
                           "`pathjax synth-slides` (it writes the ground truth)")
  reports_path = os.path.join(slides_dir, "reports.jsonl")
  reports = {}
  if os.path.isfile(reports_path):
    reports = {e.slide: e.report for e in read_reports(reports_path).entries.values()}
  records = synthetic_instructions(synth.read_truth(truth_path), reports, seed=seed,
                                   mcq_per_slide=mcq_per_slide)
  return write_instructions(out_path or os.path.join(slides_dir, "instructions.jsonl"), records)


def read_instructions(path: str, *, text_only: bool = False) -> list[dict]:
  """Conversations of a JSON-lines file, validated (errors name the line and the fix).
  `text_only`: conversations without a slide (no "slide", no `<image>`), for a plain chat
  LLM (pathjax.recipes.causal_lm with data.field "messages")."""
  if not path:
    raise ConfigError("data.instructions is empty; set --config.data.instructions=FILE (JSON "
                      "lines {\"slide\", \"messages\": [{\"role\", \"content\"}, ...]})")
  if not os.path.isfile(path):
    raise ConfigError(f"data.instructions={path} does not exist (write synthetic ones with "
                      "`pathjax synth-slides --instructions`)")
  out = []
  for where, r in json_objects(path, InstructionError):
    if not text_only and (not isinstance(r.get("slide"), str) or not r["slide"]):
      raise InstructionError(f"{where}: needs a \"slide\" id string")
    msgs = r.get("messages")
    if not isinstance(msgs, list) or not msgs or not all(
        isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
        and isinstance(m.get("content"), str) for m in msgs):
      raise InstructionError(f"{where}: \"messages\" must be a list of {{\"role\": system|user|"
                             "assistant, \"content\": string}")
    if msgs[-1]["role"] != "assistant":
      raise InstructionError(f"{where}: the last message must be the assistant's answer")
    n_img = sum(m["content"].count(IMAGE) for m in msgs)
    if text_only and n_img:
      raise InstructionError(f"{where}: a text-only conversation holds {IMAGE}; conversations "
                             "about a slide train with configs/pathflip.py:instruct_*")
    if not text_only and n_img != 1:
      raise InstructionError(f"{where}: the conversation has {n_img} {IMAGE} placeholders; "
                             f"put exactly one (where the slide goes) in a user message")
    task = r.setdefault("task", "chat")
    if task not in TASKS:
      raise InstructionError(f"{where}: task {task!r}; valid: {', '.join(TASKS)}")
    if task == "mcq" and r.get("answer") not in tuple(LETTERS):
      raise InstructionError(f"{where}: a multiple-choice line needs \"answer\": one of A-D")
    out.append(r)
  if not out:
    raise InstructionError(f"{path} holds no conversations")
  return out


# ------------------------------------------------------------------------------ encoding


def add_chat_template(tokenizer_dir: str, template: str = CHATML_TEMPLATE) -> None:
  """Gives a saved tokenizer a chat template (rewrites its files in place, atomically per file
  through `save_pretrained` into a temporary directory)."""
  import shutil
  import tempfile

  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
  tok.chat_template = template
  tmp = tempfile.mkdtemp(prefix=".tok-", dir=os.path.dirname(os.path.abspath(tokenizer_dir)))
  try:
    tok.save_pretrained(tmp)
    for name in os.listdir(tmp):
      os.replace(os.path.join(tmp, name), os.path.join(tokenizer_dir, name))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


@dataclasses.dataclass
class Encoded:
  """One conversation as token ids with the image slot: ids [L] (the slot holds pad),
  mask [L], targets [L] (True on assistant tokens), image_pos (index of the slot)."""
  ids: np.ndarray
  mask: np.ndarray
  targets: np.ndarray
  image_pos: int
  truncated: bool


class ChatEncoder:
  """Renders conversations with the tokenizer's chat template and tokenizes them around
  the `<image>` split point (`image=True`: exactly one per conversation; `image=False`:
  text-only chat, none allowed, image_pos -1). Picklable (Grain workers rebuild the
  tokenizer)."""

  def __init__(self, tokenizer_dir: str, length: int, *, image: bool = True):
    self.tokenizer_dir, self.length, self.image = tokenizer_dir, int(length), bool(image)
    tok = self.tok
    if not getattr(tok, "chat_template", None):
      raise ConfigError(f"the LLM tokenizer in {tokenizer_dir} has no chat template; "
                        "chat data needs one (give it one with pathjax.input.instructions."
                        "add_chat_template(DIR), a ChatML-style template, or use an "
                        "instruction-tuned LLM's tokenizer)")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad is None or tok.eos_token_id is None:
      raise ConfigError(f"the LLM tokenizer in {tokenizer_dir} needs an eos token")
    self.pad_id, self.eos_id = int(pad), int(tok.eos_token_id)

  @property
  def tok(self):
    t = self.__dict__.get("_tok")
    if t is None:
      from transformers import AutoTokenizer
      try:
        t = AutoTokenizer.from_pretrained(self.tokenizer_dir, local_files_only=True)
      except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the LLM tokenizer in {self.tokenizer_dir}: {e}") from None
      self.__dict__["_tok"] = t
    return t

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_tok"}

  def render(self, messages: Sequence[Mapping[str, str]], generation_prompt: bool = False) -> str:
    return self.tok.apply_chat_template(list(messages), tokenize=False,
                                        add_generation_prompt=generation_prompt)

  def _ids(self, text: str) -> list[int]:
    return list(self.tok(text, add_special_tokens=False)["input_ids"]) if text else []

  def segments(self, messages: Sequence[Mapping[str, str]]) -> list[tuple[str, bool]]:
    """(text, is_target) pieces of the rendered conversation, in order."""
    full = self.render(messages)
    pieces, at = [], 0
    for k, m in enumerate(messages):
      if m["role"] != "assistant":
        continue
      pre = self.render(messages[:k], generation_prompt=True)
      upto = self.render(messages[:k + 1])
      if not (full.startswith(upto) and upto.startswith(pre) and len(pre) >= at):
        raise ConfigError(f"the chat template of {self.tokenizer_dir} does not render "
                          "conversations prefix-consistently (an earlier turn changes when a "
                          "later one is added), so the assistant tokens cannot be located; use "
                          "a ChatML-style template (pathjax.input.instructions.CHATML_TEMPLATE)")
      pieces += [(full[at:len(pre)], False), (full[len(pre):len(upto)], True)]
      at = len(upto)
    pieces.append((full[at:], False))
    return [p for p in pieces if p[0]]

  def _tokenize(self, pieces: Sequence[tuple[str, bool]]) -> tuple[list[int], list[bool], int]:
    ids, targets, pos = [], [], -1
    for text, target in pieces:
      parts = text.split(IMAGE)
      for j, part in enumerate(parts):
        if j:
          if not self.image:
            raise ConfigError(f"a text-only conversation holds {IMAGE}; slide conversations "
                              "train with the slide chat recipe (configs/pathflip.py:instruct_*)")
          if target or pos >= 0:
            raise ConfigError(f"a conversation needs exactly one {IMAGE}, in a user turn")
          pos = len(ids)
          ids.append(self.pad_id)
          targets.append(False)
        t = self._ids(part)
        ids += t
        targets += [target] * len(t)
    if pos < 0 and self.image:
      raise ConfigError(f"a conversation has no {IMAGE} placeholder")
    return ids, targets, pos

  def encode(self, messages: Sequence[Mapping[str, str]]) -> Encoded:
    """Training inputs of a whole conversation, cut or right-padded to `length`."""
    ids, targets, pos = self._tokenize(self.segments(messages))
    if self.image and pos >= self.length:
      raise ConfigError(f"the text before {IMAGE} has {pos} tokens; model.text_len "
                        f"{self.length} leaves no room")
    n = min(len(ids), self.length)
    out = np.full((self.length,), self.pad_id, np.int32)
    out[:n] = ids[:n]
    mask = np.zeros((self.length,), bool)
    mask[:n] = True
    tgt = np.zeros((self.length,), bool)
    tgt[:n] = targets[:n]
    return Encoded(out, mask, tgt, pos, len(ids) > self.length)

  def prompt(self, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[int]]:
    """(ids before the image, ids after it) of the conversation so far plus the assistant
    prefix, for generation; the messages end with a user turn."""
    text = self.render(messages, generation_prompt=True)
    ids, _, pos = self._tokenize([(text, False)])
    if pos < 0:  # text-only chat (image=False): everything comes before
      return ids, []
    return ids[:pos], ids[pos + 1:]

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    return self.tok.decode(ids, skip_special_tokens=True).strip()


def parse_choice(text: str, choices: Sequence[str] | None = None) -> str | None:
  """The letter A-D a multiple-choice answer picks, or None: the text of one of `choices`
  exactly ("stroma", case and a final '.' aside), or a letter ("B", "B.", "(B) stroma")."""
  if choices:
    said = text.strip().rstrip(".").strip().lower()
    for letter, choice in zip(LETTERS, choices):
      if said == choice.strip().lower():
        return letter
  s = text.strip().lstrip("(").upper()
  if s[:1] in LETTERS and (len(s) == 1 or not s[1].isalpha()):
    return s[0]
  return None
