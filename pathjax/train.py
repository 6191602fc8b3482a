"""The recipe-agnostic training loop.

    state = TrainState(step, params, opt_state, rng): the TRAINABLE parameters only, born
            sharded over the config's mesh and checkpointed;
    frozen = the frozen parameters (a separate tree): loaded on every start straight into
             their shardings, never differentiated, never in the optimizer, not checkpointed
             unless `config.checkpoint_frozen`;
    for each step: host batch (Grain) -> global jax.Arrays -> one jitted step (state donated)

Which parameters are frozen is declared by regexes over parameter paths
(`config.optimizer.freeze`, plus a recipe's optional `frozen_patterns()` for whole towers).
The train step folds the rng with the step, computes the recipe's loss on the merged tree and
gradients for the trainable leaves only (for `optimizer.accumulate_steps > 1` as a `lax.scan`
over micro-batches of the global batch, so activation memory scales with the micro-batch and
the accumulation carry holds trainable gradients only), applies the optax transformation from
pathjax.optim and returns metrics that stay on device until a log, eval or checkpoint step
fetches them. Fetched metrics are checked for NaN/Inf.

Initialisation traces from shapes (`recipe.example_batch` returns `jax.ShapeDtypeStruct`s), so
no batch is baked into a program. A recipe's optional `load_pretrained(abstract, wanted)`
returns published weights for some parameter paths, already placed in their shardings; only
the paths it does not supply are initialised randomly (one jitted init whose unused outputs
XLA prunes), so a frozen 7B tower is never initialised and then replaced.

Checkpoints (pathjax.checkpoint) hold the state and the Grain iterator position; a rerun
with the same WORKDIR resumes from the newest good checkpoint and then produces, step for
step, the metrics an uninterrupted run would have. SIGTERM saves and exits cleanly.

Pieces other commands reuse: `TrainState`, `ParamSplit`, `StateLayout`,
`abstract_train_state` (ShapeDtypeStructs with shardings for AOT lowering and restoring),
`create_train_state`, `load_frozen` and `build_train_step` (the jitted step
`(state, frozen, batch) -> (state, metrics)` for given shardings).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import warnings
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
from flax import traverse_util
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pathjax import config_lib, optim, sharding
from pathjax import workdir as workdir_lib
from pathjax.checkpoint import Checkpointer
from pathjax.metrics_log import MetricsLogger, read_metrics
from pathjax.optim import make_optimizer
from pathjax.recipes.base import make_recipe

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
  step: jax.Array       # int32 scalar: completed steps
  params: Any
  opt_state: Any
  rng: jax.Array        # base training key; each step uses fold_in(rng, step)


class NonFiniteError(FloatingPointError):
  """A fetched training metric is NaN or Inf."""


class ConfigMismatchWarning(UserWarning):
  pass


@dataclasses.dataclass
class Evaluator:
  """A periodic evaluation: `fn(params, step) -> {metric: float}` every `every` steps."""
  name: str
  every: int
  fn: Callable[[Any, int], dict]


# ----------------------------------------------------------------------------- state


class ParamSplit:
  """Splits parameter trees into (trainable, frozen) by regexes over '/'-joined paths.

  Both halves keep the nesting of the full tree (a sparse copy each), so optimizer rules,
  logical axis names and checkpoints see the same paths as the full model.
  """

  def __init__(self, patterns: Sequence[str] = ()):
    self.patterns = tuple(patterns)
    self._compiled = optim.compile_patterns(self.patterns)

  def is_frozen(self, path: str) -> bool:
    return optim.matches_any(path, self._compiled)

  def split(self, tree: Any) -> tuple[dict, dict]:
    flat = traverse_util.flatten_dict(tree, sep="/")
    trainable = {p: x for p, x in flat.items() if not self.is_frozen(p)}
    frozen = {p: x for p, x in flat.items() if self.is_frozen(p)}
    return (traverse_util.unflatten_dict(trainable, sep="/"),
            traverse_util.unflatten_dict(frozen, sep="/"))

  @staticmethod
  def merge(trainable: Any, frozen: Any) -> dict:
    flat = traverse_util.flatten_dict(trainable, sep="/")
    flat.update(traverse_util.flatten_dict(frozen, sep="/"))
    return traverse_util.unflatten_dict(flat, sep="/")


def param_split(config, recipe) -> ParamSplit:
  """Frozen = `config.optimizer.freeze` plus the recipe's `frozen_patterns()` (if any)."""
  patterns = tuple(config.optimizer.get("freeze", ()))
  if hasattr(recipe, "frozen_patterns"):
    patterns += tuple(recipe.frozen_patterns())
  return ParamSplit(patterns)


@dataclasses.dataclass
class StateLayout:
  """Abstract (ShapeDtypeStruct) trainable state and frozen tree, with their shardings.

  Nothing is allocated: this is what AOT compilation lowers the train step with, what a
  checkpoint is restored into, and what initialisation and weight loading fill in.
  """
  split: ParamSplit
  state: TrainState            # ShapeDtypeStructs carrying shardings
  state_shardings: TrainState  # NamedShardings
  frozen: dict                 # ShapeDtypeStructs carrying shardings ({} if nothing is frozen)
  frozen_shardings: dict
  init_fn: Callable[[jax.Array], Any]  # seed key -> boxed full parameter tree
  seed_key: jax.Array

  @property
  def params(self) -> dict:
    """All parameters (trainable and frozen) as ShapeDtypeStructs with shardings."""
    return ParamSplit.merge(self.state.params, self.frozen)


def _seed_key(config) -> jax.Array:
  return jax.random.PRNGKey(int(config.seed))


def _init_and_train_keys(seed_key: jax.Array) -> tuple[jax.Array, jax.Array]:
  init_rng, train_rng = jax.random.split(seed_key)
  return init_rng, train_rng


def abstract_train_state(config, recipe, mesh: Mesh, tx: optax.GradientTransformation | None = None
                         ) -> StateLayout:
  """The StateLayout of `config` on `mesh` (traced from shapes only)."""
  if tx is None:
    tx, _ = make_optimizer(config.optimizer, config.total_steps)
  rules = sharding.rules_from_config(config)
  split = param_split(config, recipe)
  batch = recipe.example_batch(int(config.batch_size))

  def init_params(seed_key):
    return recipe.init(_init_and_train_keys(seed_key)[0], batch)

  def init_abstract(seed_key):
    trainable, frozen = split.split(init_params(seed_key))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                       opt_state=tx.init(trainable), rng=_init_and_train_keys(seed_key)[1])
    return state, frozen

  seed_key = _seed_key(config)
  (state, frozen), (state_sh, frozen_sh) = sharding.abstract_with_shardings(
      init_abstract, mesh, rules, seed_key)
  return StateLayout(split=split, state=state, state_shardings=state_sh, frozen=frozen,
                     frozen_shardings=frozen_sh, init_fn=init_params, seed_key=seed_key)


def _flat(tree) -> dict:
  return traverse_util.flatten_dict(tree, sep="/") if tree else {}


def _pretrained(recipe, layout: StateLayout, wanted: set[str]) -> dict[str, jax.Array]:
  """The recipe's published weights for `wanted` paths, checked against the layout."""
  if not wanted or not hasattr(recipe, "load_pretrained"):
    return {}
  abstract = _flat(layout.params)
  loaded = dict(recipe.load_pretrained(abstract, wanted))
  for path, array in loaded.items():
    if path not in wanted:
      raise ValueError(f"recipe.load_pretrained returned {path!r}, which was not asked for")
    want = abstract[path]
    if tuple(array.shape) != tuple(want.shape) or array.dtype != want.dtype:
      raise ValueError(f"pretrained {path}: {array.dtype}{tuple(array.shape)}, the model "
                       f"expects {want.dtype}{tuple(want.shape)}")
  return loaded


def _init_leaves(layout: StateLayout, mesh: Mesh, rules, paths: Sequence[str]) -> dict[str, jax.Array]:
  """Random initial values of `paths` only, each born in its sharding.

  One jitted init returns just these leaves; XLA prunes the initialisers of the rest.
  """
  if not paths:
    return {}
  abstract = _flat(layout.params)

  def init(seed_key):
    with sharding.mesh_context(mesh, rules):
      full = _flat(nn.unbox(layout.init_fn(seed_key)))
    return {p: full[p] for p in paths}

  return jax.jit(init, out_shardings={p: abstract[p].sharding for p in paths})(layout.seed_key)


def load_frozen(config, recipe, mesh: Mesh, layout: StateLayout) -> dict:
  """The frozen tree: published weights where the recipe has them, else the seeded init.

  Called on every start (fresh and resumed): frozen weights are not in checkpoints.
  """
  del config
  rules = sharding.rules_from_config(recipe.config)
  paths = set(_flat(layout.frozen))
  values = _pretrained(recipe, layout, paths)
  values.update(_init_leaves(layout, mesh, rules, sorted(paths - set(values))))
  return traverse_util.unflatten_dict(values, sep="/") if values else {}


def create_train_state(config, recipe, mesh: Mesh, tx: optax.GradientTransformation,
                       layout: StateLayout | None = None) -> tuple[TrainState, dict, StateLayout]:
  """(fresh TrainState, frozen tree, layout): trainable parameters from published weights where
  the recipe has them, else initialised; optimizer state from them; all born sharded."""
  layout = abstract_train_state(config, recipe, mesh, tx) if layout is None else layout
  rules = sharding.rules_from_config(config)
  paths = set(_flat(layout.state.params))
  values = _pretrained(recipe, layout, paths)
  values.update(_init_leaves(layout, mesh, rules, sorted(paths - set(values))))
  params = traverse_util.unflatten_dict(values, sep="/") if values else {}
  opt_state = jax.jit(tx.init, out_shardings=layout.state_shardings.opt_state)(params)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                     rng=jax.device_put(_init_and_train_keys(layout.seed_key)[1],
                                        layout.state_shardings.rng))
  return state, load_frozen(config, recipe, mesh, layout), layout


# ----------------------------------------------------------------------------- step


def _split_micro_batches(x: jax.Array, k: int) -> jax.Array:
  """[B, ...] -> [k, B/k, ...]; micro-batch i takes rows i, i+k, ... so it spans every device."""
  x = x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)
  return nn.with_logical_constraint(x, (None, "act_batch") + (None,) * (x.ndim - 2))


def make_train_step(recipe, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    opt_config) -> Callable[[TrainState, dict, dict], tuple[TrainState, dict]]:
  """The un-jitted step: (state, frozen, global batch) -> (new state, metrics).

  Gradients are taken with respect to the trainable parameters only; the frozen tree enters
  the loss as a constant, so XLA computes no gradient for it.
  """
  accum = int(opt_config.get("accumulate_steps", 1))

  def step_fn(state: TrainState, frozen, batch):
    def loss_fn(params, micro_batch, rng):
      return recipe.loss(ParamSplit.merge(params, frozen), micro_batch, rng, True)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    rng = jax.random.fold_in(state.rng, state.step)
    if accum <= 1:
      (loss, metrics), grads = grad_fn(state.params, batch, rng)
    else:
      micro = jax.tree.map(lambda x: _split_micro_batches(x, accum), batch)
      first = jax.tree.map(lambda x: x[0], micro)
      (loss_shape, metrics_shape), grads_shape = jax.eval_shape(grad_fn, state.params, first, rng)
      zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), tree)

      def body(carry, xs):
        index, micro_batch = xs
        (l, m), g = grad_fn(state.params, micro_batch, jax.random.fold_in(rng, index))
        add = lambda a, b: jax.tree.map(lambda x, y: x + y.astype(jnp.float32), a, b)
        return add(carry, (l, m, g)), None

      total, _ = jax.lax.scan(body, zeros((loss_shape, metrics_shape, grads_shape)),
                              (jnp.arange(accum), micro))
      loss, metrics, grads = jax.tree.map(lambda x: x / accum, total)
      grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics)
    metrics.update(loss=loss, learning_rate=schedule(state.step), grad_norm=optax.tree.norm(grads))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return step_fn


def build_train_step(config, recipe, mesh: Mesh, layout: StateLayout, tx=None, schedule=None):
  """The jitted step `(state, frozen, batch) -> (state, metrics)`, the state donated.

  Logical axis rules and the mesh are entered inside the traced function, so the result can
  be called directly or lowered for AOT with the layout's structs and `jax.ShapeDtypeStruct`
  batches carrying `sharding.batch_sharding(mesh, rules)`.
  """
  if tx is None or schedule is None:
    tx, schedule = make_optimizer(config.optimizer, config.total_steps)
  rules = sharding.rules_for_mesh(sharding.rules_from_config(config), mesh)
  step_fn = make_train_step(recipe, tx, schedule, config.optimizer)

  def step_in_context(state, frozen, batch):
    with sharding.mesh_context(mesh, rules):
      return step_fn(state, frozen, batch)

  return jax.jit(step_in_context,
                 in_shardings=(layout.state_shardings, layout.frozen_shardings,
                               sharding.batch_sharding(mesh, rules)),
                 out_shardings=(layout.state_shardings, NamedSharding(mesh, P())),
                 donate_argnums=(0,))


# ----------------------------------------------------------------------------- helpers


def check_finite(metrics: dict, step: int, last_checkpoint: int | None = None) -> None:
  bad = {k: float(np.asarray(v).ravel()[0]) for k, v in metrics.items()
         if not np.all(np.isfinite(np.asarray(v)))}
  if bad:
    named = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
    where = (f"; the last checkpoint is step {last_checkpoint}" if last_checkpoint is not None
             else "; no checkpoint was written yet")
    raise NonFiniteError(f"non-finite training metrics at step {step}: {named}{where} "
                         "(lower optimizer.lr, raise warmup_steps or set grad_clip_norm)")


def make_evaluators(config, recipe) -> list[Evaluator]:
  """Evaluators for `config.evals` via pathjax.evaluate.registry.make_evaluator."""
  evals = list(config.get("evals", []) or [])
  if not evals:
    return []
  try:
    from pathjax.evaluate.registry import make_evaluator
  except ModuleNotFoundError as e:
    if e.name and e.name.startswith("pathjax.evaluate"):
      raise config_lib.ConfigError(
          "config.evals is set but pathjax.evaluate.registry is not available") from None
    raise
  out = []
  for eval_config in evals:
    if isinstance(eval_config, dict):
      eval_config = ml_collections.ConfigDict(eval_config)
    name = eval_config.get("name", None) or eval_config.kind
    out.append(Evaluator(name=name, every=int(eval_config.every),
                         fn=make_evaluator(eval_config, recipe)))
  return out


def write_config(config, workdir: str) -> None:
  """Writes WORKDIR/config.json; warns naming the fields that differ from a previous run's."""
  path = os.path.join(workdir, "config.json")
  current = json.loads(json.dumps(config_lib.to_json_dict(config), default=str))
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    old = traverse_util.flatten_dict(previous, sep="/")
    new = traverse_util.flatten_dict(current, sep="/")
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
      warnings.warn(
          f"{path}: the config differs from the previous run in this workdir: "
          + ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:20]),
          ConfigMismatchWarning, stacklevel=3)
  with open(path + ".tmp", "w") as f:
    json.dump(current, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)


def check_batch(config, mesh: Mesh) -> None:
  rules = sharding.rules_from_config(config)
  bs, procs = int(config.batch_size), jax.process_count()
  accum = int(config.optimizer.get("accumulate_steps", 1))
  shards = sharding.num_batch_shards(mesh, rules)
  if bs % procs or bs % shards or bs % accum or (bs // accum) % shards:
    raise config_lib.ConfigError(
        f"batch_size {bs} must be divisible by the process count ({procs}), the batch shards "
        f"of the mesh ({shards}) and accumulate_steps ({accum}) times the batch shards")


class _Preemption:
  """SIGTERM -> flag (single process). Multi-process runs rely on JAX's preemption sync point."""

  def __init__(self, checkpointer: Checkpointer):
    self.checkpointer = checkpointer
    self.flag = False
    self._old = None
    self.multi = jax.process_count() > 1
    if not self.multi and threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.flag = True

  def reached(self, step: int) -> bool:
    if self.multi:
      try:
        return bool(self.checkpointer.reached_preemption(step))
      except Exception:  # no distributed preemption service (e.g. gloo CPU runs)
        return False
    return self.flag

  def restore(self) -> None:
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _export(config, recipe, params, workdir: str) -> str | None:
  """WORKDIR/model via pathjax.models.model_dir.save_model_dir.

  `recipe.export(params)` returns either the towers mapping or the keyword arguments of
  save_model_dir (a dict with a "towers" key, plus preprocess/tokenizer_dir/...).
  """
  from pathjax.models import model_dir
  exported = recipe.export(params)
  if not exported:
    warnings.warn(f"config.export_model is set but recipe {config.recipe!r} exports no towers")
    return None
  kwargs = dict(exported) if "towers" in exported else {"towers": exported}
  kwargs.setdefault("source", f"pathjax train ({config.recipe})")
  # The training config, so a model directory describes itself: tools that rebuild the
  # recipe (`pathjax generate --slide`, a frozen encoder of slide_instruct) need nothing else.
  from pathjax.config_lib import to_json_dict
  kwargs["extra_meta"] = {"train_config": json.loads(json.dumps(to_json_dict(config), default=str)),
                          **(kwargs.get("extra_meta") or {})}
  return model_dir.save_model_dir(os.path.join(workdir, "model"), overwrite=True, **kwargs)


# ----------------------------------------------------------------------------- loop


def _checkpoint_item(state, frozen, store_frozen: bool):
  """What a checkpoint holds: the trainable state, plus the frozen tree if asked to."""
  return {"state": state, "frozen": frozen} if store_frozen else state



def train(config, workdir: str, *, recipe=None, devices: Sequence[jax.Device] | None = None,
          evaluators: list[Evaluator] | None = None) -> dict:
  """Trains `config` in `workdir` (resuming from its checkpoints); returns the last metrics.

  `recipe` defaults to make_recipe(config), `devices` to all devices, `evaluators` to those
  built from config.evals. The workdir is checked writable and locked for the run
  (pathjax.workdir.guard); a preempted run's record has `preempted_at`.
  """
  workdir = os.path.abspath(workdir)
  with workdir_lib.guard(config, workdir):
    return _train(config, workdir, recipe=recipe, devices=devices, evaluators=evaluators)


def _train(config, workdir: str, *, recipe, devices, evaluators) -> dict:
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    write_config(config, workdir)
  mesh = sharding.mesh_from_config(config, devices)
  recipe = make_recipe(config, mesh=mesh) if recipe is None else recipe
  rules = sharding.rules_from_config(config)
  check_batch(config, mesh)
  tx, schedule = make_optimizer(config.optimizer, config.total_steps)
  total = int(config.total_steps)
  log_every, ckpt_every = max(int(config.log_every), 1), max(int(config.checkpoint_every), 1)
  evaluators = make_evaluators(config, recipe) if evaluators is None else evaluators

  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=int(config.keep_checkpoints),
                              async_save=bool(config.get("async_checkpoints", True)))
  iterator = recipe.train_iterator(jax.process_index(), jax.process_count())
  layout = abstract_train_state(config, recipe, mesh, tx)
  store_frozen = bool(config.get("checkpoint_frozen", False)) and bool(layout.frozen)
  restored = checkpointer.restore_latest(
      _checkpoint_item(layout.state, layout.frozen, store_frozen), iterator)
  if restored is None:
    state, frozen, _ = create_train_state(config, recipe, mesh, tx, layout)
    start = 0
  elif store_frozen:
    (state, frozen), start = (restored[0]["state"], restored[0]["frozen"]), restored[1]
  else:
    (state, start), frozen = restored, load_frozen(config, recipe, mesh, layout)
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  logger = MetricsLogger(workdir, total, int(config.batch_size), enabled=is_main)
  logger.mark_resume(start)
  if is_main:
    how = f"resumed from checkpoint step {start}" if start else "starting from scratch"
    print(f"pathjax train: {how}; {count(state.params):,} trainable and {count(frozen):,} "
          f"frozen parameters; mesh {dict(mesh.shape)}; {total} steps; workdir {workdir}",
          flush=True)
  train_step = build_train_step(config, recipe, mesh, layout, tx, schedule)
  preemption = _Preemption(checkpointer)
  # A finished run rerun returns its last logged metrics (process 0; others return {}).
  record: dict = (read_metrics(workdir) or [{}])[-1] if is_main and start >= total else {}
  logger.start(start)
  try:
    with jax.set_mesh(mesh):
      for step in range(start, total):
        batch = sharding.make_global_batch(next(iterator), mesh, rules)
        state, metrics = train_step(state, frozen, batch)
        checkpointer.check_saved()  # a failed background save stops the run here
        done = step + 1
        is_log = done % log_every == 0 or done == total
        is_ckpt = done % ckpt_every == 0 or done == total
        due = [e for e in evaluators if done % e.every == 0 or done == total]
        preempted = preemption.reached(done)
        if is_log or is_ckpt or due or preempted:
          host = {k: float(v) for k, v in jax.device_get(metrics).items()}
          check_finite(host, done, checkpointer.latest_step())
          for evaluator in due:  # keys without a "/" get the evaluator's name as prefix
            params = ParamSplit.merge(state.params, frozen)
            host.update({(k if "/" in k else f"{evaluator.name}/{k}"): float(v)
                         for k, v in evaluator.fn(params, done).items()})
          if is_log or due:
            record = logger.log(done, host)
        if is_ckpt or preempted:
          checkpointer.save(done, _checkpoint_item(state, frozen, store_frozen), iterator)
        if preempted:
          if is_main:
            print(f"pathjax train: preempted (SIGTERM); saved step {done} and stopped", flush=True)
          record = dict(record, preempted_at=done)
          break
  finally:
    preemption.restore()
    checkpointer.close()
    logger.close()
  if bool(config.get("export_model", False)) and not record.get("preempted_at"):
    # Every process takes part in gathering parameters sharded across hosts; one writes.
    params = ParamSplit.merge(state.params, frozen)
    params = (multihost_utils.process_allgather(params) if jax.process_count() > 1
              else jax.device_get(params))
    if is_main:
      _export(config, recipe, params, workdir)
  return record
