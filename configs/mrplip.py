r"""MR-PLIP pretraining (specs/mrplip.md): CVTA + MRTVA over multi-resolution bags.

Variants (the argument after the colon; ablations combine with a comma):
  smoke    tiny towers at 64 px; trains on a 2-core CPU in minutes (the demo's variant).
  vitb16   ViT-B/16 + CLIP-base text: the size the CPU benchmark measures.
  vitl16   the paper's scale: UNI ViT-L/16 + QuiltNet-size text tower, 224 px, bf16.
  Ablations: no_cvta, no_mrtva, no_bl, single_mag (one magnification, 20x where present).
  Sharding plans (after the size): v5e_256, v4_128 -- mesh, axis rules, remat and batch
  chosen from AOT compiles; compiled memory and FLOPs in the block at the end of this file.

  pathjax train --config=configs/mrplip.py:smoke --workdir /tmp/mrplip \
      --config.input.records_dir=RECORDS --config.input.tokenizer=TOKENIZER_DIR
  pathjax train --config=configs/mrplip.py:vitl16,no_mrtva --workdir gs://bucket/run \
      --config.model.init_dir=CONVERTED_UNI_AND_QUILTNET

Loading published weights: `pathjax convert` UNI (timm) and QuiltNet's text tower into a
model directory and pass it as `model.init_dir`; its vision and text towers replace the
random ones (`model.init_towers`).
"""

import ml_collections

from pathjax.config_lib import pick_variant
from pathjax.input.input_config import default_input_config
from pathjax.train_config import default_train_config

SIZES = ("smoke", "vitb16", "vitl16")
ABLATIONS = ("no_cvta", "no_mrtva", "no_bl", "single_mag")


def _model(size: str) -> ml_collections.ConfigDict:
  if size == "smoke":
    vision = dict(variant="Ti/16", overrides=dict(width=128, depth=2, num_heads=4, mlp_dim=256))
    # vocab_size 0: as many tokens as the tokenizer has (the demo trains its own).
    text = dict(variant="tiny", overrides=dict(vocab_size=0, width=128, depth=2, num_heads=4,
                                               mlp_dim=256))
    fusion = dict(width=128, depth=2, num_heads=4, mlp_dim=256)
    embed_dim, projector, predictor = 128, (256, 256, 256), (64, 256)
  else:
    vision = dict(variant="B/16" if size == "vitb16" else "L/16", overrides=dict(
        layer_scale_init=1e-5 if size == "vitl16" else None))
    # QuiltNet / OpenAI CLIP text tower: width 512, 12 layers, 8 heads, 49408 tokens. The
    # activation is the module default (quick_gelu) or, with model.init_dir, the converted
    # tower's (model.json): a tower converted with gelu trains with gelu.
    text = dict(variant="base", overrides=dict(vocab_size=49408))
    fusion = dict(width=768, depth=6 if size == "vitl16" else 2, num_heads=12, mlp_dim=3072)
    embed_dim, projector, predictor = 512, (2048, 2048, 2048), (512, 2048)
  return ml_collections.ConfigDict(dict(
      vision=vision, text=text, fusion=fusion, embed_dim=embed_dim,
      projector_dims=projector, predictor_dims=predictor,
      head_norm="batch",         # SimSiam heads: batch (BatchNorm, batch statistics) | layer
      scan=True,                 # scan over layers (fast compiles at depth 24)
      remat="none",              # none | full | dots | dots_no_batch
      attention="auto",          # auto | einsum | xla | cudnn | splash (auto: for the platform
                                 # traced for; `pathjax compile` traces for the TPU)
      init_dir="",               # a model directory (pathjax convert) to start the towers from;
                                 # its towers' architecture fields (model.json) replace the
                                 # variant's, a disagreeing override is a ConfigError
      init_towers=("vision", "text"),
  ))


def _loss() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      w_bl=1.0,                  # baseline: image-caption contrastive (+ ITM)
      w_itm=1.0,                 # ITM inside the baseline (0 disables)
      w_cvta=1.0,
      w_mrtva=1.0,
      contrastive="softmax",     # softmax (gathered) | sigmoid (chunked ring over devices)
      temperature_init=0.07,
      cvta_k=3,                  # k_o: positives per patch
      keyword_context=16,        # tokens per keyword (bos + a few tokens + eos); 0 = context_length
      cvta_text_unit="keyword",  # keyword | caption
      cvta_negatives="bag",      # bag (paper) | global (also every other bag's keywords)
      fusion_keywords=3,         # keywords fused with each patch for MRTVA (top-k_o)
      itm_negatives="hard",      # ITM negatives: hard (sampled by ITC similarity) | random
      itm_false_negative_cos=0.9,  # ITM: captions this close to the positive are not negatives
      mrtva_pairs="adjacent",    # adjacent (5-10, 10-20, 20-40) | all (every ancestor)
  ))


def get_config(arg=None):
  parts = (arg or "smoke").split(",")
  size = pick_variant(parts[0], {s: s for s in SIZES}, default="smoke")
  plans = [p for p in parts[1:] if p in PLANS]  # sharding plans (block at the end of this file)
  ablations = [pick_variant(p, {a: a for a in ABLATIONS}, default="") for p in parts[1:]
               if p not in PLANS]

  config = default_train_config()
  config.recipe = "mrplip"
  config.model = _model(size)
  config.loss = _loss()
  config.input = default_input_config()
  # The whole bag's distinct keywords (bags with more are subsampled at random; the paper's
  # 85-patch bags of Quilt-LLaVA captions): at keyword_context=16 tokens, 64 keywords cost
  # about what 12 keywords at 77 tokens did.
  config.input.max_keywords = 64
  config.input.class_names = ()
  config.input.sampling = "chain"

  opt = config.optimizer
  opt.wd_exclude = (r".*bias", r".*scale", r".*norm.*", r".*(pos_embed|cls_token|reg_token)",
                    r".*embedding", r".*log_scale", r".*sigmoid_bias", r".*gamma")
  if size == "smoke":
    config.batch_size = 32
    config.total_steps = 300
    config.log_every = 25
    config.checkpoint_every = 100
    config.input.image_size = 64
    config.input.context_length = 32
    # The demo's bags hold 12-41 distinct keywords (median 24) of at most 9 tokens.
    config.input.max_keywords = 48
    config.loss.keyword_context = 12
    # Template captions: six classes x two power bands of paraphrases, so most ITC-hard
    # negatives are paraphrases of the positive; uniform negatives keep ITM learnable.
    config.loss.itm_negatives = "random"
    config.input.augment.enabled = True
    opt.lr, opt.end_lr, opt.warmup_steps, opt.weight_decay = 2e-3, 1e-5, 30, 0.02
  else:
    # Paper: batch 64 on 6 A100s, 50 epochs, AdamW. mPLUG's split: 1e-5 for the vision tower.
    config.batch_size = 64
    config.total_steps = 200_000
    config.log_every = 50
    config.checkpoint_every = 2000
    config.input.image_size = 224
    config.input.context_length = 77
    config.input.worker_count = 8
    config.precision.compute_dtype = "bfloat16"
    config.model.remat = "dots_no_batch" if size == "vitl16" else "none"
    opt.lr, opt.end_lr, opt.warmup_steps, opt.weight_decay = 1e-4, 1e-6, 2000, 0.02
    opt.lr_multipliers = ((r"vision_tower/.*", 0.1),)

  for ablation in ablations:
    if ablation == "no_cvta":
      config.loss.w_cvta = 0.0
    elif ablation == "no_mrtva":
      config.loss.w_mrtva = 0.0
    elif ablation == "no_bl":
      config.loss.w_bl = 0.0
    elif ablation == "single_mag":
      # One magnification: the 20x level of a 5/10/20/40 bag (level 2), no parent/child pairs.
      config.input.levels = (2,)
      config.loss.w_mrtva = 0.0
  for plan in plans:
    apply_plan(config, plan)
  return config


# ----------------------------------------------------------------------------------------
# Sharding plans (issue 6; pathjax/aot.py). Chosen from AOT compiles of the real train step
# (`pathjax compile`); a plan sets the mesh, the logical axis rules, the remat policy and
# the global batch for one TPU slice shape, and records what the compiler reported.
# Use it after the size: `configs/mrplip.py:vitl16,v5e_256` (composes with ablations).
#
#   pathjax compile --config=configs/mrplip.py:vitl16,v5e_256 --topology v5e:16x16
#   pathjax compile --config=configs/mrplip.py:vitl16,v4_128 --topology v4:4x4x4
#
# Compiled (libtpu 0.0.42.1, jax 0.10.2, flax 0.12.8; `pathjax compile`, per chip), before
# on-device augmentation, the splash attention kernel and the whole-bag keyword context: not
# re-measured at this commit (the compile did not finish on the shared build machine).
#
# | plan    | topology            | global / per-chip bags | memory per chip          | model TFLOP/step/chip | at 50% MFU            |
# |---------|---------------------|------------------------|--------------------------|-----------------------|-----------------------|
# | v5e_256 | v5e:16x16, 256 chips | 4096 / 16             | 15.76 of 16 GiB (98%)    | 32.19                 | 327 ms, 49 bags/s/chip |
# | v4_128  | v4:4x4x4, 64 chips  | 2048 / 32              | 27.68 of 32 GiB (87%)    | 64.37                 | 468 ms, 68 bags/s/chip |
# | (max)   | v5e:16x16           | 5120 / 20              | 15.92 of 16 GiB: fits    | 40.23                 | 408 ms, 49 bags/s/chip |
# | (max)   | v4:4x4x4            | 2176 / 34              | 32.24 of 32 GiB: no      | 68.39                 | -                      |
# | (max)   | v4:4x4x4            | 2304 / 36              | 33.80 of 32 GiB: no      | 72.41                 | -                      |
#
# Largest per-chip batch found: v5e >= 20 (24 and up not compiled: ~30 min per compile on
# the 2-core build machine), v4 32 (34 and 36 do not fit; 33 not compiled). Run
# `pathjax compile --config=... --topology ... --max-batch` to search further.
# The plans keep 16 (v5e, the 4096-bag target) and 32 (v4) per chip.
#
# Memory: arguments 43 MiB (v5e) / 131 MiB (v4): FSDP leaves each chip 1/256 (1/64) of the
# 423M fp32 parameters and AdamW moments; the rest is activations (temporaries 15.5 / 27.4
# GiB; on v5e just under the 15.75 GiB the compiler allows them). Model FLOPs: 2.01 TFLOP per
# bag (4 ViT-L/16 images, 16 text sequences, fusion passes; forward + backward, matmuls and
# convolutions counted from the jaxpr, without remat recompute; dots_no_batch adds 1%).
# XLA's cost_analysis reports ~15x less because it counts a scanned layer once.
# Peak bf16: v5e 197, v4 275 TFLOP/s per chip.
# ----------------------------------------------------------------------------------------

# Every parameter and optimizer moment is split over all chips on its "embed" axis (FSDP,
# ZeRO-3 style) and the batch over the same chips (data parallel); no tensor parallelism.
_FSDP = dict(mesh_shape=(1, 1, -1, 1))

PLANS = {
    "v5e_256": dict(
        _FSDP, topology="v5e:16x16", chips=256, per_chip_batch=16, remat="dots_no_batch",
        compiled="15.76 GiB of 16 per chip (args 43.4 MiB, temps 15.51 GiB, code 208.5 MiB); "
                 "32.19 TFLOP/step/chip (8.24 PFLOP/step); 50% MFU: 327 ms/step, 49 bags/s/chip"),
    "v4_128": dict(
        _FSDP, topology="v4:4x4x4", chips=64, per_chip_batch=32, remat="dots_no_batch",
        compiled="27.68 GiB of 32 per chip (args 131.2 MiB, temps 27.39 GiB, code 169.6 MiB); "
                 "64.37 TFLOP/step/chip (4.12 PFLOP/step); 50% MFU: 468 ms/step, 68 bags/s/chip"),
}


def apply_plan(config, name: str) -> None:
  """Sets mesh, axis rules, remat and global batch from PLANS[name]; records the plan."""
  from pathjax.sharding import FSDP_TENSOR_RULES
  plan = PLANS[name]
  config.mesh.shape = tuple(plan["mesh_shape"])
  config.axis_rules = FSDP_TENSOR_RULES   # embed -> fsdp, act_batch -> (slice, data, fsdp)
  config.model.remat = plan["remat"]
  config.batch_size = int(plan["per_chip_batch"]) * int(plan["chips"])
  config.plan = ml_collections.ConfigDict(dict(
      name=name, topology=plan["topology"], chips=plan["chips"],
      per_chip_batch=plan["per_chip_batch"], compiled=plan["compiled"]))
