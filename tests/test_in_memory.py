"""The in-memory training source shared by the toy and causal-LM recipes."""

import numpy as np
import pytest

from pathjax.config_lib import ConfigError
from pathjax.input import in_memory


def _arrays(n=10):
  return {"x": np.arange(n, dtype=np.int32), "y": np.arange(n, dtype=np.int32) * 10}


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_rows_are_aligned_across_arrays():
  rows = in_memory.ArrayRows(_arrays())
  assert len(rows) == 10
  assert rows[3] == {"x": 3, "y": 30}
  with pytest.raises(ValueError, match="one length"):
    in_memory.ArrayRows({"x": np.zeros(3), "y": np.zeros(4)})


def test_batches_cover_every_row_each_epoch_and_hosts_split_global_batches():
  kw = dict(seed=0, batch_size=4)
  single = _take(in_memory.batches(_arrays(8), process_index=0, process_count=1, **kw), 4)
  for epoch in (single[:2], single[2:]):  # 8 rows = two batches of 4 per epoch
    xs = np.concatenate([b["x"] for b in epoch])
    assert sorted(xs) == list(range(8))
    assert all(np.array_equal(b["y"], b["x"] * 10) for b in epoch)
  assert not np.array_equal(np.concatenate([b["x"] for b in single[:2]]),
                            np.concatenate([b["x"] for b in single[2:]]))  # reshuffled
  hosts = [_take(in_memory.batches(_arrays(8), process_index=p, process_count=2, **kw), 4)
           for p in range(2)]
  for step in range(4):
    got = np.concatenate([hosts[0][step]["x"], hosts[1][step]["x"]])
    assert sorted(got) == sorted(single[step]["x"])  # the same global batch, split in two


def test_iterator_state_resumes_the_data_order():
  kw = dict(seed=3, batch_size=2, process_index=0, process_count=1)
  reference = _take(in_memory.batches(_arrays(), **kw), 9)
  it = in_memory.batches(_arrays(), **kw)
  _take(it, 4)
  state = it.get_state()
  resumed = in_memory.batches(_arrays(), **kw)
  resumed.set_state(state)
  for a, b in zip(_take(resumed, 5), reference[4:]):
    assert np.array_equal(a["x"], b["x"])


def test_batch_not_divisible_by_processes_is_a_config_error():
  with pytest.raises(ConfigError, match="not divisible by 3 processes"):
    in_memory.batches(_arrays(), seed=0, batch_size=4, process_index=0, process_count=3)
