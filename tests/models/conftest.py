"""One intra-op thread for the model tests: their tensors are tiny, so more threads only contend for the cores
(on a shared 2-core box a subset of these tests took 87 s with the default threads and 10 s with one)."""

import torch

torch.set_num_threads(1)
