"""`pathjax bench generate`: decoder LLM prefill and decode throughput, side by side.

Measured in one run, on a random Llama-layout model (default ~100M parameters: hidden 768,
12 layers, 12 heads, 4 KV heads, MLP 2048, vocab 32000, tied embeddings):

- the jax fp32 matmul peak (4096^3) and the memory copy bandwidth (a jitted x + 1 over a
  512 MiB array: bytes read + written per second);
- pathjax prefill (prompt of --prompt-len tokens, KV cache written, next-token logits) in
  tokens/s and GFLOP/s (analytic matmul FLOPs), as a ratio to the matmul peak;
- pathjax decode (greedy, one jitted step per token, fetched to the host as streaming
  does) in tokens/s, against the bandwidth floor (every weight byte read once per step:
  batch / (weight bytes / copy bandwidth) tokens/s), as a ratio;
- transformers' PyTorch `generate` on the same weights (torch using every core): prefill
  from a forward of the prompt, decode from generate's total time minus that prefill, and
  the ratios pathjax / transformers.

  pathjax bench generate                         # batch 1 and 8, prompt 128, 32 new tokens
  pathjax bench generate --batch-sizes 1 --new-tokens 16 --no-torch
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pathjax.bench import common

SIZES = {  # name -> HF LlamaConfig fields
    "100m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, intermediate_size=2048, vocab_size=32000),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=96, vocab_size=512),
}


def register(parser: argparse.ArgumentParser) -> None:
  parser.formatter_class = argparse.RawDescriptionHelpFormatter
  parser.epilog = __doc__
  parser.add_argument("--size", choices=list(SIZES), default="100m")
  parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--prompt-len", type=int, default=128)
  parser.add_argument("--new-tokens", type=int, default=32)
  parser.add_argument("--matmul-size", type=int, default=4096)
  parser.add_argument("--no-torch", dest="torch", action="store_false",
                      help="skip transformers' PyTorch reference")
  parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")


def _hf_config(size: str):
  import transformers
  cfg = transformers.LlamaConfig(**SIZES[size], max_position_embeddings=2048,
                                 tie_word_embeddings=True, rms_norm_eps=1e-5,
                                 bos_token_id=1, eos_token_id=2, pad_token_id=0)
  cfg.architectures = ["LlamaForCausalLM"]
  return cfg


def build_models(size: str, use_torch: bool):
  """(flax module, params, torch model or None) holding the same random weights."""
  from pathjax.models import llm as llm_lib
  if use_torch:
    import torch
    from pathjax.convert import hf_llm
    torch.manual_seed(0)
    cfg = _hf_config(size)
    ref = __import__("transformers").LlamaForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
      ref.save_pretrained(tmp)
      fields, params = hf_llm.convert_hf_llm(tmp)
    module = llm_lib.LLM(**fields)
    return module, jax.tree.map(jnp.asarray, params), ref
  s = SIZES[size]
  module = llm_lib.LLM(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
                       num_layers=s["num_hidden_layers"], num_heads=s["num_attention_heads"],
                       num_kv_heads=s["num_key_value_heads"],
                       intermediate_size=s["intermediate_size"], tie_embeddings=True)
  import flax.linen as nn
  params = nn.unbox(jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
  return module, params, None


def prefill_flops(module, batch: int, length: int) -> float:
  """Matmul FLOPs of a prefill: every layer's projections and MLP per token, attention
  scores and values over the whole (square) prompt, the output head at the last token."""
  d, hd = module.hidden_size, module.dim_per_head
  h, kv, m = module.num_heads, module.num_kv_heads, module.intermediate_size
  per_token = 2 * (d * h * hd * 2 + d * kv * hd * 2 + 3 * d * m)
  attention = 2 * 2 * length * length * h * hd
  tokens = batch * length
  return float(module.num_layers * (per_token * tokens + attention * batch)
               + 2 * batch * d * module.vocab_size)


def copy_bandwidth(mib: int = 512) -> float:
  """Bytes/s moved by a jitted elementwise pass (read + write) over `mib` MiB."""
  x = jnp.zeros((mib * 2 ** 20 // 4,), jnp.float32)
  fn = jax.jit(lambda a: a + 1.0)
  seconds = common.time_calls(lambda: fn(x), min_seconds=2.0)
  return 2.0 * x.nbytes / seconds


def bench_pathjax(generator, batch: int, prompt_len: int, new_tokens: int) -> dict[str, float]:
  from pathjax.generate import Sampling
  from pathjax.models import llm as llm_lib
  rng = np.random.default_rng(batch)
  prompts = [list(rng.integers(3, generator.module.vocab_size, prompt_len)) for _ in range(batch)]
  ids, mask, cache_len = generator._pad_prompts(prompts, new_tokens)
  greedy = Sampling()
  key = jax.random.key(0)
  ids_d, mask_d = jnp.asarray(ids), jnp.asarray(mask)

  def prefill():
    cache = llm_lib.init_cache(generator.module, batch, cache_len)
    return generator._prefill(generator.params, ids_d, mask_d, cache, key, sampling=greedy)

  prefill_s = common.time_calls(prefill, warmup=1, min_seconds=2.0, min_calls=2)
  position = mask.sum(1).astype(np.int32)

  def decode():
    token, _, cache, slots = prefill()
    t0 = time.perf_counter()
    for t in range(new_tokens - 1):
      token, cache, slots = generator._step(generator.params, cache, slots, token,
                                            jnp.asarray(position + t), ids.shape[1] + t, key,
                                            sampling=greedy)
      np.asarray(token)  # the host sees each token (streaming)
    return time.perf_counter() - t0

  decode()  # compile
  decode_s = min(decode() for _ in range(2))
  return {"prefill_s": prefill_s, "prefill_tok_s": batch * prompt_len / prefill_s,
          "decode_tok_s": batch * (new_tokens - 1) / decode_s}


def bench_torch(ref, batch: int, prompt_len: int, new_tokens: int) -> dict[str, float]:
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  rng = np.random.default_rng(batch)
  ids = torch.tensor(rng.integers(3, ref.config.vocab_size, (batch, prompt_len)))
  mask = torch.ones_like(ids)

  def prefill():
    with torch.no_grad():
      return ref(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1).logits

  prefill_s = common.time_calls(prefill, warmup=1, min_seconds=2.0, min_calls=2)

  def generate():
    t0 = time.perf_counter()
    with torch.no_grad():
      ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return time.perf_counter() - t0

  generate()
  total = min(generate() for _ in range(2))
  return {"prefill_s": prefill_s, "prefill_tok_s": batch * prompt_len / prefill_s,
          "decode_tok_s": batch * (new_tokens - 1) / max(total - prefill_s, 1e-9),
          "threads": torch.get_num_threads(), "torch": torch.__version__}


def run(args, log=lambda line: None) -> dict[str, Any]:
  """Measures everything; `log` gets each report line as soon as it is measured."""
  from pathjax.generate import Generator
  use_torch = args.torch
  if use_torch:
    try:
      import torch  # noqa: F401
      import transformers  # noqa: F401
    except ImportError:
      use_torch = False
  module, params, ref = build_models(args.size, use_torch)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  weight_bytes = sum(p.nbytes for p in jax.tree.leaves(params))
  generator = Generator(module, params, eos_ids=[], bucket=16)
  res: dict[str, Any] = {"machine": common.machine_line(), "params": n_params,
                         "weight_bytes": weight_bytes, "prompt_len": args.prompt_len,
                         "new_tokens": args.new_tokens}
  res["matmul_gflops"] = common.matmul_peak_flops(n=args.matmul_size) / 1e9
  res["copy_gbs"] = copy_bandwidth() / 1e9
  res["runs"] = {}
  for line in header_lines(res):
    log(line)
  for batch in args.batch_sizes:
    run_res: dict[str, Any] = {"pathjax": bench_pathjax(generator, batch, args.prompt_len,
                                                        args.new_tokens)}
    pj = run_res["pathjax"]
    pj["prefill_gflops"] = prefill_flops(module, batch, args.prompt_len) / pj["prefill_s"] / 1e9
    floor = batch / (weight_bytes / (res["copy_gbs"] * 1e9))
    run_res["decode_floor_tok_s"] = floor
    if ref is not None:
      run_res["transformers"] = bench_torch(ref, batch, args.prompt_len, args.new_tokens)
    res["runs"][batch] = run_res
    for line in batch_lines(res, batch):
      log(line)
  return res


def header_lines(res: dict[str, Any]) -> list[str]:
  return [res["machine"],
          f"model: random Llama layout, {res['params'] / 1e6:.1f}M parameters "
          f"({res['weight_bytes'] / 2 ** 20:.0f} MiB fp32), prompt {res['prompt_len']}, "
          f"{res['new_tokens']} new tokens",
          f"jax fp32 matmul peak: {res['matmul_gflops']:.1f} GFLOP/s; copy bandwidth "
          f"{res['copy_gbs']:.2f} GB/s"]


def batch_lines(res: dict[str, Any], batch: int) -> list[str]:
  r = res["runs"][batch]
  pj = r["pathjax"]
  lines = [f"batch {batch}: pathjax prefill {pj['prefill_tok_s']:.0f} tok/s "
           f"({pj['prefill_gflops']:.1f} GFLOP/s = {pj['prefill_gflops'] / res['matmul_gflops']:.2f} "
           f"of the matmul peak), decode {pj['decode_tok_s']:.1f} tok/s "
           f"(bandwidth floor {r['decode_floor_tok_s']:.1f} tok/s: ratio "
           f"{pj['decode_tok_s'] / r['decode_floor_tok_s']:.2f})"]
  tf = r.get("transformers")
  if tf:
    lines.append(f"batch {batch}: transformers prefill {tf['prefill_tok_s']:.0f} tok/s, "
                 f"decode {tf['decode_tok_s']:.1f} tok/s (torch {tf['torch']}, "
                 f"{tf['threads']} threads); pathjax/transformers: prefill "
                 f"{pj['prefill_tok_s'] / tf['prefill_tok_s']:.2f}x, decode "
                 f"{pj['decode_tok_s'] / tf['decode_tok_s']:.2f}x")
  return lines


def main(args) -> int:
  res = run(args, log=lambda line: print(line, flush=True))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(res, f, indent=2, default=str)
  return 0
