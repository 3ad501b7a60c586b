import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch

# One intra-op thread: the tests run many small ops, which torch's thread pool slows
# down (10x measured when the 2-core machine is shared); results do not depend on it.
torch.set_num_threads(1)


import pytest  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=CUDA)])
def device(request) -> str:
    """Each device the test runs on: the CPU always, CUDA when this machine has a GPU."""
    return request.param
