"""Root conftest: fixture modules shared by several test files."""

pytest_plugins = ["tests.browser"]
