"""Test-wide settings."""

import torch

# The suite runs many tiny ops; one intra-op thread avoids oversubscription on small CI
# machines (measured 5-10x faster for the tiny-tensor tests on a busy 2-core box).
torch.set_num_threads(1)
