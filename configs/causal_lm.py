r"""Causal language modelling (pathjax/recipes/causal_lm.py): a decoder LLM on a text file.

Variants:
  smoke     a tiny Llama-layout decoder (2 layers, width 64) trained from scratch; the
            tokenizer is a byte-level BPE trained offline on the same texts unless
            data.tokenizer names one. Learns the synthetic reports on a 2-core CPU in minutes.
  finetune  LoRA (rank 8 on q, k, v, o, gate, up, down) on a converted model directory
            (`pathjax convert --llm HF_DIR --out DIR`, or a smoke export); the base is frozen
            through optimizer.freeze and comes out of training bit-identical.

  pathjax train --config=configs/causal_lm.py:smoke --workdir /tmp/lm \
      --config.data.path=SYNTH/reports.jsonl
  pathjax generate --model /tmp/lm/model --prompt "The slide"
  pathjax train --config=configs/causal_lm.py:finetune --workdir /tmp/lora \
      --config.model.init_dir=/tmp/lm/model --config.data.path=notes.txt

The export (WORKDIR/model, adapters merged) is an "llm" model directory with the tokenizer
and stop ids: `pathjax generate --model`, `pathjax.models.llm.load_llm` and PathAlign's
frozen LLM load it.
"""

import ml_collections

from pathjax.config_lib import pick_variant
from pathjax.models import lora
from pathjax.train_config import default_train_config

VARIANTS = {"smoke": {}, "finetune": {}}


def get_config(arg=None):
  variant = pick_variant(arg, VARIANTS, "smoke")
  config = default_train_config()
  config.recipe = "causal_lm"
  config.seed = 0
  config.batch_size = 16
  config.total_steps = 300
  config.log_every = 25
  config.checkpoint_every = 100
  config.export_model = True
  config.data = ml_collections.ConfigDict(dict(
      path="",                   # JSON-lines (text in `field`) or text file (one text a line)
      field="report",            # the text field; "messages": conversations (chat data, SFT)
      seq_len=64,                # tokens per row (texts cut or padded; or packed)
      packing=False,
      tokenizer="",              # a tokenizer directory; "" = the init_dir's, else train one
      tokenizer_vocab_size=1024, # for the tokenizer trained on the texts
      tokenizer_cache="~/.cache/pathjax/tokenizers",
  ))
  # pathjax.models.llm.LLM fields (ignored with init_dir, whose model.json decides, except
  # remat/attention); vocab_size 0 = the tokenizer's size.
  config.model = ml_collections.ConfigDict(dict(
      init_dir="", vocab_size=0, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
      head_dim=0, intermediate_size=128, norm_eps=1e-5, rope_theta=10000.0,
      tie_embeddings=True, scan=True, remat="none", attention="auto"))
  config.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets=lora.DEFAULT_TARGETS,
                                               dropout=0.0))
  opt = config.optimizer
  opt.lr = 3e-3
  opt.end_lr = 3e-4
  opt.warmup_steps = 20
  opt.weight_decay = 0.01
  if variant == "finetune":
    config.total_steps = 200
    config.lora.rank = 8
    opt.lr = 1e-3
    opt.end_lr = 1e-4
    opt.weight_decay = 0.0
    opt.freeze = (lora.FREEZE_BASE,)
  return config
