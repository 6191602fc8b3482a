"""`pathjax tile --runner beam`: the per-slide tiling unit as an Apache Beam pipeline.

The driver plans (pathjax.input.tile.plan_slides) and finalises (tile.finalise); the
pipeline in between is

    slides (id, ref) ──────────────────────────────┐
    captions file -> parsed lines -> (id, entry) ──┴─ CoGroupByKey(id) -> TileSlide -> report

so each slide's captions are joined to it by key inside the pipeline (never shipped with
every job), duplicate caption keys are found per slide, captions naming no slide are
counted, and `TileSlide` runs `tile.tile_slide_with_retries`: a slide with a valid done
marker is returned as it is, transient errors are retried in place and then raised so the
runner retries the bundle (Dataflow retries a failing work item 4 times), and errors that
belong to the slide become skip markers. The report (every slide's marker, the caption
issues and counts) is written to `.tile/runs/<run id>.json` and read back by the driver.

Runner: DirectRunner in multi-processing mode with `workers` processes by default (Beam's
default Prism runner downloads a binary at run time); any Beam options, e.g.
`--runner=DataflowRunner --project=... --region=... --temp_location=gs://...` or
`--runner=FlinkRunner --flink_master=host:8081 --environment_type=LOOPBACK`, are passed
through unchanged and win over these defaults.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Iterable, Sequence

from pathjax.input import captions as captions_lib
from pathjax.input import storage, tile


def default_options(beam_args: Sequence[str], workers: int) -> list[str]:
  """Beam options: the user's, plus DirectRunner multi-processing defaults they do not set."""
  args = list(beam_args)
  given = {a.split("=", 1)[0].lstrip("-") for a in args if a.startswith("--")}
  if "runner" not in given:
    args.append("--runner=DirectRunner")
  runner = next((a.split("=", 1)[1] for a in args if a.startswith("--runner=")), "DirectRunner")
  if runner in ("DirectRunner", "direct", "BundleBasedDirectRunner"):
    if "direct_running_mode" not in given:
      args.append("--direct_running_mode=multi_processing")
    if "direct_num_workers" not in given:
      args.append(f"--direct_num_workers={max(1, workers)}")
  return args


def _parse_captions(path: str) -> Iterable[tuple[str, Any]]:
  """Every line of the captions file, tagged: ("entry", (slide, (key, entry))), ("issue", dict), ("line", 1)."""
  for lineno, raw in captions_lib.read_lines(path):
    item = captions_lib.parse_line(raw, lineno)
    if item is None:
      continue
    yield "line", 1
    if isinstance(item, captions_lib.CaptionIssue):
      yield "issue", item.to_json()
    else:
      yield "entry", (item[0][0], item)


class TileSlide:
  """A Beam DoFn body (wrapped in `_dofn`): one slide id with its refs and caption entries."""

  def __init__(self, out_dir: str, opts: tile.TileOptions, retry_skipped: bool):
    self.out_dir, self.opts, self.retry_skipped = out_dir, opts, retry_skipped

  def __call__(self, element) -> Iterable[tuple[str, Any]]:
    slide_id, grouped = element
    refs, parsed = list(grouped["slide"]), list(grouped["captions"])
    entries, duplicates = captions_lib.merge_entries(parsed)
    for issue in duplicates:
      yield "issue", issue.to_json()
    yield "entries", len(entries)
    if not refs:
      yield "unknown", (slide_id, len(entries))
      return
    (ref,) = refs  # the plan refused duplicate ids
    result = tile.tile_slide_with_retries(ref, self.out_dir, self.opts, entries,
                                          retry_skipped=self.retry_skipped)
    yield "result", result


def _write_report(items: list[tuple[str, Any]], path: str, captions_path: str | None) -> str:
  results, issues, unknown = {}, [], {}
  lines = entries = 0
  for tag, value in items:
    if tag == "result":
      results[value["slide_id"]] = value
    elif tag == "issue":
      issues.append(value)
    elif tag == "unknown":
      unknown[value[0]] = value[1]
    elif tag == "line":
      lines += value
    elif tag == "entries":
      entries += value
  report = {"results": results, "captions": {
      "path": captions_path, "lines": lines, "entries": entries, "issues": sorted(issues, key=lambda i: i["line"]),
      "unknown_slide_entries": sum(unknown.values()), "unknown_slides": sorted(unknown)}}
  storage.write_text_atomic(path, json.dumps(report))
  return path


def run(refs: Sequence[tile.SlideRef], captions_path: str | None, out_dir: str, opts: tile.TileOptions, *,
        workers: int = 2, beam_args: Sequence[str] = (), retry_skipped: bool = False) -> dict[str, Any]:
  """Runs the pipeline to the end; returns {"results": {slide id: marker}, "captions": {...}}."""
  try:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
  except ImportError as e:
    raise tile.TileError("--runner beam needs Apache Beam: pip install -e '.[beam]' "
                         f"(or `pip install apache-beam`) ({e})") from e
  runs_dir = storage.join(out_dir, tile.STATE_DIR, "runs")
  storage.makedirs(runs_dir)
  report_path = storage.join(runs_dir, f"{uuid.uuid4().hex}.json")
  options = PipelineOptions(default_options(beam_args, workers))
  with beam.Pipeline(options=options) as p:
    slides = p | "Slides" >> beam.Create([(r.slide_id, r) for r in refs])
    if captions_path:
      parsed = (p | "CaptionsFile" >> beam.Create([captions_path])
                | "ParseCaptions" >> beam.FlatMap(_parse_captions))
      entries = (parsed | "Entries" >> beam.Filter(lambda t: t[0] == "entry")
                 | "KeyBySlide" >> beam.Map(lambda t: t[1]))
      line_items = parsed | "LinesAndIssues" >> beam.Filter(lambda t: t[0] != "entry")
    else:
      entries = p | "NoCaptions" >> beam.Create([])
      line_items = p | "NoLines" >> beam.Create([])
    tiled = ({"slide": slides, "captions": entries}
             | "JoinBySlide" >> beam.CoGroupByKey()
             | "TileSlide" >> beam.FlatMap(TileSlide(out_dir, opts, retry_skipped)))
    _ = ((tiled, line_items) | "All" >> beam.Flatten()
         | "Gather" >> beam.combiners.ToList()
         | "Report" >> beam.Map(_write_report, report_path, captions_path))
  report = json.loads(storage.read_text(report_path))
  storage.remove(report_path)
  return report
