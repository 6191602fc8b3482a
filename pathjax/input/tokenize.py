"""Text tokenization: fixed-length CLIP-style ids, and training a CLIP-compatible BPE.

Id convention (what the CLIP text tower relies on)
-------------------------------------------------
`TextTokenizer(texts)` returns int32 ids of shape [N, context_length]:

    bos t_1 ... t_n eos pad pad ...

Truncation keeps `bos` first and `eos` last (bos + the first context_length - 2 tokens + eos),
so end-of-text pooling always finds an eos. `pad_id != eos_id` always holds (when the
loaded tokenizer pads with its eos, as OpenAI CLIP's does, pad falls back to 0 as in
open_clip), so the pooling position is the unique position with `ids == eos_id`:

    eot_index = argmax(ids == eos_id, axis=-1)          # the canonical convention

`encode()` also returns `eot_index` computed that way. For OpenAI CLIP's vocabulary and
for tokenizers trained by `train_bpe_tokenizer`, eos is also the largest id
(`TextTokenizer.eos_is_max`), so open_clip's `argmax(ids)` finds the same position.

Tokenizers trained here follow transformers' CLIPTokenizer exactly (NFC + whitespace
collapse + lowercase, CLIP's split regex, byte-level BPE with a `</w>` word-end suffix)
and are saved as a directory that `AutoTokenizer.from_pretrained(dir)` and
`CLIPTokenizer.from_pretrained(dir)` load. (transformers 5's `CLIPTokenizer(vocab_file=...,
merges_file=...)` silently ignores those files; always load from the directory.)
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import numpy as np

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
PAD = "<|pad|>"
CLIP_SPLIT_REGEX = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"""
                    r"""[\p{N}]|[^\s\p{L}\p{N}]+""")


def _looks_like_path(name: str) -> bool:
  """A local path rather than a hub name ("org/name"): absolute, ./ ../ ~, a backslash, or
  more than one '/'."""
  return (os.path.isabs(name) or name.startswith(("./", "../", "~", ".")) or "\\" in name
          or name.count("/") > 1 or os.path.exists(name))


def load_tokenizer(name_or_dir: str):
  """A transformers tokenizer from a local directory, or a hub name already in the local
  Hugging Face cache. Never downloads (`local_files_only=True`): a missing local path is a
  FileNotFoundError naming it, not a minute-long hub lookup.
  """
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  name_or_dir = os.fspath(name_or_dir)
  if _looks_like_path(name_or_dir) and not os.path.isdir(os.path.expanduser(name_or_dir)):
    raise FileNotFoundError(f"tokenizer directory {name_or_dir} does not exist; pass a directory "
                            "holding tokenizer.json (train one with `pathjax tokenizer train "
                            "--captions FILE --out DIR`)")
  name_or_dir = os.path.expanduser(name_or_dir)
  if os.path.isdir(name_or_dir) and not os.path.exists(os.path.join(name_or_dir, "tokenizer.json")) \
      and not os.path.exists(os.path.join(name_or_dir, "vocab.json")):
    raise FileNotFoundError(f"{name_or_dir} holds no tokenizer.json or vocab.json; train one with "
                            "`pathjax tokenizer train --captions FILE --out DIR`")
  from transformers import AutoTokenizer  # imported on use: transformers is slow to import
  try:
    return AutoTokenizer.from_pretrained(name_or_dir, local_files_only=True)
  except OSError as e:
    if os.path.isdir(name_or_dir):
      raise
    raise FileNotFoundError(f"tokenizer {name_or_dir!r} is neither a local directory nor in the "
                            "local Hugging Face cache (pathjax never downloads); pass a "
                            f"tokenizer directory ({str(e).splitlines()[0][:200]})") from None


def _load_backend(directory: str):
  """The `tokenizers.Tokenizer` of a directory with tokenizer.json + tokenizer_config.json
  naming bos/eos tokens (what train_bpe_tokenizer writes), without importing transformers;
  None when the directory is not like that."""
  tok_file = os.path.join(directory, "tokenizer.json")
  cfg_file = os.path.join(directory, "tokenizer_config.json")
  if not (os.path.isfile(tok_file) and os.path.isfile(cfg_file)):
    return None
  with open(cfg_file, encoding="utf-8") as f:
    config = json.load(f)
  names = {}
  for key in ("bos_token", "eos_token", "pad_token"):
    value = config.get(key)
    if isinstance(value, dict):
      value = value.get("content")
    if not isinstance(value, str):
      if key != "pad_token":
        return None
      continue
    names[key] = value
  import tokenizers
  backend = tokenizers.Tokenizer.from_file(tok_file)
  vocab = backend.get_vocab()
  if any(v not in vocab for v in names.values()):
    return None
  wrapper = _Backend(backend)
  wrapper._pathjax_special_tokens = names
  return wrapper


class _Backend:
  """A tokenizers.Tokenizer with the special-token names from tokenizer_config.json."""

  def __init__(self, backend):
    self.backend_tokenizer = backend
    self._pathjax_special_tokens = {}


class TextTokenizer:
  """Fixed-length int32 ids, CLIP style (see the module docstring for the convention).

  Picklable (grain worker processes receive it): it keeps only the fast backend
  (`tokenizers.Tokenizer`) and a few ids. Keyword and caption texts repeat a lot, so
  encodings of short texts are cached.
  """

  def __init__(self, tokenizer, context_length: int = 77, *, pad_id: int | None = None,
               lowercase: bool = False, cache_size: int = 100_000):
    if isinstance(tokenizer, str):
      tokenizer = _load_backend(tokenizer) or load_tokenizer(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or isinstance(tokenizer, _Backend):
      import tokenizers
      names = getattr(tokenizer, "_pathjax_special_tokens", {})
      backend = backend or tokenizer
      if not isinstance(backend, tokenizers.Tokenizer):
        raise TypeError("TextTokenizer needs a fast (tokenizers-backed) tokenizer")
      vocab = backend.get_vocab()
      bos_id, eos_id = vocab.get(names.get("bos_token", BOS)), vocab.get(names.get("eos_token", EOS))
      tok_pad = vocab.get(names.get("pad_token", PAD))
    else:
      bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
      eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
      tok_pad = tokenizer.pad_token_id
    if bos_id is None or eos_id is None:
      raise ValueError("the tokenizer defines no bos/eos (or cls/sep) token")
    if context_length < 2:
      raise ValueError(f"context_length must be >= 2, got {context_length}")
    if pad_id is None:
      pad_id = tok_pad if tok_pad is not None and tok_pad not in (eos_id, bos_id) else 0
    if pad_id in (eos_id, bos_id):
      raise ValueError(f"pad_id {pad_id} must differ from bos {bos_id} and eos {eos_id}")
    self.backend = backend
    self.context_length = int(context_length)
    self.bos_id, self.eos_id, self.pad_id = int(bos_id), int(eos_id), int(pad_id)
    self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))
    self.lowercase = lowercase
    self._cache: dict[str, np.ndarray] = {}
    self._cache_size = cache_size

  @property
  def eos_is_max(self) -> bool:
    """True when eos is the largest id, so `argmax(ids)` also finds the end of text."""
    return self.eos_id == self.vocab_size - 1

  def __getstate__(self):
    state = dict(self.__dict__)
    state["backend"] = self.backend.to_str()
    state["_cache"] = {}
    return state

  def __setstate__(self, state):
    import tokenizers
    state = dict(state)
    state["backend"] = tokenizers.Tokenizer.from_str(state["backend"])
    self.__dict__.update(state)

  def _encode_uncached(self, texts: Sequence[str]) -> list[np.ndarray]:
    if not texts:
      return []
    if self.lowercase:
      texts = [t.lower() for t in texts]
    encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
    n = self.context_length
    out = []
    for enc in encodings:
      row = np.full((n,), self.pad_id, np.int32)
      body = enc.ids[: n - 2]
      row[0] = self.bos_id
      row[1:1 + len(body)] = body
      row[1 + len(body)] = self.eos_id
      out.append(row)
    return out

  def __call__(self, texts: Sequence[str] | str) -> np.ndarray:
    """int32 ids [N, context_length] (or [context_length] for one string)."""
    single = isinstance(texts, str)
    texts = [texts] if single else list(texts)
    missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
    if missing:
      rows = self._encode_uncached(missing)
      if len(self._cache) + len(missing) > self._cache_size:
        self._cache.clear()
      for text, row in zip(missing, rows):
        if len(text) <= 512:  # long texts rarely repeat; bound the cache's memory
          self._cache[text] = row
      fresh = dict(zip(missing, rows))
    else:
      fresh = {}
    ids = np.stack([self._cache.get(t, fresh.get(t)) for t in texts]) if texts else \
        np.zeros((0, self.context_length), np.int32)
    return ids[0] if single else ids

  def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """ids [N, ctx], mask [N, ctx] (True up to and including eos), eot_index [N]."""
    ids = self(list(texts))
    eot = np.argmax(ids == self.eos_id, axis=-1).astype(np.int32)
    mask = np.arange(self.context_length)[None, :] <= eot[:, None]
    return {"ids": ids, "mask": mask, "eot_index": eot}

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    body = []
    for i in ids[1:] if ids and ids[0] == self.bos_id else ids:
      if i == self.eos_id:
        break
      body.append(i)
    text = self.backend.decode(body, skip_special_tokens=True)
    if "</w>" in text:  # CLIP's word-end suffix (the byte-level decoder leaves it in)
      text = " ".join(text.replace(" ", "").replace("</w>", " ").split())
    return text.strip()


def _clip_pipeline(tok):
  from tokenizers import Regex, decoders, normalizers, pre_tokenizers
  tok.normalizer = normalizers.Sequence(
      [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(CLIP_SPLIT_REGEX), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False),
  ])
  tok.decoder = decoders.ByteLevel()
  return tok


def min_vocab_size() -> int:
  """The smallest vocabulary train_bpe_tokenizer can make: bytes, their </w> forms, 3 specials."""
  from tokenizers import pre_tokenizers
  return 2 * len(pre_tokenizers.ByteLevel.alphabet()) + 3


def train_bpe_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 8192,
                        *, context_length: int = 77, min_frequency: int = 2) -> str:
  """Trains a CLIP-compatible byte-level BPE tokenizer on `texts` and saves it to `out_dir`.

  Layout like OpenAI CLIP's: the 256 byte symbols, their `</w>` forms, merges, then the
  special tokens `<|pad|>`, `<|startoftext|>`, `<|endoftext|>` last (so eos is the largest
  id). `vocab_size` is an upper bound that counts everything, specials included (the
  result can be a little smaller when training made fewer byte `</w>` forms). Returns `out_dir`.
  """
  from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
  byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
  min_size = min_vocab_size()
  if vocab_size < min_size:
    raise ValueError(f"vocab_size must be >= {min_size} (bytes, their </w> forms, 3 specials)")
  tok = _clip_pipeline(Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>",
                                            unk_token=EOS, fuse_unk=False)))
  # The trainer's budget leaves room for every byte's `</w>` form, added below if training
  # did not make it (as in CLIP's vocabulary, so no text is ever unknown: BPE would map an
  # unknown symbol to unk = eos, which would break end-of-text pooling).
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size - 3 - len(byte_alphabet), min_frequency=min_frequency,
      show_progress=False, initial_alphabet=byte_alphabet, end_of_word_suffix="</w>",
      special_tokens=[])
  tok.train_from_iterator(texts, trainer=trainer)
  vocab = tok.get_vocab()
  merges = [m if isinstance(m, list) else m.split(" ")
            for m in json.loads(tok.to_str())["model"]["merges"]]
  # Ids in a fixed order, not the trainer's: it numbers the initial alphabet in hash-set
  # order, which changes from run to run (same merges, 254 of 943 ids permuted between two
  # runs on the demo's captions), and with it every training run that reads the tokenizer.
  base = sorted(byte_alphabet)
  tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges]
  tokens += sorted(set(vocab) - set(tokens))
  tokens = list(dict.fromkeys(tokens))
  new_vocab = {t: i for i, t in enumerate(tokens)}
  for special in (PAD, BOS, EOS):
    new_vocab[special] = len(new_vocab)
  model = models.BPE(vocab=new_vocab, merges=[tuple(m) for m in merges], continuing_subword_prefix="",
                     end_of_word_suffix="</w>", unk_token=EOS, fuse_unk=False)
  final = _clip_pipeline(Tokenizer(model))
  from tokenizers import AddedToken
  final.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in (PAD, BOS, EOS)])
  final.post_processor = processors.RobertaProcessing((EOS, new_vocab[EOS]), (BOS, new_vocab[BOS]),
                                                      trim_offsets=False, add_prefix_space=False)
  os.makedirs(out_dir, exist_ok=True)
  final.save(os.path.join(out_dir, "tokenizer.json"))
  with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(new_vocab, f, ensure_ascii=False)
  with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n")
    f.writelines(" ".join(m) + "\n" for m in merges)
  config = {
      "tokenizer_class": "CLIPTokenizer",
      "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": PAD,
      "model_max_length": context_length, "do_lower_case": True,
      "clean_up_tokenization_spaces": False,
  }
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
    json.dump({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": PAD}, f, indent=2)
  return out_dir


def read_caption_texts(paths: Sequence[str], field: str = "caption") -> Iterable[str]:
  """Yields the `field` of every JSON line in `paths`, line by line; bad lines are skipped."""
  for path in paths:
    with open(path, encoding="utf-8", errors="replace") as f:
      for line in f:
        line = line.strip()
        if not line:
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue
        text = record.get(field) if isinstance(record, dict) else None
        if isinstance(text, str) and text:
          yield text


WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")


def train_wordpiece_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 1000) -> str:
  """Trains a small BERT-style (uncased WordPiece) tokenizer offline and saves it to `out_dir`.

  Specials [PAD] [UNK] [CLS] [SEP] [MASK] and [DEC] (the Q-Former's decoder start token, as
  `pathjax convert --bert` adds it: the bos token), so a PathAlign run can train without a
  published BERT. Loads with `AutoTokenizer.from_pretrained(out_dir)`. Returns `out_dir`.
  """
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece()
  trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(WORDPIECE_SPECIALS),
                                      show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                 cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                 bos_token="[DEC]")
  os.makedirs(out_dir, exist_ok=True)
  fast.save_pretrained(out_dir)
  return out_dir


CAUSAL_SPECIALS = ("<pad>", "<s>", "</s>")


def min_causal_vocab_size() -> int:
  """The smallest vocabulary train_causal_tokenizer can make: bytes and 3 specials."""
  from tokenizers import pre_tokenizers
  return len(pre_tokenizers.ByteLevel.alphabet()) + len(CAUSAL_SPECIALS)


def train_causal_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 4096, *,
                           min_frequency: int = 2, model_max_length: int = 2048) -> str:
  """Trains a GPT-2-style byte-level BPE for a decoder LLM and saves it for AutoTokenizer.

  Case is kept (reports are not lowercased); ids 0, 1, 2 are `<pad>`, `<s>` (bos), `</s>`
  (eos); encoding a text adds bos only (`tokenizer("text")` -> `<s> t_1 ... t_n`, what
  `pathjax generate` feeds the model), decoding is exact. Every byte is in the vocabulary,
  so no text is ever unknown. Written atomically; returns `out_dir`.
  """
  import shutil
  import tempfile

  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast
  pad, bos, eos = CAUSAL_SPECIALS
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if vocab_size < min_causal_vocab_size():
    raise ValueError(f"vocab_size must be >= {min_causal_vocab_size()} "
                     "(256 bytes and 3 special tokens)")
  out_dir = os.path.abspath(out_dir)
  if os.path.isdir(out_dir) and os.listdir(out_dir) or os.path.isfile(out_dir):
    import errno
    raise FileExistsError(errno.EEXIST, "exists and is not empty (nothing was overwritten)",
                          out_dir)
  tok = Tokenizer(models.BPE(unk_token=None))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                special_tokens=list(CAUSAL_SPECIALS), initial_alphabet=alphabet,
                                show_progress=False)
  tok.train_from_iterator(texts, trainer)
  tok.post_processor = processors.TemplateProcessing(
      single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                 pad_token=pad, model_max_length=model_max_length)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
  try:
    fast.save_pretrained(tmp)
    if os.path.isdir(out_dir) and not os.listdir(out_dir):
      os.rmdir(out_dir)
    os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir
