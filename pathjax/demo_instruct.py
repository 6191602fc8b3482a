"""The demo's slide-chat part: a frozen slide encoder + the tiny report LLM -> instruction
following, scored by multiple-choice VQA on held-out synthetic slides.

From the PathAlign part's artefacts (`demo_out/pathalign`: slides with truth.npz, slide
embeddings, the tiny report LLM) and an encoder model directory (PathFLIP's align model when
present, else PathAlign stage1/model): synthetic instructions from the slides' ground truth
(captions, A-D questions, open questions; pathjax.input.instructions) -> the LLM's tokenizer
given a ChatML-style template (in a copy of the LLM directory) -> chat tuning of that LLM on
text only (the training slides' questions asked about their reports: the chat format and
answer styles a published chat LLM arrives with; the report LLM has only read reports, and
with LoRA alone it stays at one constant answer) -> stage 1 (projector only, on captions) ->
stage 2 (projector + LoRA, captions + VQA) -> VQA accuracy on held-out slides against chance
(0.25) and a slide-blind answer prior, a linear probe of the visual tokens, and one chat
answer. The A-D questions are answered with the option's text: the two-layer LLM does not
learn to look a letter up among the options (0.27 on held-out questions even with the
report given as text, after 1,000 chat-tuning steps).

Every step is a library call behind a `pathjax` subcommand; rerunning reuses finished steps.
"""

from __future__ import annotations

import json
import os
import shutil
import time

INSTRUCT_DEFAULTS = dict(chat_steps=300, stage1_steps=30, stage2_steps=500, train_mcq=9,
                         heldout_mcq=6, batch_size=16)


def _step(title: str) -> float:
  print(f"\n== {title}", flush=True)
  return time.perf_counter()


def _done(t0: float) -> None:
  print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)


def _config(spec: str, overrides: list[str]):
  from pathjax import config_lib
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  name, _, variant = spec.partition(":")
  config = config_lib.load_config(os.path.join(here, "configs", name) + f":{variant}", overrides)
  config.unlock()
  config.evals = []
  return config


def prepare(out: str, pathalign_root: str, llm_dir: str, *, train_mcq: int, heldout_mcq: int
            ) -> dict[str, str]:
  """instructions.jsonl for the PathAlign part's train + held-out slides, and a copy of the
  LLM directory whose tokenizer has a chat template."""
  from pathjax.input import instructions as inst
  from pathjax.wsi import synth
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "instructions.jsonl")
  if not os.path.exists(path):
    records, reports = [], _reports(pathalign_root)
    for split, k in (("train", train_mcq), ("heldout", heldout_mcq)):
      truth = synth.read_truth(os.path.join(pathalign_root, "slides", split, synth.TRUTH_NAME))
      # Answers as the option's text (module docstring: why not letters).
      records += inst.synthetic_instructions(truth, reports, seed=5, mcq_per_slide=k,
                                             answer_with="option")
    inst.write_instructions(path, records)
  llm = os.path.join(out, "llm")
  if not os.path.exists(os.path.join(llm, "model.json")):
    tmp = llm + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(llm_dir, tmp)
    inst.add_chat_template(os.path.join(tmp, "tokenizer"))
    os.replace(tmp, llm)
  return {"instructions": path, "llm": llm}


def chat_tune(root: str, rows: list[dict], reports: dict[str, str], llm_dir: str, *, steps: int
              ) -> str:
  """The LLM finetuned (all weights) on the training slides' conversations (`rows`) with each
  report in place of the slide (pathjax.recipes.causal_lm chat data); returns its model
  directory."""
  from pathjax import train as train_lib
  from pathjax.demo_pathalign import HELDOUT_PREFIX
  from pathjax.input import instructions as inst
  path = os.path.join(root, "text_chat.jsonl")
  if not os.path.exists(path):
    train = [r for r in rows if not r["slide"].startswith(HELDOUT_PREFIX)]
    inst.write_instructions(path, inst.text_only_conversations(train, reports))
  workdir = os.path.join(root, "chat_lm")
  config = _config("causal_lm.py:smoke", [
      f"model.init_dir={llm_dir}", f"data.path={path}", "data.field=messages", "data.seq_len=160",
      f"total_steps={steps}", f"log_every={max(steps // 4, 1)}", f"checkpoint_every={steps}",
      "optimizer.lr=3e-3"])
  train_lib.train(config, workdir)
  return os.path.join(workdir, "model")


def _reports(pathalign_root: str) -> dict[str, str]:
  from pathjax.input.reports import read_reports
  out = {}
  for split in ("train", "heldout"):
    path = os.path.join(pathalign_root, "slides", split, "reports.jsonl")
    out.update({e.slide: e.report for e in read_reports(path).entries.values()})
  return out


def run(out: str, *, encoder_dir: str, pathalign_root: str | None = None, llm_dir: str | None = None,
        chat_steps: int = 300, stage1_steps: int, stage2_steps: int, train_mcq: int = 9,
        heldout_mcq: int = 6, batch_size: int = 8) -> dict:
  """Runs the slide-chat demo under `out`/instruct. `encoder_dir`: a model directory with a
  visual_tokens predict function; `pathalign_root` (default `out`/pathalign) holds the slides,
  embeddings and report LLM of the PathAlign part."""
  from pathjax import train as train_lib
  from pathjax.demo_pathalign import HELDOUT_PREFIX
  from pathjax.evaluate.instruct import (SlideChatModel, answer_prior_accuracy, probe_visual_tokens,
                                         run_vqa)
  from pathjax.input import instructions as inst
  from pathjax.metrics_log import read_metrics
  from pathjax.recipes.base import make_recipe

  pa = pathalign_root or os.path.join(out, "pathalign")
  llm_dir = llm_dir or os.path.join(pa, "report_lm", "model")
  root = os.path.join(out, "instruct")
  results: dict = {"encoder_dir": encoder_dir}
  t0 = _step("I1. synthetic instructions from the slides' ground truth (captions, A-D questions, "
             "open questions) and a ChatML-style template for the tiny report LLM")
  paths = prepare(root, pa, llm_dir, train_mcq=train_mcq, heldout_mcq=heldout_mcq)
  rows = inst.read_instructions(paths["instructions"])
  counts = {t: sum(r["task"] == t for r in rows) for t in ("caption", "mcq", "open")}
  print(f"   {len(rows)} conversations ({counts}) in {paths['instructions']}")
  _done(t0)

  t0 = _step(f"I2. chat-tune the tiny LLM on text for {chat_steps} steps: the training slides' "
             "questions about their reports (pathjax train --config=configs/causal_lm.py:smoke "
             "--config.data.field=messages ...)")
  reports = _reports(pa)
  chat_llm = chat_tune(root, rows, reports, paths["llm"], steps=chat_steps)
  m = read_metrics(os.path.join(root, "chat_lm"))
  results["chat_loss"] = (m[0]["loss"], m[-1]["loss"])
  print(f"   loss on the answers {m[0]['loss']:.3f} -> {m[-1]['loss']:.3f}")
  _done(t0)

  common = [f"model.encoder_dir={encoder_dir}", f"model.llm_dir={chat_llm}",
            f"data.embeddings={os.path.join(pa, 'embeddings')}",
            f"data.instructions={paths['instructions']}", f"data.heldout_pattern=^{HELDOUT_PREFIX}",
            "model.text_len=128", "batch_size=16"]
  stage1 = os.path.join(root, "stage1")
  t0 = _step(f"I3. stage 1: projector only (encoder and LLM frozen), captions, {stage1_steps} "
             f"steps (pathjax train --config=configs/pathflip.py:instruct_stage1,smoke)")
  config = _config("pathflip.py:instruct_stage1,smoke", common + [
      f"total_steps={stage1_steps}", f"log_every={max(stage1_steps // 3, 1)}",
      f"checkpoint_every={stage1_steps}", "export_model=true"])
  train_lib.train(config, stage1)
  m = read_metrics(stage1)
  results["stage1_loss"] = (m[0]["loss"], m[-1]["loss"])
  print(f"   caption loss {m[0]['loss']:.3f} -> {m[-1]['loss']:.3f}")
  _done(t0)

  stage2 = os.path.join(root, "stage2")
  t0 = _step(f"I4. stage 2: projector + LoRA (r 16, alpha 32 on q,k,v,o,gate,up,down), captions "
             f"+ VQA, {stage2_steps} steps; held-out multiple-choice VQA and one chat answer")
  config = _config("pathflip.py:instruct_stage2,smoke", common + [
      f"model.init_dir={os.path.join(stage1, 'model')}", f"total_steps={stage2_steps}",
      f"log_every={max(stage2_steps // 4, 1)}", f"checkpoint_every={stage2_steps}",
      "optimizer.lr=3e-3", "optimizer.end_lr=1e-4", "optimizer.warmup_steps=20",
      f"batch_size={batch_size}", "export_model=true"])
  recipe = make_recipe(config)
  held = recipe.records("heldout", tasks=("mcq",))
  vqa_file = os.path.join(stage2, "vqa.json")

  def dominant(split):
    from pathjax.wsi import synth
    truth = synth.read_truth(os.path.join(pa, "slides", split, synth.TRUTH_NAME))
    have = set(recipe.embeddings.slide_ids)
    return {s: max(t.fractions, key=t.fractions.get) for s, t in truth.items() if s in have}

  def evaluate(params, step):
    model = SlideChatModel(recipe, params, batch_size=32)
    res = run_vqa(held, model, report=lambda s: print("   " + s, flush=True))
    q = [{"role": "user", "content": f"{inst.IMAGE}\nWhich tissue types are present?"}]
    sid = held[0]["slide"]
    chat = {"slide": sid, "question": q[0]["content"].split("\n", 1)[1],
            "answer": model.answer([sid], [q], max_new_tokens=32)[0],
            "mcq": held[0]["messages"][0]["content"], "mcq_answer": res.predictions[0]["generated"],
            "mcq_gold": held[0]["answer"]}
    prior = answer_prior_accuracy(recipe.records("train", tasks=("mcq",)), held)
    print(f"   a slide-blind answer prior (each question's option most often right in training): "
          f"accuracy {prior['accuracy']:.3f}; " + ", ".join(
              f"{k[len('accuracy_'):]} {v:.2f}" for k, v in sorted(prior.items()) if k != "accuracy"),
          flush=True)
    # Why (not): is the dominant tissue recoverable from the visual tokens at all?
    probe = probe_visual_tokens(model, dominant("train"), dominant("heldout"))
    print(f"   linear probe for the dominant tissue on the visual tokens ({int(probe['n_train'])} "
          f"training -> {int(probe['n_test'])} held-out slides): accuracy {probe['accuracy']:.2f}, "
          f"chance {probe['chance']:.2f}, training-majority class {probe['majority']:.2f}", flush=True)
    with open(vqa_file, "w", encoding="utf-8") as f:
      json.dump({"metrics": res.metrics, "prior": prior, "chat": chat, "probe": probe}, f,
                indent=2)
    return {k: v for k, v in res.metrics.items() if isinstance(v, float)}

  train_lib.train(config, stage2, recipe=recipe,
                  evaluators=[train_lib.Evaluator("slide_vqa", every=stage2_steps, fn=evaluate)])
  m = read_metrics(stage2)
  results["stage2_loss"] = (m[0]["loss"], m[-1]["loss"])
  if os.path.exists(vqa_file):
    with open(vqa_file, encoding="utf-8") as f:
      saved = json.load(f)
    for key, name in (("vqa", "metrics"), ("prior", "prior"), ("chat", "chat"), ("probe", "probe")):
      results[key] = saved[name]
  _done(t0)
  return results


def print_summary(results: dict) -> None:
  v = results.get("vqa")
  print("Slide chat (frozen encoder -> projector -> tiny LLM + LoRA) on held-out synthetic slides:")
  if v:
    acc, chance = v["accuracy"], v["chance"]
    kinds = ", ".join(f"{k[len('accuracy_'):]} {x:.2f}" for k, x in sorted(v.items())
                      if k.startswith("accuracy_"))
    print(f"  multiple-choice VQA accuracy {acc:.3f} over {int(v['n'])} questions; chance "
          f"{chance:.2f} ({acc / chance:.1f}x chance; {kinds}); the most frequent answer is "
          f"given to {v.get('top_answer_share', float('nan')):.2f} of them (1.00: a constant answer)")
  p = results.get("prior")
  if p:
    print(f"  a slide-blind answer prior (each question's option most often right in training): "
          f"accuracy {p['accuracy']:.3f} (" + ", ".join(
              f"{k[len('accuracy_'):]} {x:.2f}" for k, x in sorted(p.items()) if k != "accuracy") + ")")
  p = results.get("probe")
  if p:
    print(f"  dominant tissue from the visual tokens by a linear probe: {p['accuracy']:.2f} on "
          f"{int(p['n_test'])} held-out slides (chance {p['chance']:.2f}, training-majority class "
          f"{p['majority']:.2f}): what the "
          "encoder passes to the LLM bounds the dominant-tissue questions")
  c = results.get("chat")
  if c:
    print(f"  chat, slide {c['slide']}: Q: {c['question']}\n    A: {c['answer']}")
