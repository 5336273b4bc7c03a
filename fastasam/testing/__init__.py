"""Test helpers that ship with fastasam but are not part of its API (no stability promise; may change at any time).

``fastasam.testing.cuda_shim``: the ``cuda`` backend's kernels compiled for the CPU, registered as the test backend
``cuda_shim`` by the test suite (``tests/conftest.py``). Nothing here is imported by ``import fastasam``.
"""
