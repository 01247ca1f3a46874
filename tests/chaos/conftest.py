from tests.integration.conftest import ray_cluster, tiny_model_dir  # noqa: F401 - shared fixtures
