"""Tiny random Hugging Face causal LMs (Llama, Qwen2, Qwen3) and an offline BPE tokenizer,
for parity tests of pathjax's decoder. Nothing is downloaded."""

import os

import numpy as np

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS = 512, 64, 2, 4, 2
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def hf_config(arch: str, tied: bool, **kw):
  import transformers
  cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
         "qwen3": transformers.Qwen3Config}[arch]
  base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96,
              num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
              max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tied,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
  if arch == "qwen3":
    base["head_dim"] = 16
  base.update(kw)
  config = cls(**base)
  config.architectures = [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                           "qwen3": "Qwen3ForCausalLM"}[arch]]
  return config


def hf_model(config, seed: int = 0):
  """A random model with weights large enough that logits differ clearly between tokens."""
  import torch
  import transformers
  torch.manual_seed(seed)
  cls = getattr(transformers, config.architectures[0])
  model = cls(config).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(0.08 * torch.randn(p.shape, generator=gen))
  if config.tie_word_embeddings:
    model.tie_weights()
  model.generation_config.pad_token_id = config.pad_token_id
  return model


def train_tokenizer(out_dir: str) -> str:
  """A 512-token byte-level BPE tokenizer with a chat template, saved for AutoTokenizer."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.BPE(unk_token=None))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>",
                                                                  "<|user|>", "<|assistant|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  rng = np.random.default_rng(0)
  words = ["tumor", "stroma", "lymphocyte", "necrosis", "gland", "mitosis", "nuclei", "cell",
           "the", "slide", "shows", "carcinoma", "invasive", "benign", "tissue", "of", "and"]
  text = [" ".join(rng.choice(words, 12)) for _ in range(300)]
  tok.train_from_iterator(text, trainer)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>")
  fast.chat_template = CHAT_TEMPLATE
  fast.padding_side = "left"
  fast.save_pretrained(out_dir)
  return out_dir


def save_hf_dir(model, out_dir: str, *, tokenizer: bool = True, shard: str | None = None) -> str:
  kw = {"max_shard_size": shard} if shard else {}
  model.save_pretrained(out_dir, **kw)
  if tokenizer:
    train_tokenizer(out_dir)
  return out_dir


def left_padded_batch(seed: int = 0, batch: int = 3, length: int = 10):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, VOCAB, (batch, length)).astype(np.int64)
  mask = np.ones((batch, length), np.int64)
  for i, pad in enumerate([0, 3, 6][:batch]):
    ids[i, :pad] = 0
    mask[i, :pad] = 0
  return ids, mask


def hf_positions(mask):
  pos = np.cumsum(mask, -1) - 1
  return np.where(mask == 0, 1, pos)
