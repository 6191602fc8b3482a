"""Config files stay cheap to load: no data-loading or training libraries imported."""

import subprocess
import sys

from train_helpers import ROOT


def test_loading_configs_imports_no_grain_or_trainer():
  code = ("import sys; from pathjax import config_lib; "
          "[config_lib.load_config(f'configs/{c}', []) for c in ('mrplip.py:smoke', 'toy.py')]; "
          "print(sorted(m for m in ('grain', 'tensorflow_datasets', 'orbax', 'pathjax.train', "
          "'pathjax.input.pipeline') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "[]"
