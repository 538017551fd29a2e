"""Shared pytest setup: the test environment's fixtures live in testenv.pytest_plugin."""
pytest_plugins = ["testenv.pytest_plugin"]
