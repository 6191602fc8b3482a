r"""Slide instruction following (pathjax/recipes/slide_instruct.py, specs/pathflip.md): a
frozen slide encoder's visual tokens -> projector -> a frozen LLM (+ LoRA in stage 2).

Variants (the lead folds these into configs/pathflip.py):
  instruct_stage1   projector only (LLM frozen), captions, AdamW lr 1e-3.
  instruct_stage2   projector + LoRA (r 16, alpha 32 on q,k,v,o,gate,up,down), captions + VQA
                    (multiple choice and open questions), lr 1e-4, wd 0.05.
  Append ",smoke" for a CPU size (batch 8, 40 steps, at most 256 patches per slide).

  pathjax synth-slides --out synth/ --n 64 --instructions   # + instructions.jsonl
  pathjax embed-slides --model VIT --slides 'synth/*.svs' --out emb/
  pathjax train --config=configs/pathflip_instruct.py:instruct_stage1 --workdir runs/i1 \
      --config.model.encoder_dir=runs/align/model --config.model.llm_dir=QWEN3_CONVERTED \
      --config.data.embeddings=emb/ --config.data.instructions=synth/instructions.jsonl
  pathjax train --config=configs/pathflip_instruct.py:instruct_stage2 --workdir runs/i2 \
      --config.model.encoder_dir=runs/align/model --config.model.llm_dir=QWEN3_CONVERTED \
      --config.model.init_dir=runs/i1/model \
      --config.data.embeddings=emb/ --config.data.instructions=synth/instructions.jsonl
  pathjax chat --model runs/i2/model --slide synth-003 --question "Which tissue dominates?"

model.encoder_dir is any exported model directory whose recipe has a `visual_tokens`
predict function (PathFLIP align; PathAlign stage 1 or 2); model.llm_dir's tokenizer needs
a chat template. Evaluation entries: kind "slide_vqa" (multiple-choice accuracy vs chance)
and "slide_caption" (BLEU / ROUGE-L vs the most frequent training report), data "heldout".
"""

import ml_collections

from pathjax.config_lib import pick_variant
from pathjax.train_config import default_train_config

VARIANTS = ("instruct_stage1", "instruct_stage2")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def get_config(arg=None):
  parts = (arg or "instruct_stage1").split(",")
  variant = pick_variant(parts[0], {v: v for v in VARIANTS}, default="instruct_stage1")
  smoke = "smoke" in parts[1:]
  stage = 2 if variant == "instruct_stage2" else 1

  config = default_train_config()
  config.recipe = "slide_instruct"
  config.export_model = True
  config.model = ml_collections.ConfigDict(dict(
      stage=stage,
      encoder_dir="",          # exported model dir with a visual_tokens predict fn (frozen)
      llm_dir="",              # `pathjax convert --llm` dir (frozen; its tokenizer needs a chat template)
      init_dir="",             # stage 2: the stage-1 export (its projector)
      projector="mlp2",        # linear | mlp2 (LLaVA-1.5's 2-layer GELU MLP)
      text_len=256,            # chat tokens per conversation (the image slot counts one)
      lora=ml_collections.ConfigDict(dict(rank=16 if stage == 2 else 0, alpha=32.0,
                                          targets=LORA_TARGETS, dropout=0.05)),
      llm_overrides=ml_collections.ConfigDict(dict(remat="none", attention="auto")),
  ))
  config.data = ml_collections.ConfigDict(dict(
      embeddings="",           # `pathjax embed-slides` output directory
      instructions="",         # JSON lines (pathjax.input.instructions)
      tasks=("caption",) if stage == 1 else ("caption", "mcq", "open", "chat"),
      max_patches=10_240,      # per slide and step (uniform sample without replacement)
      feature_dim=512,         # without data.embeddings (AOT compiles): CONCH's width
      feature_dtype="float16",
      heldout_pattern="",      # regex over slide ids: held out when it matches
      holdout_fraction=0.1,    # else a stable hash of the id
      split_seed=0,
  ))
  opt = config.optimizer
  opt.wd_exclude = (r".*bias", r".*scale", r".*norm.*", r".*embedding")
  config.batch_size = 32
  config.total_steps = 5000 if stage == 1 else 10_000
  config.log_every = 50
  config.checkpoint_every = 1000
  config.precision.compute_dtype = "bfloat16"
  if stage == 1:
    opt.lr, opt.end_lr, opt.warmup_steps, opt.weight_decay = 1e-3, 1e-5, 100, 0.0
  else:
    opt.lr, opt.end_lr, opt.warmup_steps, opt.weight_decay = 1e-4, 1e-6, 200, 0.05
  if smoke:
    config.batch_size = 8
    config.total_steps = 40
    config.log_every = 10
    config.checkpoint_every = 20
    config.precision.compute_dtype = "float32"
    config.model.text_len = 128
    config.model.lora.dropout = 0.0
    config.data.max_patches = 256
    config.data.feature_dtype = "float32"
  return config
