"""Counting, on the CPU, the operations that would make the host wait for a GPU.

On a GPU, a kernel launch returns at once and the host runs ahead; an operation whose result the host must read
(a value or a size that depends on the data) stops it until the device has caught up. On the CPU nothing waits, so
such an operation costs nothing visible and slips into the code unnoticed. `HostSyncCounter` records each one while
it is open, with where it was called from:

- `.item()`, `bool(t)`, `int(t)`, `float(t)` (aten `_local_scalar_dense`), `torch.equal`, `is_nonzero`;
- data-dependent sizes: `nonzero`, `masked_select`, `unique`, `repeat_interleave` without `output_size`, and
  indexing with a boolean mask (`t[mask]`, `t[mask] = tensor`; not `t[mask] = scalar`, a `masked_fill_`);
- device-to-host copies: `.tolist()`, `.numpy()`, `.cpu()`, `.to("cpu")`.

Everything computed inside the counted window would live on the GPU in a GPU run, so each of these is a sync
there; the exception is megatron's RNG-state check (`HOST_ONLY_CALLERS`), on host tensors in any run. Host-side
work of our own (building the drop plan before the copy) is excluded with `paused()`.
"""

from __future__ import annotations

import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from megavictor import compat

aten = torch.ops.aten
_ROOT = str(Path(__file__).resolve().parents[1]) + "/"  # where the checkout lies: paths are named relative to it

_SYNCING = {
    aten._local_scalar_dense.default: "item/bool/int/float",
    aten.equal.default: "torch.equal",
    aten.is_nonzero.default: "is_nonzero",
    aten.nonzero.default: "nonzero",
    aten.nonzero_static.default: None,  # static size: no sync
    aten.masked_select.default: "masked_select",
    aten._unique2.default: "unique",
    aten.unique_consecutive.default: "unique_consecutive",
    aten.unique_dim.default: "unique",
}
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
_D2H = {torch.Tensor.tolist: "tolist", torch.Tensor.numpy: "numpy", torch.Tensor.cpu: "cpu()"}


def _is_cpu(device: Any) -> bool:
    return device == "cpu" or (isinstance(device, torch.device) and device.type == "cpu")


def _boolean_index(func: Any, args: tuple) -> bool:
    """Indexing with a boolean mask, which needs the mask's true count on the host: except `t[mask] = scalar`, which
    PyTorch runs as `masked_fill_` (`canDispatchToMaskedFill`), with no count."""
    masks = [i for i in (args[1] or []) if isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)]
    if not masks:
        return False
    scalar_fill = func != aten.index.Tensor and len(args[1]) == 1 and args[2].dim() == 0
    return not scalar_fill


# Host tensors in a GPU run too: megatron's RNG tracker checks, in every `fork()` (local attention's dropout
# context), that the CPU generator's state did not change: a comparison of two CPU tensors.
HOST_ONLY_CALLERS = ("megatron/core/tensor_parallel/random.py",)


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: "HostSyncCounter") -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        name = _SYNCING.get(func)
        if func == aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            name = "repeat_interleave"
        if func in _INDEXING and _boolean_index(func, args):
            name = "boolean index"
        if name:
            self.counter.record(name)
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, counter: "HostSyncCounter") -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        name = _D2H.get(func)
        if func is torch.Tensor.to and any(_is_cpu(a) for a in (*args[1:], kwargs.get("device"))):
            name = "to(cpu)"
        if name:
            self.counter.record(name)
        return func(*args, **kwargs)


class HostSyncCounter:
    """Records syncing operations while `counting()` is open (and not `paused()`)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []  # (operation, the project or megatron line that called it)
        self._paused = 0

    def record(self, name: str) -> None:
        if self._paused:
            return
        frames = [f for f in traceback.extract_stack()
                  if "/torch/" not in f.filename and f.filename not in (__file__, compat.__file__)]
        if frames and frames[-1].filename.endswith(HOST_ONLY_CALLERS):
            return
        where = " < ".join(f"{f.filename.split('site-packages/')[-1].removeprefix(_ROOT)}:{f.lineno}"
                           for f in reversed(frames[-3:])) or "?"
        self.events.append((name, where))

    @contextmanager
    def counting(self) -> Iterator["HostSyncCounter"]:
        with _Function(self), _Dispatch(self):
            yield self

    @contextmanager
    def paused(self) -> Iterator[None]:
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def summary(self) -> Counter:
        return Counter(self.events)
