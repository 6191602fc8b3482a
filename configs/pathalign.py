r"""PathAlign (specs/pathalign.md): a BLIP-2 Q-Former over slide patch embeddings, then a
frozen LLM writing reports.

Variants (the argument after the colon; ablations follow with commas):
  smoke      tiny Q-Former (hidden 64, 2 layers, 4 heads, 8 queries, text 48): CPU minutes.
  retrieval  the paper's retrieval model: 1 query, ITC only.
  stage1     the generation model's Q-Former pretraining: 32 queries, ITC + ITM + ITG.
  stage2     stage 1's Q-Former + a frozen 7B-class Llama-layout LLM; loss on report tokens.
  Ablations: no_itm, no_itg, no_pos (no 2D sin-cos positions), one_query, no_smoothing,
             patches_2048 (at most 2,048 patches per slide), stage2 (after smoke: a tiny stage 2).

  pathjax embed-slides --model VIT_S --slides 'slides/*.svs' --magnification 20 --out emb/
  pathjax convert --bert BERT_BASE_DIR --encoder-width 384 --out qformer_init/
  pathjax train --config=configs/pathalign.py:stage1 --workdir runs/s1 \
      --config.data.embeddings=emb/ --config.data.reports=reports.jsonl \
      --config.model.init_dir=qformer_init/ --config.input.tokenizer=qformer_init/tokenizer \
      --config.export_model=True
  pathjax train --config=configs/pathalign.py:stage2 --workdir runs/s2 \
      --config.data.embeddings=emb/ --config.data.reports=reports.jsonl \
      --config.model.init_dir=runs/s1/model --config.input.tokenizer=runs/s1/model/tokenizer \
      --config.model.llm_dir=LLAMA_7B_CONVERTED

The slide split (train / held-out) is a stable hash of the slide id (data.holdout_fraction,
data.split_seed); the evaluation tasks in pathjax/evaluate/slides.py read the held-out part.
"""

import ml_collections

from pathjax.config_lib import pick_variant
from pathjax.models.llm import LAYOUTS
from pathjax.train_config import default_train_config

SIZES = ("smoke", "retrieval", "stage1", "stage2")
ABLATIONS = ("no_itm", "no_itg", "no_pos", "one_query", "no_smoothing", "patches_2048", "stage2")

# A 7B-class Llama layout (Llama-2-7B's fields) for synthetic batches and AOT compiles; a
# real run takes every field from model.llm_dir.
LLAMA_7B, TINY_LLM = LAYOUTS["llama2_7b"], LAYOUTS["tiny"]


def _qformer(size: str) -> ml_collections.ConfigDict:
  if size == "smoke":
    q = dict(width=64, depth=2, num_heads=4, mlp_dim=128, num_queries=8, encoder_width=32,
             embed_dim=32, max_position=64, cross_attention_frequency=1)
  else:  # BERT-base over ViT-S (384-d) patch features
    q = dict(width=768, depth=12, num_heads=12, mlp_dim=3072, num_queries=32, encoder_width=384,
             embed_dim=256, max_position=512, cross_attention_frequency=2,
             dropout_rate=0.1, attention_dropout_rate=0.1)
  if size == "retrieval":
    q["num_queries"] = 1
  # vocab 0: the tokenizer's size (smoke); bert-base-uncased + [DEC] otherwise (a real run
  # takes every Q-Former field from model.init_dir).
  return ml_collections.ConfigDict(dict(q, vocab_size=0 if size == "smoke" else 30523,
                                        pos_encoding=True))


def get_config(arg=None):
  parts = (arg or "smoke").split(",")
  size = pick_variant(parts[0], {s: s for s in SIZES}, default="smoke")
  ablations = [pick_variant(p, {a: a for a in ABLATIONS}, default="") for p in parts[1:]]

  config = default_train_config()
  config.recipe = "pathalign"
  config.model = ml_collections.ConfigDict(dict(
      stage=2 if size == "stage2" else 1,
      qformer=_qformer(size),
      init_dir="",             # a model directory with a qformer tower (convert --bert, or stage 1)
      llm_dir="",              # stage 2: a `pathjax convert --llm` directory (frozen)
      llm_overrides=ml_collections.ConfigDict(LLAMA_7B if size == "stage2" else {}),
      llm_text_len=64,         # stage 2: prompt + report tokens
      prompt="Write the pathology report for this slide:",
  ))
  config.data = ml_collections.ConfigDict(dict(
      embeddings="",           # `pathjax embed-slides` output directory
      reports="",              # report JSON lines (pathjax.input.reports)
      max_patches=10_240,      # per slide and step (uniform sample without replacement)
      feature_dtype="float16",
      holdout_fraction=0.2,    # slides held out for evaluation (stable hash of the id)
      split_seed=0,
      heldout_pattern="",      # regex over slide ids: held out when it matches (replaces the hash)
      whole_report_fallback=False,  # pair a slide whose part is not found with the whole report
  ))
  config.input = ml_collections.ConfigDict(dict(
      tokenizer="",            # BERT-style tokenizer dir ([CLS] [SEP] [PAD] [DEC])
      text_len=32,             # BLIP-2's max text length
  ))
  config.loss = ml_collections.ConfigDict(dict(
      w_itc=1.0, w_itm=0.0 if size == "retrieval" else 1.0,
      w_itg=0.0 if size == "retrieval" else 1.0, label_smoothing=0.1,
      itm_negatives="random" if size == "smoke" else "hard"))  # hard: BLIP-2's ITC-weighted draw

  opt = config.optimizer
  opt.wd_exclude = (r".*bias", r".*scale", r".*norm.*", r".*embedding", r".*query_tokens",
                    r".*position_embeddings", r".*temp")
  if size == "smoke":
    config.batch_size = 16
    config.total_steps = 200
    config.log_every = 20
    config.checkpoint_every = 100
    config.input.text_len = 48
    config.data.max_patches = 256
    config.data.feature_dtype = "float32"
    config.data.holdout_fraction = 0.25
    opt.lr, opt.end_lr, opt.warmup_steps, opt.weight_decay = 1e-3, 1e-4, 20, 0.05
  else:
    # Stage 1: AdamW wd 0.05, lr 1e-4 cosine to 1e-5, warmup 5000 (BLIP-2); stage 2: warmup 2000.
    config.batch_size = 64
    config.total_steps = 100_000
    config.log_every = 50
    config.checkpoint_every = 2000
    config.precision.compute_dtype = "bfloat16"
    opt.lr, opt.end_lr, opt.weight_decay = 1e-4, 1e-5, 0.05
    opt.warmup_steps = 2000 if size == "stage2" else 5000
  if size == "stage2":
    # The frozen 7B LLM (13.5 GB in bf16) does not fit replicated on a 16 GiB chip: shard
    # every weight over all chips (FSDP), the slides over the same axis.
    config.mesh.shape = (1, 1, -1, 1)

  for ablation in ablations:
    if ablation == "no_itm":
      config.loss.w_itm = 0.0
    elif ablation == "no_itg":
      config.loss.w_itg = 0.0
    elif ablation == "no_pos":
      config.model.qformer.pos_encoding = False
    elif ablation == "one_query":
      config.model.qformer.num_queries = 1
    elif ablation == "no_smoothing":
      config.loss.label_smoothing = 0.0
    elif ablation == "patches_2048":
      config.data.max_patches = 2048
    elif ablation == "stage2":
      config.model.stage = 2
      if size == "smoke":
        config.model.llm_overrides = ml_collections.ConfigDict(TINY_LLM)
        config.model.llm_text_len = 48
  return config
