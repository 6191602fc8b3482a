"""Causal language modelling on a text file: a decoder LLM trained from scratch, or a
converted one finetuned with LoRA (PathAlign stage 2 freezes a report writer trained here).

Data (`config.data`): a JSON-lines file (the text in `data.field`, e.g. `pathjax
synth-slides`' reports.jsonl with "report") or a plain text file (one text per line).
Every text becomes `[bos] tokens [eos]` (bos only when the tokenizer has one) and then
either

* padded (`data.packing=False`): one text per row of `seq_len + 1` tokens, cut or
  right-padded; the loss covers the real next tokens (eos included) and no padding; or
* packed (`data.packing=True`): all texts concatenated and cut into rows of `seq_len + 1`
  tokens (one token of overlap between rows), every target counted; attention is causal
  over the whole row (documents see their predecessors, as in GPT-style packing).

Batches: `inputs`, `targets` int32 [B, T], `loss_mask`, `attention_mask` bool [B, T]. The
loss is next-token cross-entropy averaged over the masked target tokens of the global batch:
sum(mask * -log softmax(logits)[target]) / sum(mask).

Chat data (`data.field="messages"`): JSON lines of conversations, {"messages": [{"role":
"system"|"user"|"assistant", "content": ...}, ...]} (pathjax.input.instructions' format
without a slide), rendered with the tokenizer's chat template, one per row (cut or padded,
no packing); the loss covers the assistant turns only (their end-of-turn marker included):
supervised instruction tuning of a base LM, with or without LoRA.

Tokenizer: `data.tokenizer` (a directory AutoTokenizer loads), else the model directory's
own (finetune), else a byte-level BPE trained offline on the training texts
(`tokenize.train_causal_tokenizer`) and cached under `data.tokenizer_cache` by a digest of
the file, field and vocabulary size, so every host and every rerun uses the same one.

Model: `config.model` fields of pathjax.models.llm.LLM (`vocab_size` 0 = the tokenizer's
size), or `model.init_dir` (a `pathjax convert --llm` directory or an export of this
recipe): its architecture, tokenizer and weights (streamed into their shardings by
`load_pretrained`). `config.lora.rank > 0` adds LoRA adapters (pathjax.models.lora) and
the config freezes the base with `lora.FREEZE_BASE` in `optimizer.freeze`.

Trained model: `predict_fns` "logits" (ids, mask -> [B, T, vocab]) and "generate" (token
id prompts -> new ids, pathjax.generate.Generator); `export` writes an "llm" model directory
(adapters merged) with the tokenizer and stop ids, which `pathjax generate --model DIR`
and `pathjax.models.llm.load_llm` load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from functools import cached_property
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pathjax import losses
from pathjax.config_lib import ConfigError
from pathjax.input import in_memory
from pathjax.models import llm as llm_lib
from pathjax.models import lora as lora_lib

LLM_TOWER = "llm"
CHAT_FIELD = "messages"   # data.field that makes data.path a file of conversations


def read_texts(path: str, field: str = "report") -> list[str]:
  """Texts of a JSON-lines file (`field` of each object) or of a text file (one per line).

  Empty lines are skipped; a JSON line that is broken or lacks the field is an error
  naming the line (training silently on part of a file would be worse)."""
  if not path:
    raise ConfigError("config.data.path is empty; set --config.data.path=FILE (a JSON-lines "
                      "file such as synth-slides' reports.jsonl, or a text file, one text a line)")
  if not os.path.isfile(path):
    raise ConfigError(f"config.data.path={path} does not exist; pass a JSON-lines or text file")
  jsonl = path.endswith((".jsonl", ".json"))
  texts = []
  with open(path, encoding="utf-8", errors="replace") as f:
    for number, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      if not jsonl:
        texts.append(line)
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{number}: not JSON ({e.msg}); fix the line or pass a .txt "
                          "file with one text per line") from None
      text = record.get(field) if isinstance(record, dict) else None
      if not isinstance(text, str):
        raise ConfigError(f"{path}:{number}: no string field {field!r}; set "
                          "--config.data.field to the field holding the text")
      if text.strip():
        texts.append(text.strip())
  if not texts:
    raise ConfigError(f"{path} holds no text to train on")
  return texts


def cached_tokenizer(path: str, field: str, texts: list[str], vocab_size: int,
                     cache: str) -> str:
  """A causal BPE trained on `texts`, cached by digest of (file bytes, field, vocab size)."""
  from pathjax.input import tokenize
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  digest.update(f"{field}:{vocab_size}".encode())
  out = os.path.join(os.path.expanduser(cache), f"causal-bpe-{digest.hexdigest()[:16]}")
  if not os.path.isfile(os.path.join(out, "tokenizer.json")):
    try:
      tokenize.train_causal_tokenizer(texts, out, vocab_size)
    except OSError:
      if not os.path.isfile(os.path.join(out, "tokenizer.json")):  # another host's won
        raise
  return out


def encode_texts(tokenizer, texts: list[str]) -> list[np.ndarray]:
  """[bos] ids [eos] per text (bos only if the tokenizer has one)."""
  bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
  if eos is None:
    raise ConfigError("the tokenizer defines no eos token; a causal LM needs one to stop")
  ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
  head = [bos] if bos is not None else []
  return [np.asarray(head + list(x) + [eos], np.int32) for x in ids]


def make_examples(sequences: list[np.ndarray], seq_len: int, pad_id: int,
                  packing: bool) -> dict[str, np.ndarray]:
  """Rows of inputs / targets / loss_mask / attention_mask [N, seq_len] (module docstring)."""
  n = seq_len + 1
  if packing:
    stream = np.concatenate(sequences)
    rows = (len(stream) - 1) // seq_len
    if rows < 1:
      raise ConfigError(f"the texts hold {len(stream)} tokens, fewer than one packed row of "
                        f"{n}; lower config.data.seq_len")
    tokens = np.stack([stream[i * seq_len:i * seq_len + n] for i in range(rows)])
    valid = np.ones_like(tokens, bool)
  else:
    tokens = np.full((len(sequences), n), pad_id, np.int32)
    valid = np.zeros((len(sequences), n), bool)
    for i, s in enumerate(sequences):
      s = s[:n]
      tokens[i, :len(s)] = s
      valid[i, :len(s)] = True
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "loss_mask": valid[:, 1:] & valid[:, :-1], "attention_mask": valid[:, :-1]}


def next_token_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Masked mean token cross-entropy, with accuracy and the token count."""
  loss, acc, count = losses.masked_token_cross_entropy(logits, targets, mask)
  return loss, {"loss": loss, "token_accuracy": acc, "tokens": count}


@dataclasses.dataclass
class CausalLMRecipe:
  config: Any

  # ------------------------------------------------------------------ model and tokenizer
  @cached_property
  def init_meta(self) -> dict[str, Any] | None:
    init_dir = self.config.model.get("init_dir", "")
    if not init_dir:
      return None
    from pathjax.models import model_dir
    try:
      meta = model_dir.read_model_json(init_dir)
    except model_dir.ModelDirError as e:
      raise ConfigError(f"config.model.init_dir: {e}") from None
    tower = meta["towers"].get(LLM_TOWER)
    if tower is None or tower.get("kind") != "llm":
      raise ConfigError(f"config.model.init_dir={init_dir} has no llm tower (towers: "
                        f"{', '.join(meta['towers'])}); convert one with `pathjax convert --llm`")
    return meta

  @cached_property
  def tokenizer_dir(self) -> str:
    d = self.config.data
    if d.get("tokenizer"):
      return d.tokenizer
    meta = self.init_meta
    if meta is not None:
      if not meta.get("tokenizer"):
        raise ConfigError(f"{self.config.model.init_dir} stores no tokenizer; pass "
                          "--config.data.tokenizer=DIR")
      return os.path.join(self.config.model.init_dir, meta["tokenizer"])
    if self.chat:
      raise ConfigError("chat data (data.field=messages) needs a tokenizer with a chat "
                        "template: set --config.model.init_dir=DIR (a base LM) or "
                        "--config.data.tokenizer=DIR")
    return cached_tokenizer(d.path, d.field, self.texts, int(d.tokenizer_vocab_size),
                            d.tokenizer_cache)

  @property
  def chat(self) -> bool:
    return self.config.data.field == CHAT_FIELD

  @cached_property
  def texts(self) -> list[str]:
    return read_texts(self.config.data.path, self.config.data.field)

  @cached_property
  def tokenizer(self):
    from pathjax.input.tokenize import load_tokenizer
    try:
      return load_tokenizer(self.tokenizer_dir)
    except (OSError, ValueError) as e:
      raise ConfigError(f"tokenizer {self.tokenizer_dir}: {e}") from None

  @property
  def pad_id(self) -> int:
    tok = self.tokenizer
    return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)

  @cached_property
  def model_fields(self) -> dict[str, Any]:
    m = self.config.model
    if self.init_meta is not None:
      fields = dict(self.init_meta["towers"][LLM_TOWER]["config"])
    else:
      fields = {k: m[k] for k in m.keys() if k in _LLM_FIELDS}
      if not fields.get("vocab_size"):
        fields["vocab_size"] = len(self.tokenizer)
    for key in ("remat", "attention"):  # how to run, not what the weights are
      if m.get(key):
        fields[key] = m[key]
    return fields

  @property
  def model(self) -> llm_lib.LLM:
    p = self.config.precision
    return llm_lib.LLM(**self.model_fields, dtype=jnp.dtype(p.compute_dtype),
                       param_dtype=jnp.dtype(p.param_dtype))

  @property
  def lora(self) -> lora_lib.LoraConfig | None:
    cfg = self.config.get("lora")
    if cfg is None or int(cfg.get("rank", 0)) <= 0:
      return None
    return lora_lib.LoraConfig.from_config(cfg)

  def _apply(self, params, *args, deterministic=True, rngs=None, **kwargs):
    if self.lora is None:
      return self.model.apply({"params": params}, *args, rngs=rngs, **kwargs)
    return lora_lib.apply(self.model, self.lora, {"params": params}, *args,
                          deterministic=deterministic, rngs=rngs, **kwargs)

  # ------------------------------------------------------------------ Recipe interface
  def init(self, rng, batch):
    ids = jnp.zeros(batch["inputs"].shape, jnp.int32)
    if self.lora is None:
      return self.model.init(rng, ids)["params"]
    return lora_lib.init(self.model, self.lora, rng, ids)["params"]

  def loss(self, params, batch, rng, train=True):
    logits = self._apply(params, batch["inputs"], attention_mask=batch["attention_mask"],
                         deterministic=not train, rngs={"dropout": rng})
    return next_token_loss(logits, batch["targets"], batch["loss_mask"])

  def example_batch(self, global_batch_size):
    shape = (global_batch_size, int(self.config.data.seq_len))
    return {"inputs": jax.ShapeDtypeStruct(shape, jnp.int32),
            "targets": jax.ShapeDtypeStruct(shape, jnp.int32),
            "loss_mask": jax.ShapeDtypeStruct(shape, jnp.bool_),
            "attention_mask": jax.ShapeDtypeStruct(shape, jnp.bool_)}

  def examples(self) -> dict[str, np.ndarray]:
    d = self.config.data
    if int(d.seq_len) < 2:
      raise ConfigError(f"config.data.seq_len={d.seq_len} must be >= 2")
    if self.chat:
      return self.chat_examples()
    seqs = encode_texts(self.tokenizer, self.texts)
    self._check_vocab(max(int(s.max()) for s in seqs))
    cut = sum(len(s) > int(d.seq_len) + 1 for s in seqs)
    if cut and not d.packing and jax.process_index() == 0:
      longest = max(len(s) for s in seqs)
      print(f"causal_lm: {cut} of {len(seqs)} texts are longer than data.seq_len + 1 = "
            f"{int(d.seq_len) + 1} tokens and are cut (the longest has {longest}; raise "
            "--config.data.seq_len to keep their ends)", flush=True)
    return make_examples(seqs, int(d.seq_len), self.pad_id, bool(d.packing))

  def _check_vocab(self, top: int) -> None:
    vocab = int(self.model_fields["vocab_size"])
    if top >= vocab:
      raise ConfigError(f"token id {top} of tokenizer {self.tokenizer_dir} is outside the "
                        f"model's vocabulary ({vocab}); use the model's own tokenizer or "
                        "set config.model.vocab_size=0")

  def chat_examples(self) -> dict[str, np.ndarray]:
    """One conversation a row; targets on the assistant tokens (module docstring)."""
    from pathjax.input import instructions as inst
    d = self.config.data
    if d.packing:
      raise ConfigError("chat data (data.field=messages) is not packed; set "
                        "--config.data.packing=false")
    if not d.path or not os.path.isfile(d.path):
      raise ConfigError(f"config.data.path={d.path!r} is not a file; pass a JSON-lines file of "
                        "conversations ({\"messages\": [{\"role\", \"content\"}, ...]})")
    try:
      rows = inst.read_instructions(d.path, text_only=True)
    except inst.InstructionError as e:
      raise ConfigError(str(e)) from None
    encoder = inst.ChatEncoder(self.tokenizer_dir, int(d.seq_len) + 1, image=False)
    encoded = [encoder.encode(r["messages"]) for r in rows]
    cut = sum(e.truncated for e in encoded)
    if cut and jax.process_index() == 0:
      print(f"causal_lm: {cut} of {len(rows)} conversations are longer than data.seq_len + 1 "
            f"= {int(d.seq_len) + 1} tokens and are cut", flush=True)
    ids = np.stack([e.ids for e in encoded])
    self._check_vocab(int(ids.max()))
    mask = np.stack([e.mask for e in encoded])
    targets = np.stack([e.targets for e in encoded])
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:],
            "loss_mask": targets[:, 1:] & mask[:, 1:], "attention_mask": mask[:, :-1]}

  def train_iterator(self, process_index, process_count):
    return in_memory.batches(self.examples(), seed=self.config.seed,
                             batch_size=self.config.batch_size,
                             process_index=process_index, process_count=process_count)

  def load_pretrained(self, abstract, wanted):
    """The base weights from `model.init_dir`, streamed into their shardings."""
    if self.init_meta is None:
      return {}
    from pathjax.models import model_dir
    base = {p: a for p, a in abstract.items() if not lora_lib.is_adapter(p)}
    only = {p for p in wanted if p in base}
    if not only:
      return {}
    try:
      return model_dir.place_tower(self.config.model.init_dir, LLM_TOWER, base, only=only)
    except model_dir.ModelDirError as e:
      raise ConfigError(f"config.model.init_dir: {e}") from None

  def merged_params(self, params):
    """Adapters folded into the base kernels (the params unchanged without LoRA)."""
    params = nn.unbox(params)
    if self.lora is None:
      return params
    base, adapters = lora_lib.split(params)
    return lora_lib.merge(base, adapters, self.lora)

  def generation_meta(self) -> dict[str, Any]:
    tok = self.tokenizer
    gen = dict((self.init_meta or {}).get("generation") or {})
    gen.setdefault("eos_token_id", [int(tok.eos_token_id)])
    gen.setdefault("pad_token_id", self.pad_id)
    if tok.bos_token_id is not None:
      gen.setdefault("bos_token_id", int(tok.bos_token_id))
    return gen

  def predict_fns(self, params):
    def logits(ids, attention_mask=None):
      return self._apply(params, ids, attention_mask=attention_mask)

    generator = []

    def generate(prompts, **kwargs):
      """New token ids per prompt (lists of ids); kwargs as Generator.generate."""
      if not generator:
        from pathjax.generate import Generator
        gen = self.generation_meta()
        generator.append(Generator(self.model, self.merged_params(params),
                                   eos_ids=gen["eos_token_id"], pad_id=gen.get("pad_token_id"),
                                   max_length=gen.get("max_length"), bucket=16))
      return generator[0].generate(prompts, **kwargs)

    return {"logits": logits, "generate": generate}

  def export(self, params):
    m = self.model_fields
    module = llm_lib.LLM(**m)
    return {"towers": {LLM_TOWER: dict(kind="llm", module=module,
                                       params=self.merged_params(params), projection=None)},
            "tokenizer_dir": self.tokenizer_dir,
            "extra_meta": {"generation": self.generation_meta()}}


_LLM_FIELDS = frozenset(llm_lib.config_dict(llm_lib.LLM()))


def make_recipe(config, mesh=None) -> CausalLMRecipe:
  del mesh  # nothing sharded explicitly
  recipe = CausalLMRecipe(config)
  if recipe.lora is not None and not config.model.get("init_dir"):
    raise ConfigError("config.lora.rank > 0 trains adapters on a pretrained base: set "
                      "--config.model.init_dir=DIR (a `pathjax convert --llm` directory or a "
                      "causal_lm export), or --config.lora.rank=0 to train the whole model")
  return recipe
