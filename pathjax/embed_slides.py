"""`pathjax embed-slides`: every tissue patch of each slide through a frozen patch encoder.

  pathjax embed-slides --model models/uni --slides 'slides/*.svs' --magnification 20 --out emb/
  pathjax embed-slides --model models/uni --records records/ --magnification 20 --out emb/

Per slide: the patches of a regular grid at one magnification whose tissue fraction (the
thumbnail mask of pathjax.wsi.tissue) reaches the threshold (from slides), or every patch of
that magnification in a `pathjax tile` records directory (from records), run through the
model's vision tower ("pooled" features, projected when the tower has a projection) at one
fixed batch shape (the last batch of a slide is padded, so there is one compile), with the
batch sharded over this process's devices (data parallel, parameters replicated).

Output (`DIR/slides/<slide>.safetensors`, one file per slide, written under a temporary name
and renamed): `features` [N, D] float16 or bfloat16, `grid` [N, 2] int32 (column, row of
the patch grid), `coords` [N, 2] int64 (level-0 x, y of each patch's top-left corner),
`tissue` [N] float32; string metadata: slide id, magnification, patch size, level-0 extent,
encoder name and encoder hash (sha256 over the vision tower's parameter names, shapes,
dtypes and bytes). Why one safetensors file per slide rather than ArrayRecord: training
reads a whole slide at a time (up to 10,240 x D features, ~20 MB at D=1024 in float16), by
slide id; a file per slide is that read with no index, safetensors memory-maps it, keeps
bfloat16 as it is (npz cannot), and a finished slide is one atomic rename, which makes
resuming a matter of file existence. ArrayRecord's strength, many small records read at
random, is not what this access pattern needs.

Multi-process: the slide list (sorted) is dealt round-robin over `jax.process_count()`
processes; each embeds its share on its own devices (no collectives: hosts finish their
slides at different times). A done marker per slide (`DIR/.embed/done/<slide>.json`:
status, counts, seconds, reason when skipped) makes a rerun skip finished slides and redo a
slide whose file is missing or half-written. `manifest.json` is written (atomically) by the
process that finds every slide of the run marked (process 0 after a barrier in a
distributed run), so readers refuse an unfinished directory.

Bad slides (unreadable, no tissue, magnification unavailable) are skipped, counted by reason
in the manifest and printed; they never stop the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob as glob_lib
import hashlib
import io
import json
import os
import queue
import sys
import threading
import time
from typing import Any, Iterator, Sequence

import numpy as np

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
OPTIONS_FILE = "embed_options.json"
SLIDES_DIR = "slides"
STATE_DIR = ".embed"
SUFFIX = ".safetensors"
DTYPES = ("float16", "bfloat16")
# Patches per side of one square slide read: one read of 4x4 patches, cut up on the host.
READ_BLOCK = 4


class EmbedSlidesError(ValueError):
  """Bad arguments or an output directory that cannot take this run (message says why)."""


class EncoderMismatchError(EmbedSlidesError):
  """Slide embeddings made by another encoder than the one expected."""


@dataclasses.dataclass(frozen=True)
class EmbedOptions:
  magnification: float
  patch_size: int
  tissue_threshold: float = 0.5
  dtype: str = "float16"
  magnification_override: float | None = None
  source: str = "slides"  # or "records"

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# ------------------------------------------------------------------------------- encoder


@dataclasses.dataclass
class Encoder:
  """A model directory's vision tower as a batched, sharded uint8 -> features function."""

  name: str
  hash: str
  dim: int
  image_size: int
  batch_size: int
  fn: Any          # jitted (params, uint8 [B, S, S, 3]) -> [B, D]
  params: Any      # replicated over the local mesh
  in_sharding: Any

  def __call__(self, images: np.ndarray):
    import jax
    return self.fn(self.params, jax.device_put(images, self.in_sharding))


def vision_hash(model) -> str:
  """sha256 over the vision tower's parameters (names, shapes, dtypes, bytes) and projection."""
  import jax

  from pathjax.tree_utils import flatten
  tower = model.towers["vision"]
  h = hashlib.sha256()
  items = sorted(flatten(jax.device_get(tower.params)).items())
  if tower.projection is not None:
    items.append(("projection", jax.device_get(tower.projection)))
  for name, value in items:
    arr = np.ascontiguousarray(np.asarray(value))
    h.update(f"{name}:{arr.dtype.str}:{arr.shape}".encode())
    h.update(arr.tobytes())
  return h.hexdigest()


def load_encoder(model_dir: str, *, batch_size: int, patch_size: int, devices=None) -> Encoder:
  """The vision tower of `model_dir` with one compiled shape [batch, patch, patch, 3] uint8.

  The batch is sharded over `devices` (default: this process's devices) and rounded up to
  a multiple of their number.
  """
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from pathjax.models.model_dir import ModelDirError, load_model_dir
  model = load_model_dir(model_dir, towers=["vision"])
  if not model.has_vision:
    raise ModelDirError(f"the model in {model_dir} has no vision tower; embed-slides needs a "
                        "patch encoder")
  devices = list(devices if devices is not None else jax.local_devices())
  mesh = Mesh(np.array(devices), ("data",))
  n = len(devices)
  batch_size = max(n, -(-int(batch_size) // n) * n)
  replicated = NamedSharding(mesh, P())
  in_sharding = NamedSharding(mesh, P("data"))
  params = jax.device_put(model.towers["vision"].params, replicated)
  fn = model._image_fn("uint8", (patch_size, patch_size), "pooled")  # the embed path's preprocessing
  probe = jax.eval_shape(fn, params, jax.ShapeDtypeStruct((batch_size, patch_size, patch_size, 3), np.uint8))
  name = str(model.meta.get("source") or os.path.basename(os.path.normpath(model_dir)))
  return Encoder(name=name, hash=vision_hash(model), dim=int(probe.shape[-1]),
                 image_size=model.image_size, batch_size=batch_size, fn=fn, params=params,
                 in_sharding=in_sharding)


# --------------------------------------------------------------------------- slide sources


@dataclasses.dataclass
class SlideJob:
  slide_id: str
  path: str         # slide file, or bag shard for records
  kind: str         # "slide" or "records"


class SkipSlide(Exception):
  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


@dataclasses.dataclass
class PatchPlan:
  """Where a slide's patches are, before any pixels are read."""

  grid: np.ndarray    # [N, 2] int32 (col, row)
  coords: np.ndarray  # [N, 2] int64 level-0 (x, y)
  tissue: np.ndarray  # [N] float32
  extent: float
  info: dict[str, Any]
  read_blocks: Any    # () -> iterator of uint8 [n, S, S, 3] in plan order


def plan_slide(path: str, opts: EmbedOptions) -> PatchPlan:
  """Tissue patches of a slide file at `opts.magnification` (raises SkipSlide)."""
  from pathjax.wsi import grid as grid_lib
  from pathjax.wsi import slide as slide_lib
  from pathjax.wsi import tissue as tissue_lib
  try:
    slide = slide_lib.open_slide(path, magnification_override=opts.magnification_override)
  except slide_lib.SlideError as e:
    raise SkipSlide(e.reason, str(e)) from e
  try:
    slide.check_magnification(opts.magnification)
    extent = grid_lib.root_extent(slide.magnification, (opts.magnification,), opts.patch_size)
    tmap = tissue_lib.slide_tissue_map(slide, extent)
  except slide_lib.SlideError as e:
    slide.close()
    raise SkipSlide(e.reason, str(e)) from e
  except BaseException:
    slide.close()
    raise
  positions = grid_lib.root_positions(*slide.dimensions, extent)
  info = {"magnification_source": slide.magnification_source, "slide_magnification": slide.magnification,
          "mpp": slide.mpp, "dimensions": list(slide.dimensions), "grid_patches": len(positions)}
  if not positions:
    slide.close()
    raise SkipSlide("smaller_than_one_patch", f"{path}: slide {slide.dimensions} is smaller than "
                    f"one patch ({extent} level-0 px at {opts.magnification:g}x)")
  fracs = np.array([tmap.fraction(x, y, extent) for x, y in positions], np.float32)
  keep = fracs >= opts.tissue_threshold
  if not keep.any():
    slide.close()
    raise SkipSlide("no_tissue", f"{path}: no patch reaches tissue fraction {opts.tissue_threshold} "
                    f"({len(positions)} grid patches at {opts.magnification:g}x; the slide is background)")
  coords = np.array(positions, np.int64)[keep]
  grid = (coords // extent).astype(np.int32)
  tissue = fracs[keep]
  # Plan order = read order: blocks of READ_BLOCK x READ_BLOCK grid cells, one read each.
  block = grid // READ_BLOCK
  order = np.lexsort((grid[:, 0], grid[:, 1], block[:, 0], block[:, 1]))
  grid, coords, tissue, block = grid[order], coords[order], tissue[order], block[order]
  ps = opts.patch_size

  def read_blocks() -> Iterator[np.ndarray]:
    with slide:
      start = 0
      while start < len(grid):
        bc, br = int(block[start, 0]), int(block[start, 1])
        stop = start
        while stop < len(grid) and block[stop, 0] == bc and block[stop, 1] == br:
          stop += 1
        arr = slide.read_region(bc * READ_BLOCK * extent, br * READ_BLOCK * extent,
                                READ_BLOCK * extent, READ_BLOCK * ps)
        out = np.empty((stop - start, ps, ps, 3), np.uint8)
        for k, (c, r) in enumerate(grid[start:stop] - block[start] * READ_BLOCK):
          out[k] = arr[r * ps:(r + 1) * ps, c * ps:(c + 1) * ps]
        yield out
        start = stop
  info["extent"] = int(extent)
  return PatchPlan(grid=grid, coords=coords, tissue=tissue, extent=float(extent), info=info,
                   read_blocks=read_blocks)


def plan_records(shard: str, opts: EmbedOptions) -> PatchPlan:
  """The patches at `opts.magnification` of one slide's bag shard (raises SkipSlide)."""
  from pathjax.input import records
  bags = records.BagRecords([shard])
  entries = []  # (bag index, patch index)
  mags, patch_size = set(), None
  for b in range(len(bags)):
    bag = bags.bag(b)
    patch_size = bag.patch_size
    for j, p in enumerate(bag.patches):
      mags.add(p.magnification)
      if abs(p.magnification - opts.magnification) < 1e-6:
        entries.append((b, j, p.x, p.y, p.extent, p.tissue))
  if not entries:
    bags.close()
    raise SkipSlide("magnification_unavailable",
                    f"{shard}: no patches at {opts.magnification:g}x (the records hold "
                    f"{', '.join(f'{m:g}x' for m in sorted(mags)) or 'no patches'})")
  extent = entries[0][4]
  coords = np.array([(e[2], e[3]) for e in entries], np.int64)
  grid = (coords // extent).astype(np.int32)
  ps = opts.patch_size

  def read_blocks():
    from PIL import Image
    by_bag: dict[int, list[int]] = {}  # entries are in bag order already
    for i, e in enumerate(entries):
      by_bag.setdefault(e[0], []).append(i)
    try:
      for b, idx in by_bag.items():
        bag = bags.bag(b)
        out = np.empty((len(idx), ps, ps, 3), np.uint8)
        for k, data in enumerate(bags.jpegs(b, bag, [entries[i][1] for i in idx])):
          img = Image.open(io.BytesIO(data)).convert("RGB")
          if img.size != (ps, ps):
            img = img.resize((ps, ps), Image.Resampling.BILINEAR)
          out[k] = np.asarray(img)
        yield out
    finally:
      bags.close()
  info = {"extent": int(extent), "records_patch_size": patch_size}
  return PatchPlan(grid=grid, coords=coords, tissue=np.array([e[5] for e in entries], np.float32),
                   extent=float(extent), info=info, read_blocks=read_blocks)


def _prefetch(it: Iterator, depth: int = 2) -> Iterator:
  """Runs `it` on a thread `depth` items ahead (host reads overlap device compute)."""
  q: queue.Queue = queue.Queue(depth)
  done = object()
  stop = threading.Event()

  def run():
    try:
      for item in it:
        while not stop.is_set():
          try:
            q.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if stop.is_set():
          return
      q.put(done)
    except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
      q.put(e)
  t = threading.Thread(target=run, daemon=True)
  t.start()
  try:
    while True:
      item = q.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()


def patch_batches(plan: PatchPlan, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
  """Fixed-shape uint8 batches [batch, S, S, 3] in plan order and the real count of each
  (the last batch is zero-padded)."""
  parts: list[np.ndarray] = []
  held = 0
  for pixels in plan.read_blocks():
    parts.append(pixels)
    held += len(pixels)
    if held >= batch_size:
      buf = np.concatenate(parts)
      n_full = len(buf) // batch_size * batch_size
      for s in range(0, n_full, batch_size):
        yield buf[s:s + batch_size], batch_size
      parts, held = [buf[n_full:]], len(buf) - n_full
  if held:
    buf = np.concatenate(parts)
    pad = np.zeros((batch_size - held,) + buf.shape[1:], np.uint8)
    yield np.concatenate([buf, pad]), held


# ------------------------------------------------------------------------------- writing


def safe_name(slide_id: str) -> str:
  from pathjax.input.tile import safe_name as tile_safe_name
  return tile_safe_name(slide_id)


def slide_file(out_dir: str, slide_id: str) -> str:
  return os.path.join(out_dir, SLIDES_DIR, safe_name(slide_id) + SUFFIX)


def _marker_path(out_dir: str, slide_id: str) -> str:
  return os.path.join(out_dir, STATE_DIR, "done", safe_name(slide_id) + ".json")


def _atomic_json(path: str, data: Any) -> None:
  from pathjax.input.records import atomic_write_text
  os.makedirs(os.path.dirname(path), exist_ok=True)
  atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))


def _np_dtype(name: str):
  if name == "bfloat16":
    import ml_dtypes
    return ml_dtypes.bfloat16
  return np.float16


def _slide_events(jobs: Sequence[SlideJob], opts: EmbedOptions, batch_size: int) -> Iterator[tuple]:
  """("start", job, plan, t0) / ("batch", job, pixels, real) / ("end", job) /
  ("fail", job, exception, t0) for each slide in turn: planning and reading of the next slide
  run (on the prefetch thread) while the device still works on the last batches of this one."""
  for job in jobs:
    t0 = time.perf_counter()
    try:
      plan = (plan_slide if job.kind == "slide" else plan_records)(job.path, opts)
    except Exception as e:  # noqa: BLE001 - reported per slide by the consumer
      yield ("fail", job, e, t0)
      continue
    yield ("start", job, plan, t0)
    try:
      for batch, real in patch_batches(plan, batch_size):
        yield ("batch", job, batch, real)
    except Exception as e:  # noqa: BLE001
      yield ("fail", job, e, t0)
      continue
    yield ("end", job)


def _skip_stats(stats: dict, e: BaseException) -> None:
  from pathjax.wsi.slide import SlideError
  if isinstance(e, SkipSlide):
    stats.update(status="skipped", reason=e.reason, message=str(e))
  else:
    reason = e.reason if isinstance(e, SlideError) else "error"
    stats.update(status="skipped", reason=reason, message=f"{type(e).__name__}: {e}")


def embed_jobs(jobs: Sequence[SlideJob], encoder: Encoder, opts: EmbedOptions, out_dir: str,
               on_done=None) -> list[dict[str, Any]]:
  """Embeds slides in order, each into its file with its done marker; returns the markers.

  Never raises for a bad slide: its marker says `status: skipped` with the reason. Host
  reads run one prefetch thread ahead, across slide boundaries; one device result stays in
  flight while the next batch is dispatched.
  """
  import jax

  from pathjax.convert.safetensors_io import save_safetensors
  results: list[dict[str, Any]] = []
  state: dict[str, Any] = {}
  pending: list[tuple] = []  # (device result, slide state, position, real)

  def retire(item):
    out, st, p, r = item
    st["feats"][p:p + r] = np.asarray(jax.device_get(out))[:r].astype(st["feats"].dtype)

  def finish(st: dict, error: BaseException | None = None) -> None:
    job, stats = st["job"], st["stats"]
    if error is not None:
      _skip_stats(stats, error)
    if stats["status"] == "done":
      plan = st["plan"]
      path = slide_file(out_dir, job.slide_id)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      tmp = f"{path}.tmp-{os.getpid()}"
      meta = {"format_version": str(FORMAT_VERSION), "slide_id": job.slide_id,
              "magnification": f"{opts.magnification:g}", "patch_size": str(opts.patch_size),
              "extent": f"{plan.extent:g}", "encoder": encoder.name, "encoder_hash": encoder.hash,
              "dim": str(encoder.dim), "dtype": opts.dtype, "source": job.path}
      save_safetensors({"features": st["feats"], "grid": plan.grid, "coords": plan.coords,
                        "tissue": plan.tissue}, tmp, metadata=meta)
      os.replace(tmp, path)
      stats.update(patches=len(plan.grid), file=os.path.relpath(path, out_dir),
                   bytes=os.path.getsize(path),
                   read_and_embed_seconds=round(time.perf_counter() - st["t_read"], 3), **plan.info)
    else:
      stats["patches"] = 0
    stats["seconds"] = round(time.perf_counter() - st["t0"], 3)
    _atomic_json(_marker_path(out_dir, job.slide_id), stats)
    results.append(stats)
    if on_done is not None:
      on_done(stats)

  def new_state(job, t0):
    return {"job": job, "t0": t0, "t_read": time.perf_counter(), "pos": 0,
            "stats": {"slide_id": job.slide_id, "path": job.path, "status": "done",
                      "encoder_hash": encoder.hash, "options": opts.to_json()}}

  for event in _prefetch(_slide_events(jobs, opts, encoder.batch_size)):
    kind, job = event[0], event[1]
    if kind == "fail":
      st = state.pop(job.slide_id, None) or new_state(job, event[3])
      pending[:] = [item for item in pending if item[1] is not st]
      finish(st, event[2])
    elif kind == "start":
      st = state[job.slide_id] = new_state(job, event[3])
      st["plan"] = event[2]
      st["feats"] = np.empty((len(event[2].grid), encoder.dim), _np_dtype(opts.dtype))
    elif kind == "batch":
      st = state[job.slide_id]
      pending.append((encoder(event[2]), st, st["pos"], event[3]))
      st["pos"] += event[3]
      while len(pending) > 1:
        retire(pending.pop(0))
    else:  # end: fetch this slide's remaining results, write it
      st = state.pop(job.slide_id)
      while pending:
        retire(pending.pop(0))
      error = None
      if st["pos"] != len(st["plan"].grid):
        error = RuntimeError(f"{job.path}: embedded {st['pos']} of {len(st['plan'].grid)} patches")
      finish(st, error)
  return results


def embed_one(job: SlideJob, encoder: Encoder, opts: EmbedOptions, out_dir: str) -> dict[str, Any]:
  """Embeds one slide (see embed_jobs); returns its marker."""
  return embed_jobs([job], encoder, opts, out_dir)[0]


def _valid_marker(out_dir: str, job: SlideJob, opts: EmbedOptions, encoder_hash: str) -> dict | None:
  try:
    with open(_marker_path(out_dir, job.slide_id), encoding="utf-8") as f:
      marker = json.load(f)
  except (OSError, ValueError):
    return None
  if (marker.get("options") != opts.to_json() or marker.get("encoder_hash") != encoder_hash
      or marker.get("path") != job.path):
    return None
  if marker.get("status") == "done":
    path = os.path.join(out_dir, marker.get("file") or "")
    if not os.path.isfile(path) or os.path.getsize(path) != marker.get("bytes"):
      return None
  return marker


# ---------------------------------------------------------------------------------- runs


def list_jobs(slides: str | Sequence[str] | None = None, records_dir: str | None = None) -> list[SlideJob]:
  """Every slide of the run, sorted by slide id (the same list on every process)."""
  if (slides is None) == (records_dir is None):
    raise EmbedSlidesError("give either slides (a glob or files) or a records directory")
  jobs: list[SlideJob] = []
  if slides is not None:
    from pathjax.input.tile import expand_slides
    from pathjax.wsi.slide import slide_id_from_path
    paths = expand_slides(slides)
    if not paths:
      raise EmbedSlidesError(f"no slide files match {slides!r}")
    jobs = [SlideJob(slide_id_from_path(p), p, "slide") for p in paths]
  else:
    from pathjax.input import records
    try:
      _, manifest = records.open_records(records_dir)
    except FileNotFoundError as e:
      raise EmbedSlidesError(str(e)) from e
    for entry in manifest.get("slides", []):
      if entry.get("status") == "done" and entry.get("shard"):
        jobs.append(SlideJob(entry["slide_id"], os.path.abspath(os.path.join(records_dir, entry["shard"])),
                             "records"))
    if not jobs:
      raise EmbedSlidesError(f"{records_dir}: the records manifest lists no tiled slides")
  ids: dict[str, str] = {}
  for j in jobs:
    if j.slide_id in ids:
      raise EmbedSlidesError(f"slide id {j.slide_id!r} is both {ids[j.slide_id]} and {j.path}; "
                             "embeddings are keyed by slide id, so ids must be unique")
    ids[j.slide_id] = j.path
  return sorted(jobs, key=lambda j: j.slide_id)


def process_share(jobs: Sequence[SlideJob], process_index: int, process_count: int) -> list[SlideJob]:
  """This process's slides: round-robin over the sorted list, so shares are disjoint."""
  if not 0 <= process_index < process_count:
    raise EmbedSlidesError(f"process index {process_index} outside [0, {process_count})")
  return list(jobs[process_index::process_count])


def _check_options(out_dir: str, opts: EmbedOptions, encoder: Encoder) -> None:
  """Refuses an output directory made with another encoder or other options."""
  path = os.path.join(out_dir, OPTIONS_FILE)
  mine = {"options": opts.to_json(), "encoder": encoder.name, "encoder_hash": encoder.hash,
          "dim": encoder.dim, "format_version": FORMAT_VERSION}
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      theirs = json.load(f)
    if theirs.get("encoder_hash") != encoder.hash or theirs.get("dim") != encoder.dim:
      raise EncoderMismatchError(
          f"{out_dir} holds embeddings from encoder {theirs.get('encoder')!r} (hash "
          f"{str(theirs.get('encoder_hash'))[:12]}, dim {theirs.get('dim')}); this run's encoder is "
          f"{encoder.name!r} (hash {encoder.hash[:12]}, dim {encoder.dim}); use a new --out")
    if theirs.get("options") != mine["options"]:
      old, new = theirs.get("options") or {}, mine["options"]
      diff = ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now"
                       for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
      raise EmbedSlidesError(f"{out_dir} was made with other options ({diff}); use a new --out "
                             "or the same options")
    return
  _atomic_json(path, mine)


def finalize(out_dir: str, jobs: Sequence[SlideJob], opts: EmbedOptions, encoder_name: str,
             encoder_hash: str, dim: int, extra: dict | None = None) -> dict | None:
  """Writes manifest.json when every slide of the run has a valid marker; else None."""
  markers = []
  for j in jobs:
    m = _valid_marker(out_dir, j, opts, encoder_hash)
    if m is None:
      return None
    markers.append(m)
  done = [m for m in markers if m["status"] == "done"]
  skipped = [m for m in markers if m["status"] != "done"]
  by_reason: dict[str, int] = {}
  for m in skipped:
    by_reason[m.get("reason", "error")] = by_reason.get(m.get("reason", "error"), 0) + 1
  seconds = [m.get("read_and_embed_seconds", 0.0) for m in done]
  manifest = {
      "format_version": FORMAT_VERSION, "encoder": encoder_name, "encoder_hash": encoder_hash,
      "dim": dim, "dtype": opts.dtype, "magnification": opts.magnification,
      "patch_size": opts.patch_size, "options": opts.to_json(),
      "counts": {"slides": len(jobs), "slides_embedded": len(done), "slides_skipped": len(skipped),
                 "patches": int(sum(m["patches"] for m in done)),
                 "embed_seconds": round(float(sum(seconds)), 3)},
      "skipped": {"by_reason": by_reason,
                  "slides": [{"slide": m["slide_id"], "path": m["path"], "reason": m.get("reason"),
                              "message": m.get("message", "")} for m in skipped]},
      "slides": [{k: m.get(k) for k in ("slide_id", "path", "status", "reason", "file", "patches",
                                        "bytes", "seconds", "read_and_embed_seconds", "extent",
                                        "dimensions") if k in m} for m in markers],
      "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
      **(extra or {}),
  }
  _atomic_json(os.path.join(out_dir, MANIFEST), manifest)
  return manifest


def embed_slides(model_dir: str, out_dir: str, *, magnification: float,
                 slides: str | Sequence[str] | None = None, records_dir: str | None = None,
                 batch_size: int = 64, dtype: str = "float16", tissue_threshold: float = 0.5,
                 patch_size: int | None = None, magnification_override: float | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 barrier: bool | None = None, progress: bool = True, encoder: Encoder | None = None,
                 log=None) -> dict[str, Any]:
  """Embeds this process's share of the slides into `out_dir`; returns a summary.

  The summary has this process's counts and, when this process wrote it, the manifest.
  `process_index/process_count` default to JAX's; `barrier` (default: when JAX runs more
  than one process) waits for every process before process 0 writes the manifest.
  """
  import jax
  log = log or (lambda s: print(s, file=sys.stderr, flush=True))
  if dtype not in DTYPES:
    raise EmbedSlidesError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
  if not magnification > 0:
    raise EmbedSlidesError(f"--magnification must be > 0, got {magnification}")
  if not 0 <= tissue_threshold <= 1:
    raise EmbedSlidesError(f"--tissue-threshold must be in [0, 1], got {tissue_threshold}")
  jobs = list_jobs(slides, records_dir)
  if encoder is None:
    from pathjax.models.model_dir import read_model_json
    meta = read_model_json(model_dir)
    size = patch_size or int((meta.get("preprocess") or {}).get("image_size")
                             or meta["towers"].get("vision", {}).get("config", {}).get("image_size", 224))
    encoder = load_encoder(model_dir, batch_size=batch_size, patch_size=size)
  size = patch_size or encoder.image_size
  opts = EmbedOptions(magnification=float(magnification), patch_size=int(size),
                      tissue_threshold=float(tissue_threshold), dtype=dtype,
                      magnification_override=None if magnification_override is None else float(magnification_override),
                      source="slides" if slides is not None else "records")
  pi = jax.process_index() if process_index is None else int(process_index)
  pc = jax.process_count() if process_count is None else int(process_count)
  mine = process_share(jobs, pi, pc)
  os.makedirs(out_dir, exist_ok=True)
  _check_options(out_dir, opts, encoder)
  todo, resumed = [], 0
  for j in mine:
    if _valid_marker(out_dir, j, opts, encoder.hash) is not None:
      resumed += 1
    else:
      todo.append(j)
  if todo:
    manifest_path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(manifest_path):
      os.remove(manifest_path)
    for stale in glob_lib.glob(os.path.join(out_dir, SLIDES_DIR, f"*{SUFFIX}.tmp-*")):
      try:
        os.remove(stale)  # half-written files of a killed run
      except FileNotFoundError:
        pass
  log(f"embed-slides: process {pi}/{pc}: {len(mine)} of {len(jobs)} slides, {resumed} already done, "
      f"{len(todo)} to embed; encoder {encoder.name} (dim {encoder.dim}, hash {encoder.hash[:12]}), "
      f"{opts.magnification:g}x, {opts.patch_size} px, batch {encoder.batch_size} over "
      f"{encoder.in_sharding.mesh.size} device(s)")
  t0 = time.perf_counter()
  counts = {"slides": len(mine), "resumed": resumed, "embedded": 0, "skipped": 0, "patches": 0}

  def on_done(m):
    if m["status"] == "done":
      counts["embedded"] += 1
      counts["patches"] += m["patches"]
      rate = m["patches"] / max(m.get("read_and_embed_seconds", 0) or 1e-9, 1e-9)
      what = f"{m['patches']} patches in {m['seconds']:.1f}s ({rate:.0f} patches/s)"
    else:
      counts["skipped"] += 1
      what = f"skipped ({m['reason']}): {m.get('message', '')}"
    if progress:
      log(f"[{counts['embedded'] + counts['skipped']}/{len(todo)}] {m['slide_id']}: {what}")
  embed_jobs(todo, encoder, opts, out_dir, on_done=on_done)
  counts["seconds"] = round(time.perf_counter() - t0, 3)
  _atomic_json(os.path.join(out_dir, STATE_DIR, f"process-{pi:05d}-of-{pc:05d}.json"), counts)
  if barrier is None:
    barrier = jax.process_count() > 1
  if barrier:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("pathjax embed-slides finished")
  manifest = None
  if not barrier or pi == 0:
    manifest = finalize(out_dir, jobs, opts, encoder.name, encoder.hash, encoder.dim,
                        extra={"process_count": pc})
  return {"process_index": pi, "process_count": pc, "counts": counts, "manifest": manifest}


# ------------------------------------------------------------------------------- reading


@dataclasses.dataclass
class SlideFeatures:
  slide_id: str
  features: np.ndarray  # [N, D] float16 / bfloat16
  grid: np.ndarray      # [N, 2] int32 (col, row)
  coords: np.ndarray    # [N, 2] int64 level-0 (x, y)
  tissue: np.ndarray    # [N] float32
  magnification: float


class SlideEmbeddings:
  """Random access by slide id to a finished `embed-slides` directory (picklable)."""

  def __init__(self, directory: str, manifest: dict[str, Any]):
    self.directory = directory
    self.manifest = manifest
    self.encoder = manifest["encoder"]
    self.encoder_hash = manifest["encoder_hash"]
    self.dim = int(manifest["dim"])
    self.dtype = manifest["dtype"]
    self.magnification = float(manifest["magnification"])
    self._files = {s["slide_id"]: os.path.join(directory, s["file"])
                   for s in manifest["slides"] if s.get("status") == "done"}
    self.slide_ids = sorted(self._files)

  def __len__(self) -> int:
    return len(self.slide_ids)

  def __contains__(self, slide_id: str) -> bool:
    return slide_id in self._files

  def __getitem__(self, slide_id: str) -> SlideFeatures:
    return self.load(slide_id)

  def load(self, slide_id: str) -> SlideFeatures:
    from safetensors import safe_open
    path = self._files.get(slide_id)
    if path is None:
      raise KeyError(f"slide {slide_id!r} is not in {self.directory} ({len(self)} slides embedded; "
                     "skipped slides are listed in its manifest)")
    import ml_dtypes  # noqa: F401 - lets safetensors' numpy reader return bfloat16
    with safe_open(path, framework="numpy") as f:
      meta = f.metadata() or {}
      if meta.get("encoder_hash") != self.encoder_hash or meta.get("dim") != str(self.dim):
        raise EncoderMismatchError(
            f"{path} was embedded by encoder {meta.get('encoder')!r} (hash "
            f"{str(meta.get('encoder_hash'))[:12]}, dim {meta.get('dim')}) but {self.directory}'s "
            f"manifest says {self.encoder!r} (hash {self.encoder_hash[:12]}, dim {self.dim}); "
            "re-run embed-slides into a new --out")
      arrays = {k: f.get_tensor(k) for k in ("features", "grid", "coords", "tissue")}
    return SlideFeatures(slide_id=slide_id, magnification=self.magnification, **arrays)


def open_slide_embeddings(directory: str, *, encoder_hash: str | None = None, dim: int | None = None,
                          encoder: str | None = None) -> SlideEmbeddings:
  """A finished embeddings directory; refuses one from another encoder than expected.

  `encoder_hash` / `dim` (e.g. a config's expected feature width) are checked against the
  manifest; the error names both encoders.
  """
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    raise EmbedSlidesError(
        f"{directory} has no {MANIFEST}: not a finished embed-slides directory (a run was "
        "interrupted, or other processes are still running); re-run `pathjax embed-slides` with "
        "the same --out to complete it")
  with open(path, encoding="utf-8") as f:
    manifest = json.load(f)
  if manifest.get("format_version") != FORMAT_VERSION:
    raise EmbedSlidesError(f"{directory}: embeddings format {manifest.get('format_version')}, this "
                           f"pathjax reads {FORMAT_VERSION}; re-run embed-slides into a new --out")
  have = f"{manifest['encoder']!r} (hash {manifest['encoder_hash'][:12]}, dim {manifest['dim']})"
  if encoder_hash is not None and encoder_hash != manifest["encoder_hash"]:
    raise EncoderMismatchError(f"{directory} holds embeddings from encoder {have}; expected "
                               f"{encoder or 'another encoder'} (hash {encoder_hash[:12]})")
  if dim is not None and int(dim) != int(manifest["dim"]):
    raise EncoderMismatchError(f"{directory} holds {manifest['dim']}-dimensional embeddings from "
                               f"encoder {have}; expected dimension {dim}"
                               + (f" ({encoder})" if encoder else ""))
  return SlideEmbeddings(directory, manifest)


# ----------------------------------------------------------------------------------- CLI


def register(parser: argparse.ArgumentParser) -> None:
  parser.formatter_class = argparse.RawDescriptionHelpFormatter
  parser.epilog = __doc__
  parser.add_argument("--model", required=True, metavar="DIR", help="a pathjax model directory with a vision tower")
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument("--slides", metavar="GLOB", help="slide files (a glob; quote it)")
  src.add_argument("--records", metavar="DIR", help="a `pathjax tile` records directory")
  parser.add_argument("--magnification", type=float, required=True, help="objective power, e.g. 20")
  parser.add_argument("--out", required=True, metavar="DIR")
  parser.add_argument("--batch-size", type=int, default=64,
                      help="patches per step (rounded up to a multiple of the local devices)")
  parser.add_argument("--dtype", default="float16", choices=DTYPES, help="stored feature dtype")
  parser.add_argument("--patch-size", type=int, default=None,
                      help="patch pixels at the magnification (default: the model's image size)")
  parser.add_argument("--tissue-threshold", type=float, default=0.5)
  parser.add_argument("--magnification-override", type=float, default=None,
                      help="objective power of level 0 for slides whose metadata lacks it")
  parser.add_argument("--no-progress", dest="progress", action="store_false")


def main(args) -> int:
  from pathjax import distributed
  from pathjax.convert.safetensors_io import WeightsError
  from pathjax.models.model_dir import ModelDirError
  distributed.initialize()
  try:
    result = embed_slides(args.model, args.out, magnification=args.magnification,
                          slides=args.slides, records_dir=args.records, batch_size=args.batch_size,
                          dtype=args.dtype, tissue_threshold=args.tissue_threshold,
                          patch_size=args.patch_size, magnification_override=args.magnification_override,
                          progress=args.progress)
  except (EmbedSlidesError, ModelDirError, WeightsError) as e:
    print(f"pathjax embed-slides: error: {e}", file=sys.stderr)
    return 2
  c = result["counts"]
  print(f"process {result['process_index']}/{result['process_count']}: {c['embedded']} slides embedded "
        f"({c['patches']} patches in {c['seconds']:.1f}s), {c['resumed']} already done, "
        f"{c['skipped']} skipped")
  m = result["manifest"]
  if m is not None:
    mc = m["counts"]
    print(f"wrote {os.path.join(args.out, MANIFEST)}: {mc['slides_embedded']} of {mc['slides']} slides, "
          f"{mc['patches']} patches, dim {m['dim']} {m['dtype']}; skipped {mc['slides_skipped']} "
          f"{m['skipped']['by_reason'] or ''}")
    for s in m["skipped"]["slides"][:20]:
      print(f"  skipped {s['slide']} ({s['reason']}): {s['message']}", file=sys.stderr)
  return 0
