"""Integration tests: the session's real tritonserver (`served`) is defined in tests/conftest.py."""
