"""The soak's fixtures (shared with the integration tests) and its duration option."""

from __future__ import annotations

import pytest

from tests.integration.conftest import ray_cluster, tiny_model_dir  # noqa: F401 - shared fixtures

DEFAULT_SOAK_SECONDS = 300.0


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak-seconds", type=float, default=DEFAULT_SOAK_SECONDS,
        help="how long the random-fault soak sends requests (make chaos SOAK_SECONDS=3600)",
    )


@pytest.fixture
def soak_seconds(request: pytest.FixtureRequest) -> float:
    return float(request.config.getoption("--soak-seconds"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The soak's own time plus 10 minutes for start-up, references and the final checks."""
    limit_s = config.getoption("--soak-seconds") + 600
    for item in items:
        if item.get_closest_marker("chaos") is not None:
            item.add_marker(pytest.mark.timeout(limit_s))
