import os

# Triton runs on the CPU only through its interpreter, which must be chosen before import.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
