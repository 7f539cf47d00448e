import os

# The Triton kernels run on the CPU through Triton's interpreter in CI (there is no GPU there).
# This must be set before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
