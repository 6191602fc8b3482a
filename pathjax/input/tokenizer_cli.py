"""`pathjax tokenizer train --captions FILE [FILE ...] --out DIR --vocab-size N`.

Trains a CLIP-compatible byte-level BPE tokenizer on the "caption" field of JSON-lines
caption files (read line by line; malformed lines are skipped and counted) and saves a
directory that `AutoTokenizer.from_pretrained(DIR)` loads. The smoke demo uses it because
QuiltNet's tokenizer cannot be downloaded offline.
"""

from __future__ import annotations

import glob
import json
import os
import sys


def register(parser):
  sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
  train = sub.add_parser("train", help="train a BPE tokenizer on captions or reports")
  train.add_argument("--captions", nargs="+", required=True,
                     help="JSON-lines files (or globs) with a caption field per line")
  train.add_argument("--out", required=True, help="output directory")
  train.add_argument("--vocab-size", type=int, default=8192, help="upper bound, specials included")
  train.add_argument("--field", default="caption", help="JSON field holding the text")
  train.add_argument("--context-length", type=int, default=77)
  train.add_argument("--min-frequency", type=int, default=2)
  train.add_argument("--kind", choices=["clip", "causal", "wordpiece"], default="clip",
                     help="clip: lowercased CLIP-style ids for text towers; causal: a GPT-2-style "
                     "byte-level BPE for decoder LLMs (case kept, <s> prepended, </s> to stop); "
                     "wordpiece: BERT-style with [CLS] [SEP] [PAD] [DEC] for the PathAlign "
                     "Q-Former (e.g. --field report)")


def _count_lines(paths, field):
  good = bad = 0
  for path in paths:
    with open(path, encoding="utf-8", errors="replace") as f:
      for line in f:
        if not line.strip():
          continue
        try:
          record = json.loads(line)
          ok = isinstance(record, dict) and isinstance(record.get(field), str) and record[field]
        except json.JSONDecodeError:
          ok = False
        good, bad = (good + 1, bad) if ok else (good, bad + 1)
  return good, bad


def main(args) -> int:
  from pathjax.input import tokenize
  paths = []
  for pattern in args.captions:
    matched = sorted(glob.glob(pattern))
    paths.extend(matched if matched else [pattern])
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    print(f"pathjax tokenizer: no such caption file(s): {', '.join(missing)}", file=sys.stderr)
    return 2
  good, bad = _count_lines(paths, args.field)
  if not good:
    print(f"pathjax tokenizer: no line with a non-empty {args.field!r} field in {paths}",
          file=sys.stderr)
    return 2
  if args.kind == "wordpiece":
    try:
      tokenize.train_wordpiece_tokenizer(tokenize.read_caption_texts(paths, args.field), args.out,
                                         args.vocab_size)
    except OSError as e:
      print(f"pathjax tokenizer: cannot write {e.filename or args.out}: {e.strerror or e}; choose "
            "an --out you can write to", file=sys.stderr)
      return 2
    print(f"trained a WordPiece tokenizer on {good} texts from {len(paths)} file(s) ({bad} lines "
          f"skipped) -> {args.out}")
    return 0
  minimum = tokenize.min_vocab_size() if args.kind == "clip" else tokenize.min_causal_vocab_size()
  if args.vocab_size < minimum:
    what = "their end-of-word forms and " if args.kind == "clip" else ""
    print(f"pathjax tokenizer: --vocab-size {args.vocab_size} is too small: a byte-level BPE "
          f"vocabulary needs at least {minimum} (256 bytes, {what}3 special "
          f"tokens); pass --vocab-size {minimum} or more", file=sys.stderr)
    return 2
  try:
    if args.kind == "causal":
      tokenize.train_causal_tokenizer(tokenize.read_caption_texts(paths, args.field), args.out,
                                      args.vocab_size, min_frequency=args.min_frequency)
      from transformers import AutoTokenizer
      tok = AutoTokenizer.from_pretrained(args.out, local_files_only=True)
      print(f"trained on {good} texts from {len(paths)} file(s) ({bad} lines skipped); vocab "
            f"{len(tok)}, bos {tok.bos_token_id}, eos {tok.eos_token_id}, pad {tok.pad_token_id} "
            f"-> {args.out}")
      return 0
    tokenize.train_bpe_tokenizer(tokenize.read_caption_texts(paths, args.field), args.out,
                                 args.vocab_size, context_length=args.context_length,
                                 min_frequency=args.min_frequency)
  except OSError as e:
    print(f"pathjax tokenizer: cannot write {e.filename or args.out}: {e.strerror or e}; choose "
          "an --out you can write to", file=sys.stderr)
    return 2
  tok = tokenize.TextTokenizer(args.out, args.context_length)
  print(f"trained on {good} captions from {len(paths)} file(s) ({bad} lines skipped); "
        f"vocab {tok.vocab_size}, bos {tok.bos_id}, eos {tok.eos_id}, pad {tok.pad_id} -> {args.out}")
  return 0
