"""Text generation with pathjax's decoder LLM: prefill + one-token decode steps over a KV
cache, each jitted once per (batch, prompt bucket, cache length) bucket.

Greedy, temperature / top-k / top-p sampling with a seed, and beam search (transformers'
algorithm, so equal settings give equal output); prompts of different lengths are left
padded; generation stops at a stop token or after `max_new_tokens`.

  pathjax generate --model models/qwen3 --prompt "Describe the slide." --chat
  pathjax generate --model runs/s2/model --slide SLIDE_ID     (PathAlign stage 2: a report)

Library use: `Generator(module, params, eos_ids=[...]).generate([[ids...], ...])`; the
cache's arrays carry logical axes (cache_batch, cache_heads, cache_len, cache_kv), so under
a mesh and axis rules the decode step runs sharded like the model.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pathjax.models import llm as llm_lib

NEG = -1.0e9


class GenerateError(ValueError):
  """Generation inputs that cannot be used as given (the message says why and the fix)."""


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 = greedy; top_k 0 and top_p 1 = off (applied in that order, as
  transformers' logits warpers)."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def check(self):
    if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
      raise GenerateError(f"invalid sampling {self}: temperature >= 0, top_k >= 0, 0 < top_p <= 1")


def select_tokens(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """Next tokens [b] from logits [b, vocab]."""
  logits = logits.astype(jnp.float32)
  if sampling.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  if sampling.top_k > 0:
    k = min(sampling.top_k, logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs          # mass of the better tokens
    keep_sorted = before < sampling.top_p                 # always keeps the best token
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _round_up(n: int, bucket: int) -> int:
  return max(bucket, -(-n // bucket) * bucket)


class Generator:
  """Generation for one model: holds the jitted prefill / decode steps (compiled per shape
  bucket on first use) and the stop ids."""

  def __init__(self, module: llm_lib.LLM, params, *, eos_ids: Sequence[int] = (),
               pad_id: int | None = None, max_length: int | None = None, bucket: int = 64):
    self.module, self.params = module, params
    self.eos_ids = [int(e) for e in eos_ids]
    self.pad_id = int(pad_id if pad_id is not None else (self.eos_ids[0] if self.eos_ids else 0))
    self.max_length = max_length
    self.bucket = bucket
    self._prefill = jax.jit(self._prefill_fn, static_argnames=("sampling",), donate_argnums=(3,))
    self._prefill_prefix = jax.jit(self._prefill_prefix_fn, static_argnames=("sampling",),
                                   donate_argnums=(3,))
    self._step = jax.jit(self._step_fn, static_argnames=("sampling",), donate_argnums=(1,))
    self._beam_step = jax.jit(self._beam_step_fn, static_argnames=("k",), donate_argnums=(1,))
    self._beam_first = jax.jit(self._beam_topk, static_argnums=2)
    self._full = jax.jit(self._full_fn)

  # ------------------------------------------------------------------ jitted pieces
  def _forward(self, params, ids, slots, positions, cache, index):
    return self.module.apply({"params": params}, ids, attention_mask=slots, positions=positions,
                             cache=cache, cache_index=index, last_only=True)

  def _prefill_fn(self, params, ids, mask, cache, key, sampling):
    slots = jnp.zeros((ids.shape[0], cache["k"].shape[3]), bool).at[:, :ids.shape[1]].set(mask)
    positions = llm_lib.positions_from_mask(mask)
    logits, cache = self._forward(params, ids, slots, positions, cache, 0)
    logits = logits[:, -1]
    token = None if sampling is None else select_tokens(logits, key, sampling)
    return token, logits, cache, slots

  def _prefill_prefix_fn(self, params, ids, mask, cache, key, sampling, prefix):
    """Prefill of [prefix embeddings; left-padded prompt]: soft prompts (PathAlign's
    Q-Former tokens) before the prompt's token embeddings."""
    table = params["embed"]["embedding"]
    embeds = jnp.concatenate([prefix.astype(table.dtype), jnp.take(table, ids, axis=0)], axis=1)
    mask = jnp.concatenate([jnp.ones(prefix.shape[:2], bool), mask], axis=1)
    slots = jnp.zeros((ids.shape[0], cache["k"].shape[3]), bool).at[:, :mask.shape[1]].set(mask)
    positions = llm_lib.positions_from_mask(mask)
    logits, cache = self.module.apply({"params": params}, inputs_embeds=embeds, attention_mask=slots,
                                      positions=positions, cache=cache, cache_index=0, last_only=True)
    logits = logits[:, -1]
    token = None if sampling is None else select_tokens(logits, key, sampling)
    return token, logits, cache, slots

  def _prefill_any(self, ids, mask, cache, key, sampling, prefix):
    if prefix is None:
      return self._prefill(self.params, jnp.asarray(ids), jnp.asarray(mask), cache, key,
                           sampling=sampling)
    return self._prefill_prefix(self.params, jnp.asarray(ids), jnp.asarray(mask), cache, key,
                                sampling=sampling, prefix=jnp.asarray(prefix))

  def _step_fn(self, params, cache, slots, token, position, index, key, sampling):
    slots = slots.at[:, index].set(True)
    logits, cache = self._forward(params, token[:, None], slots, position[:, None], cache, index)
    logits = logits[:, -1]
    return select_tokens(logits, key, sampling), cache, slots

  def _beam_step_fn(self, params, cache, slots, rows, token, position, index, scores, k):
    """Reorders the cache to the chosen beams, decodes one token, returns the top-k
    continuations of every batch item: (log-prob sums [B, k], flat ids [B, k])."""
    cache = jax.tree.map(lambda c: jnp.take(c, rows, axis=1), cache)
    slots = jnp.take(slots, rows, axis=0).at[:, index].set(True)
    logits, cache = self._forward(params, token[:, None], slots, position[:, None], cache, index)
    top, idx = self._beam_topk(logits[:, -1], scores, k)
    return top, idx, cache, slots

  @staticmethod
  def _beam_topk(logits, scores, k):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    batch, beams = scores.shape
    logp = (logp.reshape(batch, beams, -1) + scores[:, :, None]).reshape(batch, -1)
    return jax.lax.top_k(logp, k)

  def _full_fn(self, params, ids, mask):
    """Logits of the last position recomputed over the whole prefix (no cache)."""
    return self.module.apply({"params": params}, ids, attention_mask=mask)[:, -1]

  # ------------------------------------------------------------------ host side
  def _pad_prompts(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, prefix_len: int = 0):
    if not prompts or any(len(p) == 0 for p in prompts):
      raise GenerateError("every prompt needs at least one token")
    if max_new_tokens < 1:
      raise GenerateError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = max(len(p) for p in prompts)
    longest += prefix_len
    if self.max_length is not None and longest + max_new_tokens > self.max_length:
      raise GenerateError(
          f"the prompt has {longest} tokens; with max_new_tokens {max_new_tokens} that exceeds "
          f"the model's maximum length {self.max_length} (max_position_embeddings): shorten "
          "the prompt or lower max_new_tokens")
    p_len = _round_up(longest - prefix_len, self.bucket)
    ids = np.full((len(prompts), p_len), self.pad_id, np.int32)
    mask = np.zeros((len(prompts), p_len), bool)
    for i, p in enumerate(prompts):
      ids[i, p_len - len(p):] = p
      mask[i, p_len - len(p):] = True
    cache_len = _round_up(prefix_len + p_len + max_new_tokens, self.bucket)
    return ids, mask, cache_len

  def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 32,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               num_beams: int = 1, length_penalty: float = 1.0, use_cache: bool = True,
               on_token: Callable[[np.ndarray], None] | None = None,
               prefix: np.ndarray | None = None) -> list[list[int]]:
    """New tokens per prompt (a stop token included, nothing after it). `on_token` gets
    each step's tokens [batch] as they come (streaming). `prefix` [batch, P, hidden]:
    input embeddings placed before each prompt (soft prompts; needs the KV cache)."""
    if prefix is not None and not use_cache:
      raise GenerateError("generation after prefix embeddings needs use_cache=True")
    sampling = Sampling(float(temperature), int(top_k), float(top_p))
    sampling.check()
    if num_beams > 1:
      if sampling.temperature > 0:
        raise GenerateError("beam search here is deterministic: use temperature 0 with num_beams > 1")
      return self.beam_search(prompts, num_beams=num_beams, max_new_tokens=max_new_tokens,
                              length_penalty=length_penalty, prefix=prefix)
    plen = 0 if prefix is None else int(prefix.shape[1])
    ids, mask, cache_len = self._pad_prompts(prompts, max_new_tokens, plen)
    batch = ids.shape[0]
    key = jax.random.key(seed)
    done = np.zeros(batch, bool)
    out: list[list[int]] = [[] for _ in range(batch)]
    position = mask.sum(1).astype(np.int32) + plen
    if use_cache:
      cache = llm_lib.init_cache(self.module, batch, cache_len)
      token, _, cache, slots = self._prefill_any(ids, mask, cache, jax.random.fold_in(key, 0),
                                                 sampling, prefix)
    else:
      seq, seq_mask = ids, mask
      logits = self._full(self.params, jnp.asarray(seq), jnp.asarray(seq_mask))
      token = select_tokens(logits, jax.random.fold_in(key, 0), sampling)
    index = ids.shape[1] + plen
    for t in range(max_new_tokens):
      tok = np.asarray(token)
      tok = np.where(done, self.pad_id, tok)
      for i in range(batch):
        if not done[i]:
          out[i].append(int(tok[i]))
      if on_token is not None:
        on_token(np.where(done, -1, tok))
      done |= np.isin(tok, self.eos_ids)
      if done.all() or t == max_new_tokens - 1:
        break
      step_key = jax.random.fold_in(key, t + 1)
      if use_cache:
        token, cache, slots = self._step(self.params, cache, slots, jnp.asarray(tok),
                                         jnp.asarray(position + t), index + t, step_key,
                                         sampling=sampling)
      else:
        seq = np.concatenate([seq, tok[:, None]], 1)
        seq_mask = np.concatenate([seq_mask, np.ones((batch, 1), bool)], 1)
        logits = self._full(self.params, jnp.asarray(seq), jnp.asarray(seq_mask))
        token = select_tokens(logits, step_key, sampling)
    return out

  def beam_search(self, prompts: Sequence[Sequence[int]], *, num_beams: int = 3,
                  max_new_tokens: int = 32, length_penalty: float = 1.0,
                  prefix: np.ndarray | None = None) -> list[list[int]]:
    """transformers' beam search (early_stopping=False): the top 2*num_beams continuations
    per step; those ending in a stop token (or at max_new_tokens) among the first num_beams
    become hypotheses scored sum(log p) / length**length_penalty; the rest continue."""
    n = num_beams
    plen = 0 if prefix is None else int(prefix.shape[1])
    ids, mask, cache_len = self._pad_prompts(prompts, max_new_tokens, plen)
    batch = ids.shape[0]
    rows = batch * n
    k = max(2, 1 + len(self.eos_ids)) * n
    ids_r, mask_r = np.repeat(ids, n, 0), np.repeat(mask, n, 0)
    cache = llm_lib.init_cache(self.module, rows, cache_len)
    prefix_r = None if prefix is None else np.repeat(np.asarray(prefix), n, 0)
    _, logits, cache, slots = self._prefill_any(ids_r, mask_r, cache, jax.random.key(0), None,
                                                prefix_r)
    running_scores = np.zeros((batch, n), np.float32)
    running_scores[:, 1:] = NEG
    top, idx = self._beam_first(logits, jnp.asarray(running_scores), k)
    vocab = logits.shape[-1]
    running = np.full((batch, n, max_new_tokens), self.pad_id, np.int64)
    finished = running.copy()
    finished_scores = np.full((batch, n), NEG, np.float32)
    is_finished = np.zeros((batch, n), bool)
    unsatisfied = np.ones(batch, bool)
    top_mask = np.arange(k) < n
    position = mask_r.sum(1).astype(np.int32) + plen
    index = ids.shape[1] + plen
    for t in range(max_new_tokens):
      top, idx = np.asarray(top, np.float32), np.asarray(idx)
      beam, tok = idx // vocab, idx % vocab
      cand = np.take_along_axis(running, beam[:, :, None], axis=1)
      cand[:, :, t] = tok
      hits = np.isin(tok, self.eos_ids) | (t + 1 == max_new_tokens)
      # running beams: the best n continuations that did not stop
      run_lp = top + hits.astype(np.float32) * np.float32(NEG)
      choice = np.argsort(-run_lp, axis=1, kind="stable")[:, :n]
      running = np.take_along_axis(cand, choice[:, :, None], axis=1)
      running_scores = np.take_along_axis(run_lp, choice, axis=1)
      src_rows = (np.arange(batch)[:, None] * n + np.take_along_axis(beam, choice, axis=1)).reshape(-1)
      # finished hypotheses: stopped among the first n, while the batch item can improve
      fin_lp = top / np.float32((t + 1) ** length_penalty)
      fin_lp = fin_lp + (~unsatisfied[:, None]).astype(np.float32) * np.float32(NEG)
      fin_lp = fin_lp + (~(hits & top_mask[None])).astype(np.float32) * np.float32(NEG)
      merged = np.concatenate([finished_scores, fin_lp], 1)
      merged_seqs = np.concatenate([finished, cand], 1)
      merged_fin = np.concatenate([is_finished, hits & top_mask[None]], 1)
      best = np.argsort(-merged, axis=1, kind="stable")[:, :n]
      finished_scores = np.take_along_axis(merged, best, axis=1)
      finished = np.take_along_axis(merged_seqs, best[:, :, None], axis=1)
      is_finished = np.take_along_axis(merged_fin, best, axis=1)
      best_possible = running_scores[:, 0] / np.float32((t + 1) ** length_penalty)
      worst = np.where(is_finished, finished_scores.min(1, keepdims=True), np.float32(NEG))
      unsatisfied &= (best_possible[:, None] > worst).any(1)
      if not unsatisfied.any() or hits.all() or t == max_new_tokens - 1:
        break
      top, idx, cache, slots = self._beam_step(
          self.params, cache, slots, jnp.asarray(src_rows, jnp.int32),
          jnp.asarray(running[:, :, t].reshape(-1), jnp.int32), jnp.asarray(position + t),
          index + t, jnp.asarray(running_scores), k=k)
    out = []
    for b in range(batch):
      seq = [int(x) for x in finished[b, 0]]
      stop = next((i for i, x in enumerate(seq) if x in self.eos_ids), None)
      out.append(seq[:stop + 1] if stop is not None else seq[:t + 1])
    return out


# ---------------------------------------------------------------------- model directories
def load_generator(path: str, *, dtype=jnp.float32, bucket: int = 64) -> tuple[Generator, Any]:
  """(Generator, tokenizer or None) for a model directory from `pathjax convert --llm`."""
  module, params, meta = llm_lib.load_llm(path, dtype=dtype)
  gen = meta.get("generation") or {}
  tokenizer = None
  if meta.get("tokenizer_dir"):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(meta["tokenizer_dir"], local_files_only=True)
  eos = list(gen.get("eos_token_id") or [])
  if not eos and tokenizer is not None and tokenizer.eos_token_id is not None:
    eos = [tokenizer.eos_token_id]
  generator = Generator(module, params, eos_ids=eos, pad_id=gen.get("pad_token_id"),
                        max_length=gen.get("max_length"), bucket=bucket)
  return generator, tokenizer


def encode_prompt(tokenizer, prompt: str, *, chat: bool) -> list[int]:
  """Token ids of a prompt; with `chat`, through the tokenizer's own chat template."""
  if chat:
    if not getattr(tokenizer, "chat_template", None):
      raise GenerateError("the tokenizer has no chat template (chat_template.jinja or "
                          "tokenizer_config.json's chat_template); drop --chat")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
  return list(tokenizer(prompt)["input_ids"])


# ---------------------------------------------------------------------- CLI
def register(parser) -> None:
  parser.add_argument("--model", required=True, metavar="DIR",
                      help="a model directory from `pathjax convert --llm`, or (with --slide) a "
                      "stage-2 PathAlign model directory")
  what = parser.add_mutually_exclusive_group(required=True)
  what.add_argument("--prompt", help="text to continue (an LLM model directory)")
  what.add_argument("--slide", metavar="ID", help="write the report for this slide (a stage-2 "
                    "PathAlign model directory; pathjax.slide_report)")
  parser.add_argument("--embeddings", metavar="DIR", help="with --slide: the `pathjax "
                      "embed-slides` directory holding the slide (default: the training "
                      "config's data.embeddings)")
  parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's "
                      "chat template (a user turn and the assistant prefix)")
  parser.add_argument("--max-new-tokens", type=int, default=128)
  parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  parser.add_argument("--top-k", type=int, default=0)
  parser.add_argument("--top-p", type=float, default=1.0)
  parser.add_argument("--num-beams", type=int, default=1)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                      help="compute dtype")


def _slide_report(args) -> None:
  from pathjax.slide_report import SlideReportModel
  if args.temperature or args.top_k or args.top_p < 1.0 or args.chat:
    raise GenerateError("--slide generates greedily or with --num-beams; drop --temperature, "
                        "--top-k, --top-p and --chat")
  model = SlideReportModel(args.model, embeddings=args.embeddings)
  print(model.report(args.slide, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams))


def main(args) -> int:
  from pathjax.models.model_dir import ModelDirError
  if args.embeddings and not args.slide:
    print("pathjax generate: error: --embeddings goes with --slide", file=sys.stderr)
    return 2
  try:
    if args.slide:
      _slide_report(args)
      return 0
    generator, tokenizer = load_generator(args.model, dtype=jnp.dtype(args.dtype))
    if tokenizer is None:
      raise GenerateError(f"{args.model} stores no tokenizer; convert from a Hugging Face "
                          "directory that has tokenizer.json / tokenizer_config.json")
    prompt = encode_prompt(tokenizer, args.prompt, chat=args.chat)
    generated: list[int] = []
    shown = [""]

    def stream(tokens):
      if tokens[0] < 0 or (args.num_beams > 1):
        return
      generated.append(int(tokens[0]))
      text = tokenizer.decode([t for t in generated if t not in generator.eos_ids],
                              skip_special_tokens=True)
      if text.startswith(shown[0]):
        sys.stdout.write(text[len(shown[0]):])
        sys.stdout.flush()
        shown[0] = text

    out = generator.generate([prompt], max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             seed=args.seed, num_beams=args.num_beams, on_token=stream)
    if args.num_beams > 1:
      sys.stdout.write(tokenizer.decode(out[0], skip_special_tokens=True))
    else:
      final = tokenizer.decode([t for t in out[0] if t not in generator.eos_ids],
                               skip_special_tokens=True)
      sys.stdout.write(final[len(shown[0]):] if final.startswith(shown[0]) else "\n" + final)
    sys.stdout.write("\n")
  except (GenerateError, ModelDirError, OSError) as e:
    print(f"pathjax generate: error: {e}", file=sys.stderr)
    return 2
  return 0
