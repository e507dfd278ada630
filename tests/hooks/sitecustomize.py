"""Test-only: imported by Python at start-up in every process the tests start (``tests/conftest.py`` puts this
folder on ``PYTHONPATH``, which ``ssfer run``, torchrun's ranks, local Ray workers and spawned ranks inherit).
Installs :mod:`ssfer_test_hooks` when one of its variables is set; does nothing otherwise."""
import os

if any(os.environ.get(k) for k in ("SSFER_TEST_FAULT", "SSFER_TEST_FAULT_FILE", "SSFER_TEST_COMM_GUARD")):
    import ssfer_test_hooks

    ssfer_test_hooks.install()
