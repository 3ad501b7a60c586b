import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch

# One intra-op thread: the tests run many small ops, which torch's thread pool slows
# down (10x measured when the 2-core machine is shared); results do not depend on it.
torch.set_num_threads(1)
