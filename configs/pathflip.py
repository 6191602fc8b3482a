r"""PathFLIP (specs/pathflip.md): slide + region embeddings from one shared Q-Former, aligned
with captions (L_slide) and subcaptions through text-conditioned region embeddings (L_region).

Variants (the argument after the colon; ablations follow with commas):
  smoke      tiny Q-Former (hidden 64, 2 layers, 4 heads, 4 queries), 4 windows of 16
             patches, K = 4 subcaptions: CPU minutes.
  align      the paper: CONCH 512-d patch features -> Linear(512 -> 256), 12-layer
             BERT-base Q-Former (cross-attention every 2 layers, 8 queries), 24 windows of
             256 patches, K = 8 subcaptions, captions 512 / subcaptions 256 tokens, AdamW lr
             1e-4 wd 0.05, warmup 200 steps from 1e-6, cosine to 5e-6, bf16.
  instruct_stage1   slide chat (pathjax/recipes/slide_instruct.py): a frozen slide encoder's
             visual tokens -> projector -> a frozen LLM; projector only, captions, lr 1e-3.
  instruct_stage2   + LoRA (r 16, alpha 32 on q,k,v,o,gate,up,down), captions + VQA,
             lr 1e-4, wd 0.05. Append ",smoke" to either for a CPU size, ",shapes" to
             compile without model directories (`pathjax compile`: the align encoder's
             config and Qwen3-1.7B's layout, no weights).
  Ablations: grid (2D blocks of the patch grid instead of windows), k4 / k16 (subcaptions),
             l12 / l48 (regions), s64 / s1024 (patches per region), slide_only (w_region 0),
             region_only (w_slide 0), later_init (s = 10, beta = -10 as the later code),
             no_pos (no 2D sin-cos positions).

  pathjax embed-slides --model CONCH_DIR --slides 'slides/*.svs' --magnification 20 --out emb/
  pathjax convert --bert BERT_BASE_DIR --encoder-width 512 --out qformer_init/
  pathjax train --config=configs/pathflip.py:align --workdir runs/pathflip \
      --config.data.embeddings=emb/ --config.data.reports=reports.jsonl \
      --config.model.init_dir=qformer_init/ --config.input.tokenizer=qformer_init/tokenizer \
      --config.export_model=True
  pathjax localize --model runs/pathflip/model --slide SLIDE --text "tumor" \
      --embeddings emb/ --slides slides/ --out heatmaps/SLIDE_tumor
  pathjax train --config=configs/pathflip.py:instruct_stage1 --workdir runs/i1 \
      --config.model.encoder_dir=runs/pathflip/model --config.model.llm_dir=QWEN3_CONVERTED \
      --config.data.embeddings=emb/ --config.data.instructions=synth/instructions.jsonl
  pathjax train --config=configs/pathflip.py:instruct_stage2 --workdir runs/i2 \
      --config.model.init_dir=runs/i1/model ... (as stage 1)
  pathjax chat --model runs/i2/model --slide SLIDE --question "Which tissue dominates?"

model.encoder_dir of the instruct variants is any exported model directory whose recipe has a
`visual_tokens` predict function (PathFLIP align; PathAlign); model.llm_dir's tokenizer needs a
chat template. Their evaluation kinds: "slide_vqa" and "slide_caption", data "heldout".
"""

import math
import os

import ml_collections

from pathjax.config_lib import pick_variant
from pathjax.models.llm import LAYOUTS
from pathjax.train_config import default_train_config

PAPER_SCALE_INIT = math.log(1 / 0.07)
SIZES = ("smoke", "align")
INSTRUCT = ("instruct_stage1", "instruct_stage2")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
ABLATIONS = ("grid", "k4", "k16", "l12", "l48", "s64", "s1024", "slide_only", "region_only",
             "later_init", "no_pos")


def _qformer(size: str) -> ml_collections.ConfigDict:
  if size == "smoke":
    q = dict(width=64, depth=2, num_heads=4, mlp_dim=128, num_queries=4, encoder_width=32,
             vision_width=32, embed_dim=32, max_position=64, cross_attention_frequency=1,
             vocab_size=0)
  else:  # BERT-base, 8 queries, over CONCH (512-d) features projected to 256
    q = dict(width=768, depth=12, num_heads=12, mlp_dim=3072, num_queries=8, encoder_width=512,
             vision_width=256, embed_dim=256, max_position=512, cross_attention_frequency=2,
             dropout_rate=0.1, attention_dropout_rate=0.1, vocab_size=30523)
  return ml_collections.ConfigDict(dict(q, pos_encoding=True))


def _heads(size: str) -> ml_collections.ConfigDict:
  # The region loss's s (a raw multiplier, paper-era init log(1 / 0.07)) and beta.
  init = dict(scale_init=PAPER_SCALE_INIT, bias_init=0.0)
  if size == "smoke":
    return ml_collections.ConfigDict(dict(width=32, depth=2, num_heads=4, mlp_dim=64,
                                          region_heads=4, dropout_rate=0.0, **init))
  # d 256, 8 heads, FFN 1024, dropout 0.1; region head 8 heads.
  return ml_collections.ConfigDict(dict(width=256, depth=2, num_heads=8, mlp_dim=1024,
                                        region_heads=8, dropout_rate=0.1, **init))


def _instruct_config(stage: int, smoke: bool, shapes: bool = False) -> ml_collections.ConfigDict:
  config = default_train_config()
  config.recipe = "slide_instruct"
  config.export_model = True
  config.model = ml_collections.ConfigDict(dict(
      stage=stage,
      encoder_dir="",          # exported model dir with a visual_tokens predict fn (frozen)
      encoder_config="",       # shapes only (`shapes` variant, pathjax compile): a config spec
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
  if shapes:  # pathjax compile without model directories: the encoder's config, the LLM's layout
    # (The align encoder either way: smoke's Q-Former takes its vocabulary from a tokenizer.)
    config.model.encoder_config = f"{os.path.abspath(__file__)}:align"
    config.model.llm_overrides = ml_collections.ConfigDict(
        dict(LAYOUTS["tiny" if smoke else "qwen3_1.7b"], attention="auto"))
    config.data.feature_dim = 512
  return config


def get_config(arg=None):
  parts = (arg or "smoke").split(",")
  if parts[0] in INSTRUCT:
    return _instruct_config(INSTRUCT.index(parts[0]) + 1, "smoke" in parts[1:], "shapes" in parts[1:])
  size = pick_variant(parts[0], {s: s for s in SIZES + INSTRUCT}, default="smoke")
  ablations = [pick_variant(p, {a: a for a in ABLATIONS}, default="") for p in parts[1:]]

  config = default_train_config()
  config.recipe = "pathflip"
  smoke = size == "smoke"
  config.model = ml_collections.ConfigDict(dict(
      qformer=_qformer(size),
      heads=_heads(size),
      regions="window",        # "window": S consecutive patches (paper); "grid": 2D blocks
      region_size=16 if smoke else 256,    # S (grid: a square, the block side is its root)
      num_regions=4 if smoke else 24,      # L per slide and step
      num_subcaptions=4 if smoke else 8,   # K
      init_dir="",             # a model directory with a qformer tower (convert --bert, PathAlign)
  ))
  config.data = ml_collections.ConfigDict(dict(
      embeddings="",           # `pathjax embed-slides` output directory
      reports="",              # report JSON lines (pathjax.input.reports)
      subcaptions="",          # optional JSON lines {"slide", "subcaptions": [...]} (overrides sampling)
      truth="",                # localization: truth.npz of synthetic slides (comma-separated files)
      max_patches=64 if smoke else 24 * 256,  # M >= num_regions * region_size
      feature_dtype="float32" if smoke else "float16",
      p_consecutive=0.5,
      holdout_fraction=0.25 if smoke else 0.1,
      split_seed=0,
      heldout_pattern="",
      whole_report_fallback=False,
  ))
  config.input = ml_collections.ConfigDict(dict(
      tokenizer="",            # BERT-style tokenizer dir ([CLS] [SEP] [PAD] [DEC])
      text_len=48 if smoke else 512,        # captions
      subcaption_len=32 if smoke else 256,  # subcaptions
  ))
  config.loss = ml_collections.ConfigDict(dict(
      w_slide=1.0, w_region=1.0, temperature=0.1, label_smoothing=0.1))

  opt = config.optimizer
  opt.wd_exclude = (r".*bias", r".*scale", r".*norm.*", r".*embedding", r".*query_tokens",
                    r".*position_embeddings", r".*temp")
  if smoke:
    config.batch_size = 8
    config.total_steps = 100
    config.log_every = 20
    config.checkpoint_every = 100
    opt.lr, opt.end_lr, opt.warmup_steps, opt.weight_decay = 1e-3, 1e-4, 10, 0.05
  else:
    config.batch_size = 64
    config.total_steps = 20_000
    config.log_every = 50
    config.checkpoint_every = 1000
    config.precision.compute_dtype = "bfloat16"
    # warmup from 1e-6 over 200 steps, cosine to 5e-6.
    opt.lr, opt.end_lr, opt.weight_decay, opt.warmup_steps = 1e-4, 5e-6, 0.05, 200
    opt.warmup_from = 1e-6

  for ablation in ablations:
    m = config.model
    if ablation == "grid":
      m.regions = "grid"
      if m.region_size not in (16, 64, 256, 1024):
        m.region_size = 16
    elif ablation in ("k4", "k16"):
      m.num_subcaptions = int(ablation[1:])
    elif ablation in ("l12", "l48"):
      m.num_regions = int(ablation[1:])
    elif ablation in ("s64", "s1024"):
      m.region_size = int(ablation[1:])
    elif ablation == "slide_only":
      config.loss.w_region = 0.0
    elif ablation == "region_only":
      config.loss.w_slide = 0.0
    elif ablation == "later_init":
      m.heads.scale_init, m.heads.bias_init = 10.0, -10.0
    elif ablation == "no_pos":
      m.qformer.pos_encoding = False
    config.data.max_patches = max(int(config.data.max_patches), m.num_regions * m.region_size)
  return config
