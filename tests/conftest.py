"""Shared test helpers: a missing server is a loud skip locally and a failure in CI."""

from __future__ import annotations

import os

import pytest

# The store contract lives in a plain module; give its asserts pytest's explanations.
pytest.register_assert_rewrite("tests.store_contract")


class CI:
    """Where the tests run: CI (env `CI=true`) must have every server, a laptop need not."""

    @staticmethod
    def active() -> bool:
        """Whether this run is the CI's."""
        return os.environ.get("CI") == "true"

    @classmethod
    def require_server(cls, name: str, reachable: bool) -> None:
        """Skip the test (locally) or fail it (in CI) when server `name` is not reachable."""
        if reachable:
            return
        reason = (
            f"{name} is NOT REACHABLE, so this test did NOT RUN; start it (`make services`) "
            "to run it"
        )
        if cls.active():
            # In CI a skip would turn a broken environment into a green build.
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(f"!!! {reason}")


@pytest.fixture(scope="session")
def ci() -> type[CI]:
    """The CI helper, for fixtures and tests that need a server."""
    return CI
