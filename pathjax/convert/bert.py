"""Hugging Face BERT directory -> an initial PathAlign Q-Former (`pathjax convert --bert DIR`).

As BLIP-2 (LAVIS `Blip2Base.init_Qformer` + `Blip2Qformer.__init__`) does:
- `[DEC]` is added to the tokenizer as its bos token and the word embeddings grow to the new
  vocabulary (new rows N(0, 0.02); the LM-head bias gets zeros);
- every BERT layer's text FFN is copied into the query FFN;
- cross-attention (query, K/V, output, LayerNorm), ln_vision, the learned queries (N(0, 0.02)),
  vision_proj, text_proj, itm_head and the temperature (0.07) come from the Q-Former's own
  random init (seeded);
- the LM head (`cls.predictions.transform`, `.bias`; decoder tied to the word embeddings) is
  taken when the checkpoint has it (BertLMHeadModel / BertForMaskedLM / BertForPreTraining)
  and left random otherwise (BertModel), which the log says.
The Q-Former has no token types: BERT always adds `token_type_embeddings[0]` to text tokens,
so that row is folded into the position embeddings and the text passes equal BERT's exactly
(LAVIS drops it).

Names (optionally under `bert.`; TF-era `LayerNorm.gamma/beta` accepted):

  embeddings.word_embeddings.weight [V, W]      embeddings/word_embeddings/embedding
  embeddings.position_embeddings.weight [P, W]  embeddings/position_embeddings (+ type row 0)
  embeddings.LayerNorm                          embeddings/norm
  encoder.layer.{i}.attention.self.{query,key,value}  layers_{i}/attention/{query,key,value}
  encoder.layer.{i}.attention.output.dense      layers_{i}/attention/out
  encoder.layer.{i}.attention.output.LayerNorm  layers_{i}/attention_norm
  encoder.layer.{i}.intermediate.dense          layers_{i}/mlp/fc1 and mlp_query/fc1
  encoder.layer.{i}.output.dense                layers_{i}/mlp/fc2 and mlp_query/fc2
  encoder.layer.{i}.output.LayerNorm            layers_{i}/mlp_norm and mlp_query_norm
  cls.predictions.transform.dense / .LayerNorm  lm_head/transform, lm_head/norm
  cls.predictions.bias [V]                      lm_head/bias
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any, Mapping

import numpy as np

from pathjax.convert.safetensors_io import WeightsError, _listing

IGNORED = (r"(bert\.)?pooler\..*", r"(bert\.)?embeddings\.(position_ids|token_type_ids)",
           r"cls\.seq_relationship\..*", r"cls\.predictions\.decoder\.bias")
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "relu": "relu", "silu": "silu", "swish": "silu"}
DEC_TOKEN = "[DEC]"


# ------------------------------------------------------------------------------ tensors
def linear(w: np.ndarray, b: np.ndarray | None) -> dict[str, np.ndarray]:
  """torch Linear (y = x W^T + b) -> dense {kernel [in, out], bias}."""
  out = {"kernel": np.asarray(w, np.float32).T}
  if b is not None:
    out["bias"] = np.asarray(b, np.float32)
  return out


def heads_in(w: np.ndarray, b: np.ndarray, heads: int) -> dict[str, np.ndarray]:
  """torch q/k/v Linear [H*d, in] -> kernel [in, H, d], bias [H, d]."""
  w = np.asarray(w, np.float32)
  d = w.shape[0] // heads
  return {"kernel": w.T.reshape(w.shape[1], heads, d),
          "bias": np.asarray(b, np.float32).reshape(heads, d)}


def heads_out(w: np.ndarray, b: np.ndarray, heads: int) -> dict[str, np.ndarray]:
  """torch output Linear [out, H*d] -> kernel [H, d, out], bias [out]."""
  w = np.asarray(w, np.float32)
  return {"kernel": w.T.reshape(heads, w.shape[1] // heads, w.shape[0]),
          "bias": np.asarray(b, np.float32)}


def norm(w: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
  return {"scale": np.asarray(w, np.float32), "bias": np.asarray(b, np.float32)}


# ------------------------------------------------------------------------------ config
def fields_from_bert_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """QFormer fields that a BERT config.json fixes (the vocabulary before [DEC])."""
  if config.get("position_embedding_type", "absolute") != "absolute":
    raise WeightsError(f"position_embedding_type {config['position_embedding_type']!r} is not "
                       "supported (the Q-Former uses absolute positions)")
  act = config.get("hidden_act", "gelu")
  if act not in ACTIVATIONS:
    raise WeightsError(f"hidden_act {act!r} is not supported; valid: {', '.join(ACTIVATIONS)}")
  try:
    return dict(vocab_size=int(config["vocab_size"]), width=int(config["hidden_size"]),
                depth=int(config["num_hidden_layers"]),
                num_heads=int(config["num_attention_heads"]),
                mlp_dim=int(config["intermediate_size"]),
                max_position=int(config.get("max_position_embeddings", 512)),
                activation=ACTIVATIONS[act],
                norm_eps=float(config.get("layer_norm_eps", 1e-12)))
  except KeyError as e:
    raise WeightsError(f"the BERT config.json lacks {e.args[0]!r}") from e


def _canonical(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drops the `bert.` prefix and renames TF-era LayerNorm gamma/beta."""
  out = {}
  for key, value in sd.items():
    k = key[len("bert."):] if key.startswith("bert.") else key
    k = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", k)
    k = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)
    out[k] = value
  return out


def convert_bert(sd: Mapping[str, np.ndarray], fields: Mapping[str, Any], *, seed: int = 0,
                 source: str = "", log=print) -> dict[str, Any]:
  """BERT tensors + QFormer fields (vocab_size already grown for [DEC]) -> QFormer params.

  Raises WeightsError naming missing, unexpected or mis-shaped tensors.
  """
  import jax
  import flax.linen as nn

  from pathjax.models import qformer as qformer_lib
  from flax import traverse_util
  flatten = lambda tree: traverse_util.flatten_dict(tree, sep="/")
  unflatten = lambda flat: traverse_util.unflatten_dict(flat, sep="/")

  module = qformer_lib.QFormer(**fields)
  where = f" ({source})" if source else ""
  sd = _canonical(sd)
  used: set[str] = set()
  word_shape = tuple(np.shape(sd.get("embeddings.word_embeddings.weight", ())))
  if len(word_shape) == 2 and word_shape[1] != module.width:  # cheap check before the init
    raise WeightsError(f"BERT checkpoint{where}: shape mismatch for the word embeddings: "
                       f"{word_shape}, but hidden_size is {module.width} (does config.json "
                       "match the weights?)")

  def get(name: str) -> np.ndarray:
    if name not in sd:
      raise WeightsError(f"BERT checkpoint{where} lacks {name}")
    used.add(name)
    return np.asarray(sd[name]).astype(np.float32)

  heads, width = module.num_heads, module.width
  params = flatten(nn.unbox(module.init(jax.random.PRNGKey(seed),
                                        *qformer_lib.example_inputs(module))["params"]))
  params = {k: np.asarray(v, np.float32) for k, v in params.items()}
  new: dict[str, np.ndarray] = {}

  def put(prefix: str, tree: Mapping[str, np.ndarray]):
    for k, v in tree.items():
      new[f"{prefix}/{k}"] = v

  word = get("embeddings.word_embeddings.weight")
  vocab = module.vocab_size
  if word.shape[0] > vocab:
    raise WeightsError(f"BERT checkpoint{where} has {word.shape[0]} word embeddings, more than "
                       f"the tokenizer's {vocab} tokens")
  rng = np.random.default_rng(seed)
  grown = rng.normal(0.0, 0.02, (vocab - word.shape[0], word.shape[1])).astype(np.float32)
  new["embeddings/word_embeddings/embedding"] = np.concatenate([word, grown])
  pos = get("embeddings.position_embeddings.weight")
  if "embeddings.token_type_embeddings.weight" in sd:
    pos = pos + get("embeddings.token_type_embeddings.weight")[0][None]
  new["embeddings/position_embeddings"] = pos
  put("embeddings/norm", norm(get("embeddings.LayerNorm.weight"), get("embeddings.LayerNorm.bias")))
  for i in range(module.depth):
    p = f"encoder.layer.{i}."
    for part in ("query", "key", "value"):
      put(f"layers_{i}/attention/{part}", heads_in(get(p + f"attention.self.{part}.weight"),
                                                   get(p + f"attention.self.{part}.bias"), heads))
    put(f"layers_{i}/attention/out", heads_out(get(p + "attention.output.dense.weight"),
                                               get(p + "attention.output.dense.bias"), heads))
    put(f"layers_{i}/attention_norm", norm(get(p + "attention.output.LayerNorm.weight"),
                                           get(p + "attention.output.LayerNorm.bias")))
    for ffn in ("mlp", "mlp_query"):  # BLIP-2: the query FFN starts as a copy of the text FFN
      put(f"layers_{i}/{ffn}/fc1", linear(get(p + "intermediate.dense.weight"),
                                          get(p + "intermediate.dense.bias")))
      put(f"layers_{i}/{ffn}/fc2", linear(get(p + "output.dense.weight"),
                                          get(p + "output.dense.bias")))
      put(f"layers_{i}/{ffn}_norm", norm(get(p + "output.LayerNorm.weight"),
                                         get(p + "output.LayerNorm.bias")))
  head = "cls.predictions."
  if head + "transform.dense.weight" in sd:
    put("lm_head/transform", linear(get(head + "transform.dense.weight"),
                                    get(head + "transform.dense.bias")))
    put("lm_head/norm", norm(get(head + "transform.LayerNorm.weight"),
                             get(head + "transform.LayerNorm.bias")))
    bias = get(head + "bias")
    new["lm_head/bias"] = np.concatenate([bias, np.zeros(vocab - bias.shape[0], np.float32)])
    if head + "decoder.weight" in sd:
      dec = get(head + "decoder.weight")
      if dec.shape != word.shape or not np.allclose(dec, word):
        raise WeightsError(f"BERT checkpoint{where}: cls.predictions.decoder.weight differs from "
                           "the word embeddings; the Q-Former ties them (untied heads are not "
                           "supported)")
  else:
    log("bert: the checkpoint has no LM head (cls.predictions.*): lm_head starts random")
  unexpected = sorted(k for k in sd if k not in used
                      and not any(re.fullmatch(p, k) for p in IGNORED))
  if unexpected:
    raise WeightsError(f"BERT checkpoint{where} has tensors the Q-Former does not use "
                       f"({len(unexpected)}): {_listing(unexpected)}")
  for key, value in new.items():
    if key not in params:
      raise WeightsError(f"internal: {key} is not a Q-Former parameter")
    if params[key].shape != value.shape:
      raise WeightsError(f"BERT checkpoint{where}: shape mismatch for {key}: checkpoint gives "
                         f"{value.shape}, the Q-Former expects {params[key].shape} (does "
                         "config.json match the weights?)")
    params[key] = value
  return unflatten(params)


# ------------------------------------------------------------------------------ directory
def _tokenizer_with_dec(bert_dir: str, out_dir: str) -> tuple[int, int]:
  """Saves the BERT tokenizer with [DEC] as its bos token into out_dir: (len, dec id)."""
  try:
    from transformers import AutoTokenizer
  except ImportError as e:  # pragma: no cover - transformers is a core dependency
    raise WeightsError("reading a BERT tokenizer needs transformers") from e
  try:
    tok = AutoTokenizer.from_pretrained(bert_dir, local_files_only=True)
  except (OSError, ValueError) as e:
    raise WeightsError(f"cannot load the tokenizer in {bert_dir}: {e}") from e
  if tok.bos_token != DEC_TOKEN:
    tok.add_special_tokens({"bos_token": DEC_TOKEN})
  tok.save_pretrained(out_dir)
  return len(tok), int(tok.convert_tokens_to_ids(DEC_TOKEN))


def convert_bert_dir(bert_dir: str, out: str, *, encoder_width: int,
                     overrides: Mapping[str, Any] | None = None, seed: int = 0,
                     overwrite: bool = False, log=print) -> str:
  """`pathjax convert --bert DIR`: writes a model directory with one "qformer" tower and the
  tokenizer (with [DEC]); returns its path."""
  from pathjax.convert.safetensors_io import load_safetensors
  from pathjax.models import model_dir, qformer as qformer_lib

  config_file = os.path.join(bert_dir, "config.json")
  if not os.path.isfile(config_file):
    raise WeightsError(f"{bert_dir} has no config.json (expected a Hugging Face BERT directory)")
  with open(config_file) as f:
    try:
      config = json.load(f)
    except json.JSONDecodeError as e:
      raise WeightsError(f"{config_file} is not valid JSON: {e}") from e
  fields = fields_from_bert_config(config)
  sd = load_safetensors(bert_dir)
  with tempfile.TemporaryDirectory(prefix="pathjax-bert-tok-") as tok_dir:
    vocab, dec_id = _tokenizer_with_dec(bert_dir, tok_dir)
    fields.update(vocab_size=max(vocab, fields["vocab_size"]), encoder_width=int(encoder_width))
    fields.update(overrides or {})
    valid = set(qformer_lib.config_dict(qformer_lib.QFormer()))
    unknown = set(fields) - valid
    if unknown:
      raise WeightsError(f"unknown Q-Former fields {sorted(unknown)}; valid: "
                         f"{', '.join(sorted(valid))}")
    params = convert_bert(sd, fields, seed=seed, source=bert_dir, log=log)
    module = qformer_lib.QFormer(**fields)
    log(f"qformer: BERT width {module.width}, depth {module.depth}, heads {module.num_heads}, "
        f"mlp {module.mlp_dim} ({module.activation}); vocab {module.vocab_size} with {DEC_TOKEN} "
        f"= {dec_id}; {module.num_queries} queries, cross-attention every "
        f"{module.cross_attention_frequency} layers over {module.encoder_width}-d patches")
    path = model_dir.save_model_dir(
        out, {"qformer": dict(kind="qformer", module=module, params=params, projection=None)},
        tokenizer_dir=tok_dir, source=f"qformer: BERT {bert_dir} (seed {seed})",
        overwrite=overwrite)
  log(f"wrote {path}")
  return path
