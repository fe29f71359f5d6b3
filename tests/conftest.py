import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _looprl_cache(tmp_path_factory):
    """Tests (and the subprocesses they start) build the tiny model in a tmp cache, never in ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOOPRL_CACHE", str(tmp_path_factory.mktemp("looprl_cache")))
        yield


# Tiny models on a shared 2-core machine: more than one torch thread makes every small
# op wait for a busy core (a generate call went from 13 ms to 1.4 s).
torch.set_num_threads(1)
