"""The component conformance suite's marker (see test_conformance.py and conformance.yml)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "requires(*features): run only on the backends conformance.yml gives these features"
    )
