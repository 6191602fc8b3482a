r"""MR-PLIP pretraining (specs/mrplip.md): CVTA + MRTVA over multi-resolution bags.

Variants (the argument after the colon; ablations combine with a comma):
  smoke    tiny towers at 64 px; trains on a 2-core CPU in minutes (the demo's variant).
  vitb16   ViT-B/16 + CLIP-base text: the size the CPU benchmark measures.
  vitl16   the paper's scale: UNI ViT-L/16 + QuiltNet-size text tower, 224 px, bf16.
  Ablations: no_cvta, no_mrtva, no_bl, single_mag (one magnification, 20x where present).
  Sharding plans (after the size): v5e_256, v4_128 -- mesh, axis rules, remat and batch
  chosen from AOT compiles; what the compiler reported is in configs/compiled/.

  pathjax train --config=configs/mrplip.py:smoke --workdir /tmp/mrplip \
      --config.input.records_dir=RECORDS --config.input.tokenizer=TOKENIZER_DIR
  pathjax train --config=configs/mrplip.py:vitl16,no_mrtva --workdir gs://bucket/run \
      --config.model.init_dir=CONVERTED_UNI_AND_QUILTNET

Loading published weights: `pathjax convert` UNI (timm) and QuiltNet's text tower into a
model directory and pass it as `model.init_dir`; its vision and text towers replace the
random ones (`model.init_towers`).
"""

import json
import os

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
# the global batch for one TPU slice shape. What the compiler reported is not typed here:
# `pathjax compile --json` writes it to configs/compiled/mrplip_vitl16_<plan>.json (with the
# config, commit and jax/libtpu versions), `config.plan.compiled` reads it, and README's
# table is `aot.format_rows` of those files (tests/test_aot.py checks both).
# Use a plan after the size: `configs/mrplip.py:vitl16,v5e_256` (composes with ablations).
#
#   pathjax compile --config=configs/mrplip.py:vitl16,v5e_256 --topology v5e:16x16 \
#       --json configs/compiled/mrplip_vitl16_v5e_256.json
#   pathjax compile --config=configs/mrplip.py:vitl16,v4_128 --topology v4:4x4x4 \
#       --json configs/compiled/mrplip_vitl16_v4_128.json
#
# Memory: FSDP leaves each chip 1/256 (1/64) of the 423M fp32 parameters and AdamW moments
# (arguments ~44 MiB on v5e); the rest is activations. Model FLOPs are counted from the jaxpr
# (matmuls and convolutions, forward + backward, without remat recompute); XLA's
# cost_analysis reports ~15x less because it counts a scanned layer once.
# Peak bf16: v5e 197, v4 275 TFLOP/s per chip.
# ----------------------------------------------------------------------------------------

# Every parameter and optimizer moment is split over all chips on its "embed" axis (FSDP,
# ZeRO-3 style) and the batch over the same chips (data parallel); no tensor parallelism.
_FSDP = dict(mesh_shape=(1, 1, -1, 1))

PLANS = {
    "v5e_256": dict(_FSDP, topology="v5e:16x16", chips=256, per_chip_batch=16,
                    remat="dots_no_batch"),
    "v4_128": dict(_FSDP, topology="v4:4x4x4", chips=64, per_chip_batch=32,
                   remat="dots_no_batch"),
}
COMPILED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compiled")


def compiled_path(name: str) -> str:
  return os.path.join(COMPILED_DIR, f"mrplip_vitl16_{name}.json")


def compiled_summary(name: str) -> str:
  """One line from the plan's `pathjax compile --json` record, or why there is none."""
  path = compiled_path(name)
  if not os.path.exists(path):
    return f"not compiled at this layout ({os.path.relpath(path, os.path.dirname(COMPILED_DIR))} missing)"
  with open(path) as f:
    r = json.load(f)
  mib = lambda key: r["memory_bytes"][key] / 2**20
  return (f"{r['memory_gib']:.2f} GiB of {r['hbm_gib']} per chip (args {mib('argument'):.1f} MiB, "
          f"temps {mib('temp') / 1024:.2f} GiB, code {mib('code'):.1f} MiB); "
          f"{r['tflops_per_chip']:.2f} TFLOP/step/chip; {100 * r['mfu']:.0f}% MFU: "
          f"{r['step_s_at_mfu'] * 1e3:.0f} ms/step, {r['bags_per_s_per_chip']:.0f} bags/s/chip "
          f"(commit {r['commit']}, libtpu {r['versions'].get('libtpu', '?')})")


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
      per_chip_batch=plan["per_chip_batch"], compiled=compiled_summary(name)))
