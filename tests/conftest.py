import pytest


@pytest.fixture(scope="session")
def megatron_world():
    """torch.distributed (gloo, world of one) + Megatron parallel state, with the CPU compat patches."""
    from stages import distributed

    info = distributed.init(seed=0)
    yield info
    distributed.teardown()
