"""Fixtures shared across test packages."""

from tests.s2ef_fixtures import s2ef_run  # noqa: F401  (a session fixture)
