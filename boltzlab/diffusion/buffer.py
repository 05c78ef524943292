"""The replay buffer of iDEM's outer loop."""

from __future__ import annotations

import torch
from torch import Tensor

from boltzlab.diffusion._checks import DiffusionInputError, _check_state


class ReplayBuffer:
    """A first-in-first-out store of at most ``capacity`` states of shape (dim,).

    iDEM's outer loop adds fresh reverse-SDE samples; the inner loop draws training points
    uniformly from what is stored. ``state_dict`` / ``load_state_dict`` make it part of a
    resumable checkpoint.
    """

    def __init__(self, capacity: int, dim: int, dtype: torch.dtype = torch.float32) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise DiffusionInputError(f"capacity must be a positive int, got {capacity!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise DiffusionInputError(f"dim must be a positive int, got {dim!r}")
        self.capacity, self.dim = capacity, dim
        self._data = torch.empty(capacity, dim, dtype=dtype)
        self._size = 0
        self._next = 0  # slot the next state overwrites once the buffer is full

    def __len__(self) -> int:
        return self._size

    @property
    def data(self) -> Tensor:
        """The stored states, (len, dim) (order of insertion is not preserved once full)."""
        return self._data[: self._size]

    def add(self, x: Tensor) -> None:
        """Append states (B, dim); once full, the oldest are overwritten first."""
        x = _check_state(x, self.dim).detach().to(self._data.dtype).cpu()
        if x.shape[0] >= self.capacity:
            x = x[-self.capacity:]
        idx = (self._next + torch.arange(x.shape[0])) % self.capacity
        self._data[idx] = x
        self._next = int((self._next + x.shape[0]) % self.capacity)
        self._size = min(self.capacity, self._size + x.shape[0])

    def replace_states(self, x: Tensor) -> None:
        """Overwrite every stored state with ``x`` (len, dim), e.g. after moving each one by MCMC;
        the insertion order (which state is overwritten next) is kept."""
        x = _check_state(x, self.dim).detach().to(self._data.dtype).cpu()
        if x.shape[0] != self._size:
            raise DiffusionInputError(f"replace_states needs {self._size} states, got {x.shape[0]}")
        self._data[: self._size] = x

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n states drawn uniformly with replacement: (n, dim)."""
        if self._size == 0:
            raise DiffusionInputError("cannot sample from an empty replay buffer; add states first")
        idx = torch.randint(self._size, (n,), generator=generator)
        return self._data[idx]

    def state_dict(self) -> dict[str, object]:
        return {"capacity": self.capacity, "dim": self.dim, "data": self.data.clone(), "next": self._next}

    def load_state_dict(self, state: dict[str, object]) -> None:
        if state["capacity"] != self.capacity or state["dim"] != self.dim:
            raise DiffusionInputError(
                f"buffer state has capacity {state['capacity']} and dim {state['dim']}, "
                f"this buffer {self.capacity} and {self.dim}"
            )
        data = state["data"]
        assert isinstance(data, Tensor)
        self._size = data.shape[0]
        self._data[: self._size] = data
        self._next = int(state["next"])  # type: ignore[arg-type]
