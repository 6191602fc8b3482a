"""Q-Former parity with transformers' PyTorch Blip2QFormerModel and BERT converter parity.

Tiny random configs (hidden 32, 4 heads, cross-attention every 2 layers over 24-d patch
features). The reference gets 4-D additive float masks: its boolean and padding-mask paths
are buggy in transformers 5.23 (DESIGN.md). Needs torch (the `reference` extra).
"""

import argparse
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity references need torch (pip install -e .[reference])")
transformers = pytest.importorskip("transformers")

from pathjax.convert import bert as bert_conv  # noqa: E402
from pathjax.models import qformer as qf  # noqa: E402

pytestmark = pytest.mark.reference

TOL = 1e-5
VOCAB, WIDTH, HEADS, MLP, LAYERS, ENC, QUERIES, MAXPOS = 99, 32, 4, 48, 4, 24, 3, 20
B, N, T = 3, 9, 7
NEG = -1e9  # additive "minus infinity" for the reference masks (exp underflows to exactly 0)


def _randomize(model, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if ("LayerNorm" in name or "layernorm" in name) and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(0.2 * torch.randn(p.shape, generator=gen))
  return model.eval()


def _blip2_reference(seed=0):
  cfg = transformers.Blip2QFormerConfig(
      vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
      intermediate_size=MLP, hidden_act="gelu", hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0, max_position_embeddings=MAXPOS, layer_norm_eps=1e-12,
      cross_attention_frequency=2, encoder_hidden_size=ENC, use_qformer_text_input=True,
      pad_token_id=0)
  cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = _randomize(transformers.Blip2QFormerModel(cfg), seed)
  from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings
  emb = _randomize(Blip2TextEmbeddings(cfg), seed + 1)
  return model, emb


def _params_from_blip2(model, emb, queries, ln_w, ln_b):
  """Our parameter tree from the reference's tensors (the converter's tensor helpers)."""
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  params = {}  # the passes compared here need no heads (vision_proj, itm_head, lm_head, temp)
  params["query_tokens"] = queries
  params["temp"] = np.array(0.07, np.float32)
  params["ln_vision"] = bert_conv.norm(ln_w, ln_b)
  params["embeddings"] = {
      "word_embeddings": {"embedding": emb.word_embeddings.weight.detach().numpy()},
      "position_embeddings": emb.position_embeddings.weight.detach().numpy(),
      "norm": bert_conv.norm(sd["layernorm.weight"], sd["layernorm.bias"])}
  for i in range(LAYERS):
    p = f"encoder.layer.{i}."
    g = lambda n: sd[p + n]
    layer = {
        "attention": {part: bert_conv.heads_in(g(f"attention.attention.{part}.weight"),
                                               g(f"attention.attention.{part}.bias"), HEADS)
                      for part in ("query", "key", "value")},
        "attention_norm": bert_conv.norm(g("attention.output.LayerNorm.weight"),
                                         g("attention.output.LayerNorm.bias"))}
    layer["attention"]["out"] = bert_conv.heads_out(g("attention.output.dense.weight"),
                                                    g("attention.output.dense.bias"), HEADS)
    for ours, theirs in (("mlp", ""), ("mlp_query", "_query")):
      layer[ours] = {"fc1": bert_conv.linear(g(f"intermediate{theirs}.dense.weight"),
                                             g(f"intermediate{theirs}.dense.bias")),
                     "fc2": bert_conv.linear(g(f"output{theirs}.dense.weight"),
                                             g(f"output{theirs}.dense.bias"))}
      layer[f"{ours}_norm"] = bert_conv.norm(g(f"output{theirs}.LayerNorm.weight"),
                                             g(f"output{theirs}.LayerNorm.bias"))
    if i % 2 == 0:
      layer["crossattention"] = {
          "query": bert_conv.heads_in(g("crossattention.attention.query.weight"),
                                      g("crossattention.attention.query.bias"), HEADS),
          "out": bert_conv.heads_out(g("crossattention.output.dense.weight"),
                                     g("crossattention.output.dense.bias"), HEADS)}
      layer["crossattention_norm"] = bert_conv.norm(g("crossattention.output.LayerNorm.weight"),
                                                    g("crossattention.output.LayerNorm.bias"))
      params[f"cross_kv_{i}"] = {
          part: bert_conv.heads_in(g(f"crossattention.attention.{part}.weight"),
                                   g(f"crossattention.attention.{part}.bias"), HEADS)
          for part in ("key", "value")}
    params[f"layers_{i}"] = layer
  return params


def _module(**kw):
  base = dict(vocab_size=VOCAB, width=WIDTH, depth=LAYERS, num_heads=HEADS, mlp_dim=MLP,
              max_position=MAXPOS, num_queries=QUERIES, encoder_width=ENC, embed_dim=16,
              cross_attention_frequency=2)
  base.update(kw)
  return qf.QFormer(**base)


def _np_sincos(coords, dim, temperature=10_000.0):
  quarter = dim // 4
  omega = 1.0 / temperature ** (np.arange(quarter, dtype=np.float64) / quarter)
  out = []
  for axis in (0, 1):
    angle = coords[..., axis, None].astype(np.float64) * omega
    out += [np.sin(angle), np.cos(angle)]
  return np.concatenate(out, -1)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  feats = rng.normal(size=(B, N, ENC)).astype(np.float32) * 2 + 0.5
  coords = rng.integers(0, 40, size=(B, N, 2)).astype(np.int32)
  pmask = np.ones((B, N), bool)
  pmask[1, 5:] = False                       # padded slides
  pmask[2, 2:] = False
  ids = rng.integers(1, VOCAB, size=(B, T)).astype(np.int32)
  tmask = np.ones((B, T), bool)
  tmask[0, 4:] = False                       # padded texts
  tmask[2, 6:] = False
  ids[~tmask] = 0
  return feats, coords, pmask, ids, tmask


def _additive(mask):
  return torch.from_numpy(np.where(mask, 0.0, NEG).astype(np.float32))


@pytest.fixture(scope="module")
def setup():
  model, emb = _blip2_reference()
  rng = np.random.default_rng(5)
  queries = (0.5 * rng.normal(size=(QUERIES, WIDTH))).astype(np.float32)
  ln_w = (1 + 0.2 * rng.normal(size=ENC)).astype(np.float32)
  ln_b = (0.2 * rng.normal(size=ENC)).astype(np.float32)
  params = _params_from_blip2(model, emb, queries, ln_w, ln_b)
  feats, coords, pmask, ids, tmask = _inputs()
  # The reference's encoder states: ln_vision (torch) + our documented sin-cos formula.
  ln = torch.nn.LayerNorm(ENC, eps=1e-5)
  with torch.no_grad():
    ln.weight.copy_(torch.from_numpy(ln_w))
    ln.bias.copy_(torch.from_numpy(ln_b))
    enc = ln(torch.from_numpy(feats)) + torch.from_numpy(_np_sincos(coords, ENC).astype(np.float32))
  return dict(model=model, emb=emb, params=params, queries=queries, enc=enc, feats=feats,
              coords=coords, pmask=pmask, ids=ids, tmask=tmask)


def _ref(s, *, text: bool, queries: bool, self_mask):
  with torch.no_grad():
    ids = torch.from_numpy(s["ids"]).long() if text else None
    q = torch.from_numpy(s["queries"])[None].expand(B, -1, -1) if queries else None
    x = s["emb"](input_ids=ids, query_embeds=q)
    kw = {}
    if queries:
      kw = dict(encoder_hidden_states=s["enc"],
                encoder_attention_mask=_additive(s["pmask"][:, None, None, :]))
    out = s["model"](query_embeds=x, query_length=QUERIES if queries else 0,
                     attention_mask=None if self_mask is None else _additive(self_mask), **kw)
  return out.last_hidden_state.numpy()


def _ours(s, method, *args, **kw):
  m = _module()
  kv = m.apply({"params": s["params"]}, s["feats"], s["coords"], s["pmask"],
               method=qf.QFormer.encode_patches)
  return np.asarray(m.apply({"params": s["params"]}, *[kv if isinstance(a, str) else a for a in args],
                            method=method, **kw))


def _check(ours, ref):
  assert ours.shape == ref.shape
  assert np.abs(ours - ref).max() <= TOL, np.abs(ours - ref).max()


def test_query_only_pass(setup):
  s = setup
  ref = _ref(s, text=False, queries=True, self_mask=np.ones((B, 1, QUERIES, QUERIES), bool))
  _check(_ours(s, qf.QFormer.query_pass, "kv"), ref)


def test_text_only_pass(setup):
  s = setup
  mask = np.broadcast_to(s["tmask"][:, None, None, :], (B, 1, T, T))
  ref = _ref(s, text=True, queries=False, self_mask=mask)
  _check(_ours(s, qf.QFormer.text_pass, s["ids"], s["tmask"]), ref)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "unilm"])
def test_query_text_pass(setup, causal):
  s = setup
  L = QUERIES + T
  keys = np.concatenate([np.ones((B, QUERIES), bool), s["tmask"]], 1)
  allowed = np.ones((L, L), bool)
  if causal:  # LAVIS get_extended_attention_mask(is_decoder=True, has_query=True), by hand
    allowed[:QUERIES, QUERIES:] = False
    allowed[QUERIES:, QUERIES:] = np.tril(np.ones((T, T), bool))
  mask = allowed[None, None] & keys[:, None, None, :]
  ref = _ref(s, text=True, queries=True, self_mask=mask)
  _check(_ours(s, qf.QFormer.multimodal_pass, "kv", s["ids"], s["tmask"], causal=causal), ref)


def test_self_attention_mask_helper_matches_hand_built():
  tmask = np.array([[1, 1, 0], [1, 1, 1]], bool)
  got = np.asarray(qf.self_attention_mask(2, tmask, causal=True))
  assert got.shape == (2, 1, 5, 5)
  want = np.array([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0],
                   [1, 1, 1, 1, 0]], bool)
  np.testing.assert_array_equal(got[0, 0], want)
  want[4, 4] = True
  np.testing.assert_array_equal(got[1, 0], want)
  bi = np.asarray(qf.self_attention_mask(2, tmask, causal=False))
  np.testing.assert_array_equal(bi[0, 0, 0], [1, 1, 1, 1, 0])


def test_sincos_2d_formula():
  coords = np.array([[[0, 0], [3, 7], [120, 45]]], np.int32)
  got = np.asarray(qf.sincos_2d(coords, 16))
  np.testing.assert_allclose(got, _np_sincos(coords, 16), atol=1e-5)
  np.testing.assert_allclose(got[0, 0], [0] * 4 + [1] * 4 + [0] * 4 + [1] * 4)
  with pytest.raises(ValueError, match="divisible by 4"):
    qf.sincos_2d(coords, 10)


# ------------------------------------------------------------------------------ BERT converter

def _bert_dir(tmp_path, *, lm_head=True, seed=0):
  """A tiny random BERT directory: config.json, model.safetensors, a WordPiece tokenizer."""
  cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS,
                                num_attention_heads=HEADS, intermediate_size=MLP,
                                max_position_embeddings=MAXPOS, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0, is_decoder=lm_head)
  cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  cls = transformers.BertLMHeadModel if lm_head else transformers.BertModel
  model = _randomize(cls(cfg), seed)
  if lm_head:
    model.tie_weights()
  d = tmp_path / ("bert_lm" if lm_head else "bert")
  model.save_pretrained(d)
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
  (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
  tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
      sep_token="[SEP]", mask_token="[MASK]")
  fast.save_pretrained(d)
  return d, model


def _convert(tmp_path, bert_dir, *extra):
  from pathjax.convert import cli as convert_cli
  parser = argparse.ArgumentParser()
  convert_cli.register(parser)
  out = tmp_path / "qformer_out"
  args = parser.parse_args(["--bert", str(bert_dir), "--bert-encoder-width", str(ENC),
                            "--bert-queries", str(QUERIES), *extra, "--out", str(out)])
  assert convert_cli.main(args) == 0
  return out


@pytest.mark.slow
def test_bert_converter_lm_head_parity(tmp_path):
  from pathjax.models.model_dir import load_model_dir
  bert_dir, ref = _bert_dir(tmp_path, lm_head=True)
  out = _convert(tmp_path, bert_dir)
  model = load_model_dir(str(out))
  tower = model.towers["qformer"]
  m, params = tower.module, tower.params
  assert m.vocab_size == VOCAB + 1 and m.num_queries == QUERIES and m.encoder_width == ENC
  tok = transformers.AutoTokenizer.from_pretrained(str(out / "tokenizer"))
  assert tok.bos_token == "[DEC]" and tok.convert_tokens_to_ids("[DEC]") == VOCAB
  enc = tok(["w1 w2 w3 w4", "w5 w6"], padding="max_length", max_length=8, return_tensors="np")
  ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(bool)
  with torch.no_grad():
    ref_logits = ref(input_ids=torch.from_numpy(ids).long(),
                     attention_mask=torch.from_numpy(mask.astype(np.int64))).logits.numpy()
  out_text = m.apply({"params": params}, ids, mask, causal=True, method=qf.QFormer.text_pass)
  logits = np.asarray(m.apply({"params": params}, out_text, has_queries=False,
                              method=qf.QFormer.lm_logits))
  assert logits.shape == (2, 8, VOCAB + 1)
  diff = np.abs(logits[..., :VOCAB] - ref_logits)[mask]  # real tokens
  assert diff.max() <= 1e-4, diff.max()
  # query FFN copied from the text FFN; [DEC] row appended, LM bias zero there
  for i in range(LAYERS):
    lay = params[f"layers_{i}"]
    np.testing.assert_array_equal(lay["mlp"]["fc1"]["kernel"], lay["mlp_query"]["fc1"]["kernel"])
    np.testing.assert_array_equal(lay["mlp_norm"]["scale"], lay["mlp_query_norm"]["scale"])
  assert float(params["lm_head"]["bias"][VOCAB]) == 0.0


def test_bert_converter_text_pass_equals_bert_model(tmp_path):
  from pathjax.models.model_dir import load_model_dir
  bert_dir, ref = _bert_dir(tmp_path, lm_head=False)
  logs = []
  from pathjax.convert import bert as bert_lib
  out = tmp_path / "qf"
  bert_lib.convert_bert_dir(str(bert_dir), str(out), encoder_width=ENC,
                            overrides={"num_queries": QUERIES}, log=logs.append)
  assert any("no LM head" in line for line in logs)
  tower = load_model_dir(str(out)).towers["qformer"]
  rng = np.random.default_rng(1)
  ids = rng.integers(5, VOCAB, size=(3, 10)).astype(np.int32)
  mask = np.ones((3, 10), bool)
  mask[1, 6:] = False
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(ids).long(),
               attention_mask=torch.from_numpy(mask.astype(np.int64))).last_hidden_state.numpy()
  got = np.asarray(tower.module.apply({"params": tower.params}, ids, mask,
                                      method=qf.QFormer.text_pass))
  assert np.abs(got - want).max() <= 1e-5, np.abs(got - want).max()


def test_bert_converter_errors(tmp_path, capsys):
  from pathjax.convert import cli as convert_cli
  bert_dir, _ = _bert_dir(tmp_path, lm_head=False)
  cfg = json.loads((bert_dir / "config.json").read_text())
  cfg["hidden_size"] = 64
  (bert_dir / "config.json").write_text(json.dumps(cfg))
  parser = argparse.ArgumentParser()
  convert_cli.register(parser)
  args = parser.parse_args(["--bert", str(bert_dir), "--bert-encoder-width", "24",
                            "--out", str(tmp_path / "x")])
  assert convert_cli.main(args) == 2
  err = capsys.readouterr().err
  assert "shape mismatch" in err and "config.json" in err
  args = parser.parse_args(["--bert", str(tmp_path / "nope"), "--bert-encoder-width", "24",
                            "--out", str(tmp_path / "y")])
  assert convert_cli.main(args) == 2
  assert "no config.json" in capsys.readouterr().err
  assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
