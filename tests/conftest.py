"""Test-session settings shared by every test file."""

import torch

# Two pytest-xdist workers share two cores: one torch thread each avoids oversubscription,
# which on this class of machine slows small tensor operations by orders of magnitude.
torch.set_num_threads(1)
