"""Loaded at start-up by every process a test starts with the ``fault_plugin`` fixture (tests/conftest.py), which puts
this folder on ``PYTHONPATH``: it injects the test's fault into the product's training (tests/faults.py). Without
``DISTILL_TEST_FAULT`` or ``DISTILL_TEST_STEPS_FILE`` it does nothing. Test code only: the product has no hook."""

import os
import sys

if os.environ.get("DISTILL_TEST_FAULT") or os.environ.get("DISTILL_TEST_STEPS_FILE"):
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for faults.py
    import faults

    faults.install_on_import()
