"""pytest-benchmark microbenchmarks (see conftest.py); not part of the test command."""
