"""AOT compilation for TPU topologies (pathjax.aot, `pathjax compile`) and the sharding plans.

Compiling needs libtpu (`pip install "libtpu==0.0.42.*"`, `make setup-tpu`); those tests skip
without it. The golden test of the MR-PLIP plans needs neither libtpu nor 256 devices: it
builds the abstract train state on an AbstractMesh of the plan's shape.

Regenerate the goldens with PATHJAX_UPDATE_GOLDENS=1 pytest tests/test_aot.py.
"""

import os
import pathlib

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, AxisType

from pathjax import aot, config_lib, sharding, train
from pathjax.recipes.base import make_recipe

GOLDEN_DIR = pathlib.Path(__file__).parent / "golden"
REPO = pathlib.Path(__file__).parent.parent
needs_libtpu = pytest.mark.skipif(
    not aot.libtpu_available(),
    reason='libtpu is not installed (pip install "libtpu==0.0.42.*" or make setup-tpu)')


def _config(spec, **overrides):
  return config_lib.load_config(str(REPO / spec), [f"{k}={v}" for k, v in overrides.items()])


# ----------------------------------------------------------------------------- no libtpu


def test_parse_topology():
  assert aot.parse_topology("v5e:16x16") == ("v5e", "v5e:16x16")
  assert aot.parse_topology("v5e-256") == ("v5e", "v5e:16x16")
  assert aot.parse_topology("v4-128") == ("v4", "v4:4x4x4")
  assert aot.parse_topology("v5litepod-16") == ("v5e", "v5e:4x4")
  with pytest.raises(aot.AOTError, match="needs 3 dimensions"):
    aot.parse_topology("v4:4x4")
  with pytest.raises(aot.AOTError, match="unknown topology"):
    aot.parse_topology("h100:8")
  assert aot.HBM_GIB == {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}


def test_jaxpr_flops_counts_scanned_layers():
  """XLA's cost analysis counts a loop body once; the jaxpr count multiplies by the length."""
  from pathjax.models.vit import ViT
  x = jax.ShapeDtypeStruct((8, 64, 64, 3), jnp.float32)
  counts = []
  for scan in (True, False):
    model = ViT(width=128, depth=4, num_heads=4, mlp_dim=256, image_size=64, scan=scan)
    params = jax.eval_shape(lambda m=model: m.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
    counts.append(aot.jaxpr_flops(lambda p, x, m=model: m.apply(p, x)["pooled"].sum(), params, x))
  tokens, width, mlp = 17, 128, 256
  per_layer = 2 * tokens * (4 * width * width + 2 * width * mlp) + 2 * 2 * tokens * tokens * width
  patch_embed = 2 * 16 * (16 * 16 * 3) * width
  assert counts[0] == counts[1] == 8 * (4 * per_layer + patch_embed)


@pytest.mark.parametrize("plan", ["v5e_256", "v4_128"])
def test_mrplip_plan_shardings_golden(plan):
  """Every state array's partition spec under the chosen plan (tests/golden/mrplip_plan_*.txt)."""
  config = _config(f"configs/mrplip.py:vitl16,{plan}")
  topology = aot.parse_topology(config.plan.topology)[1]
  chips = int(config.plan.chips)
  shape = sharding.resolve_mesh_shape(config.mesh.shape, chips)
  mesh = AbstractMesh(shape, tuple(config.mesh.axes), axis_types=(AxisType.Auto,) * len(shape))
  rules = sharding.rules_from_config(config)
  layout = train.abstract_train_state(config, make_recipe(config), mesh)
  state, shardings = layout.state, layout.state_shardings
  batch = sharding.batch_sharding(mesh, rules)
  lines = [f"# plan {plan}: {topology}, {chips} chips, mesh {dict(mesh.shape)}",
           f"# global batch {config.batch_size} ({config.batch_size // chips} per chip), "
           f"remat {config.model.remat}, batch spec {tuple(batch.spec)}"]
  lines += sharding.describe_shardings(state, shardings)
  text = "\n".join(lines) + "\n"
  path = GOLDEN_DIR / f"mrplip_plan_{plan}.txt"
  if os.environ.get("PATHJAX_UPDATE_GOLDENS") == "1":
    path.write_text(text)
  if not path.exists():
    pytest.fail(f"{path} is missing; create it with PATHJAX_UPDATE_GOLDENS=1 pytest {__file__}")
  assert text == path.read_text(), (
      f"the {plan} plan's shardings changed; if intended, regenerate with "
      "PATHJAX_UPDATE_GOLDENS=1 pytest tests/test_aot.py and review the diff")
  # FSDP: every parameter and optimizer moment of a million elements or more is split
  # over the fsdp axis, so no chip holds a whole copy of a large array.
  leaves = jax.tree_util.tree_leaves_with_path(state)
  specs = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: hasattr(x, "spec"))
  unsplit = [jax.tree_util.keystr(path) for (path, leaf), s in zip(leaves, specs)
             if leaf.size >= 1 << 20 and not any(
                 "fsdp" in ((a,) if isinstance(a, str) else (a or ())) for a in s.spec)]
  assert not unsplit, unsplit


# ----------------------------------------------------------------------------- libtpu


def test_readme_plan_table_and_config_come_from_the_compiled_records():
  """README's vitl16 plan table is `aot.format_rows` of configs/compiled/*.json, and each plan's
  config.plan.compiled reads its record: no compiler figure is kept by hand. Each record is a
  real `pathjax compile --json` of that plan (its config and batch match the plan)."""
  import json
  import re
  paths = sorted((REPO / "configs" / "compiled").glob("mrplip_vitl16_*.json"))
  assert paths, "configs/compiled/ holds no compile record"
  rows = []
  for path in paths:
    row = json.loads(path.read_text())
    plan = path.stem[len("mrplip_vitl16_"):]
    config = _config(f"configs/mrplip.py:vitl16,{plan}")
    assert row["config"] == f"configs/mrplip.py:vitl16,{plan}" and row["overrides"] == []
    assert row["topology"] == config.plan.topology and row["global_batch"] == config.batch_size
    assert row["versions"].get("libtpu") and row["commit"]
    assert config.plan.compiled.startswith(f"{row['memory_gib']:.2f} GiB of {row['hbm_gib']}")
    rows.append(row)
  table = aot.format_rows(rows)
  readme = (REPO / "README.md").read_text()
  pattern = re.compile(r"(<!-- compiled plans: configs/compiled/mrplip_vitl16_\*\.json -->\n)"
                       r"(.*?)(\n<!-- end compiled plans -->)", re.S)
  assert pattern.search(readme), "README lacks the compiled-plans block"
  if os.environ.get("PATHJAX_UPDATE_GOLDENS") == "1":
    readme = pattern.sub(lambda m: m.group(1) + table + m.group(3), readme)
    (REPO / "README.md").write_text(readme)
  assert pattern.search(readme).group(2) == table, (
      "README's plan table differs from configs/compiled/; regenerate it with "
      "PATHJAX_UPDATE_GOLDENS=1 pytest tests/test_aot.py")


@needs_libtpu
def test_toy_compiles_for_v5e_2x2():
  topology = aot.get_topology("v5e:2x2")
  assert topology.num_chips == 4 and topology.hbm_bytes == 16 * aot.GiB
  result = aot.compile_train_step(_config("configs/toy.py"), topology)
  assert result.error is None and result.fits
  assert result.mesh == {"slice": 1, "data": 4, "fsdp": 1, "tensor": 1}
  m = result.memory
  assert m["argument"] > 0 and m["alias"] > 0 and m["total"] > 0
  assert result.flops > 0 and result.model_flops > 0
  # Toy: 8 -> 32 -> 32 -> 4 over 16 examples: forward, weight gradients, and input
  # gradients for every layer but the first (the data needs none).
  fwd = 2 * 16 * (8 * 32 + 32 * 32 + 32 * 4)
  assert result.model_flops == 3 * fwd - 2 * 16 * 8 * 32
  text = aot.format_result(result)
  assert "FITS" in text and "total" in text and "params['proj']['kernel']" in text
  assert result.attention == {} and "attention " not in text  # the toy has no attention
  import dataclasses
  text = aot.format_result(dataclasses.replace(result, attention={"xla 197x197": 2}))
  assert "attention     xla 197x197 (2 traced call sites)" in text


@needs_libtpu
def test_compile_cli_reports_a_step_that_does_not_fit(capsys, tmp_path):
  """A 32k x 32k replicated kernel (4 GiB, x4 with AdamW and grads) cannot fit a 16 GiB v5e;
  the --json record says so and where it came from."""
  import json
  from pathjax import cli
  record = tmp_path / "r.json"
  code = cli.main(["compile", f"--config={REPO / 'configs/toy.py'}", "--topology", "v5e-4",
                   "--config.model.hidden=32768", "--json", str(record)])
  out, err = capsys.readouterr()
  assert code == 1
  assert "does not fit" in err
  assert "memory per chip" in out or "OUT OF MEMORY" in out
  row = json.loads(record.read_text())
  assert row["fits"] is False and row["overrides"] == ["model.hidden=32768"]
  # A --json folder that does not exist is refused before compiling.
  assert cli.main(["compile", f"--config={REPO / 'configs/toy.py'}", "--topology", "v5e-4",
                   "--json", str(tmp_path / "no" / "r.json")]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert row["config"].endswith("configs/toy.py") and row["versions"]["libtpu"]


@needs_libtpu
def test_max_batch_bisects(monkeypatch):
  """The search doubles, then interpolates memory (linear in the batch) between the last fit
  and the first failure; a fake compiler needs batch * 16/11.5 GiB, so 11 is the largest."""
  topology = aot.get_topology("v5e:2x2")
  calls = []

  def fake_compile(config, topo, recipe=None, **_):
    per_chip = config.batch_size // topo.num_chips
    calls.append(per_chip)
    need = per_chip * 16 / 11.5
    fits = need <= 16
    error = None if fits else f"RESOURCE_EXHAUSTED: HLO temporaries ({need:.2f}G) exceed HBM"
    return aot.CompileResult(topology=topo, global_batch=config.batch_size,
                             per_chip_batch=per_chip, mesh={}, compile_seconds=0.0,
                             memory=dict(total=int(need * aot.GiB)) if fits else {}, flops=1.0,
                             largest=[], error=error, oom=not fits)

  monkeypatch.setattr(aot, "compile_train_step", fake_compile)
  best, tried = aot.max_batch(_config("configs/toy.py"), topology, start=1, limit=64)
  assert best.per_chip_batch == 11
  assert calls == [1, 2, 4, 8, 16, 11, 12]
  assert [r.per_chip_batch for r in tried] == sorted(calls)


@needs_libtpu
def test_chunked_contrastive_memory_tracks_the_per_chip_batch():
  """The ring loss's per-chip memory follows the per-chip batch, not the global one."""
  topology = aot.get_topology("v5e:2x2")
  small, big = (aot.compile_contrastive_loss(topology, n, embed_dim=128) for n in (512, 1024))
  assert small.fits and big.fits
  # img and txt shards: 2 x (pairs / 4 chips) x 128 x 4 bytes each (the scalars are constant).
  assert big.memory["argument"] - small.memory["argument"] == 2 * (1024 - 512) // 4 * 128 * 4
  assert big.total_bytes < 2.5 * small.total_bytes
  assert big.model_flops == pytest.approx(4 * small.model_flops, rel=0.01)  # B^2 pairs scored


@needs_libtpu
def test_toy_compiles_for_two_slices():
  """Multi-slice: the "slice" mesh axis goes over DCN (create_hybrid_device_mesh)."""
  topology = aot.get_topology("v5e:2x2", num_slices=2)
  assert topology.num_chips == 8 and {d.slice_index for d in topology.devices} == {0, 1}
  config = _config("configs/toy.py", **{"mesh.shape": "(2,-1,1,1)"})
  result = aot.compile_train_step(config, topology, count_flops=False)
  assert result.fits and result.mesh == {"slice": 2, "data": 4, "fsdp": 1, "tensor": 1}
