import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

# Tests run on tiny tensors, where thread start-up dominates: with pytest-xdist each worker
# uses one thread, which is also what keeps a loaded 2-core machine responsive.
torch.set_num_threads(1)
