"""Test set-up: 8 fake CPU devices for sharding tests, set before jax is imported."""

import os

# XLA's concurrency-optimised CPU scheduler may order a step's collectives differently on
# different fake devices; their threads then wait for each other in rendezvous forever (seen as
# hangs of the 8-device tests, 1 in 2 runs here). The plain scheduler keeps program order.
SERIAL_COLLECTIVES = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {SERIAL_COLLECTIVES}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # an installed libtpu must not be probed
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Shared slide fixtures (tests/slide_fixtures.py); the tests directory must be importable.
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
pytest_plugins = ["slide_fixtures"]
