"""`pathjax chat --model DIR --slide ID [--embeddings DIR] [--question "..."]`: answers
questions about one slide with a slide chat model (an export of configs/pathflip.py:
frozen encoder -> projector -> LLM), streaming the answer. Without --question it reads
questions from stdin, one a line, as one conversation (the slide is shown in the first turn)
until end of input or an empty line."""

from __future__ import annotations

import sys


def register(parser) -> None:
  parser.add_argument("--model", required=True, metavar="DIR",
                      help="a slide chat model directory (WORKDIR/model of configs/pathflip.py)")
  parser.add_argument("--slide", required=True, metavar="ID", help="slide id in the embeddings")
  parser.add_argument("--embeddings", metavar="DIR", default=None,
                      help="a `pathjax embed-slides` directory (default: the one the model trained on)")
  parser.add_argument("--question", default=None, help="one question (default: read stdin)")
  parser.add_argument("--max-new-tokens", type=int, default=128)
  parser.add_argument("--max-patches", type=int, default=None,
                      help="patches of the slide given to the encoder (default: the training limit)")


def _stream(recipe):
  """An on_token callback printing the decoded answer as it grows."""
  generated: list[int] = []
  shown = [""]

  def on_token(tokens):
    if tokens[0] < 0:
      return
    generated.append(int(tokens[0]))
    text = recipe.chat.decode(generated)
    if text.startswith(shown[0]):
      sys.stdout.write(text[len(shown[0]):])
      sys.stdout.flush()
      shown[0] = text
  return on_token, shown


def main(args) -> int:
  from pathjax.config_lib import ConfigError
  from pathjax.input.instructions import IMAGE
  from pathjax.recipes.pathalign import slide_arrays
  from pathjax.recipes.slide_instruct import load_chat_model
  import numpy as np
  try:
    recipe, params = load_chat_model(args.model, embeddings=args.embeddings,
                                     max_patches=args.max_patches)
    emb = recipe.embeddings
    if args.slide not in set(emb.slide_ids):
      some = ", ".join(sorted(emb.slide_ids)[:5])
      raise ConfigError(f"slide {args.slide!r} is not in the embeddings {emb.directory} "
                        f"({len(emb.slide_ids)} slides, e.g. {some}); pass --embeddings DIR")
  except ConfigError as e:
    print(f"pathjax chat: error: {e}", file=sys.stderr)
    return 2
  sf = emb[args.slide]
  m = min(int(recipe.config.data.max_patches), len(sf.features))
  arr = slide_arrays(sf.features, sf.grid, m, None, np.float32)
  recipe._m = m
  feats, coords, mask = (arr[k][None] for k in ("features", "coords", "patch_mask"))
  questions = [args.question] if args.question is not None else None
  conversation: list[dict] = []
  interactive = questions is None
  while True:
    if interactive:
      if sys.stdin.isatty():
        sys.stdout.write("> ")
        sys.stdout.flush()
      line = sys.stdin.readline()
      if not line or not line.strip():
        break
      q = line.strip()
    else:
      if not questions:
        break
      q = questions.pop(0)
    content = q if conversation else (q if IMAGE in q else f"{IMAGE}\n{q}")
    conversation.append({"role": "user", "content": content})
    on_token, shown = _stream(recipe)
    answer = recipe.answer(params, feats, coords, mask, [conversation],
                           max_new_tokens=args.max_new_tokens, on_token=on_token)[0]
    sys.stdout.write((answer[len(shown[0]):] if answer.startswith(shown[0]) else "\n" + answer) + "\n")
    sys.stdout.flush()
    conversation.append({"role": "assistant", "content": answer})
  return 0
