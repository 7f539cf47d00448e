import os

# The Triton kernels run on the CPU through Triton's interpreter in CI (there is no GPU there).
# This must be set before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
# The test models are tiny: one thread per process is faster than two threads handing work back and forth
# (and much faster when the machine is busy). Set in the environment so the CLI subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
