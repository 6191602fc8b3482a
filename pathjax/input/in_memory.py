"""Training data that fits in host memory: a dict of equally long numpy arrays, one row per example.

Small recipes (the toy regression, causal-LM pretraining on a report file) build all their
examples up front. `ArrayRows` is the Grain random-access source over such a dict, and
`batches` the one training pipeline over it: a new permutation every epoch, repeated
forever, each host taking its share of every global batch, so the iterator has Grain's
get_state/set_state and a checkpoint resumes the data order exactly.
"""

from __future__ import annotations

from typing import Iterator

import grain
import numpy as np

from pathjax.config_lib import ConfigError


class ArrayRows:
  """Random access over a dict of equally long numpy arrays (a Grain data source)."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    lengths = {k: len(v) for k, v in arrays.items()}
    if not lengths or len(set(lengths.values())) != 1:
      raise ValueError(f"ArrayRows needs at least one array, all of one length; got {lengths}")
    self.arrays = arrays

  def __len__(self):
    return len(next(iter(self.arrays.values())))

  def __getitem__(self, index):
    return {k: v[index] for k, v in self.arrays.items()}


def batches(arrays: dict[str, np.ndarray], *, seed: int, batch_size: int,
            process_index: int, process_count: int) -> Iterator[dict[str, np.ndarray]]:
  """This host's batches (batch_size / process_count rows each) of the shuffled, repeated rows."""
  if batch_size % process_count:
    raise ConfigError(f"batch_size {batch_size} is not divisible by {process_count} processes")
  ds = (grain.MapDataset.source(ArrayRows(arrays))
        .shuffle(seed=seed)                 # a new permutation every epoch
        .repeat(None)
        [process_index::process_count]      # this host's share of every global batch
        .batch(batch_size // process_count, drop_remainder=True))
  return iter(ds.to_iter_dataset())
