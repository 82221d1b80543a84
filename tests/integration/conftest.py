import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the integration tests that share it, started as every job starts it."""
    import ray

    from rayloop.cluster import init_ray

    init_ray()
    yield ray
    ray.shutdown()
