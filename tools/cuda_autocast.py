"""CUDA autocast's dtype rules on a machine without a GPU.

CPU and CUDA autocast keep different lists. Under CUDA autocast softmax, log_softmax, layer_norm, norm, sum, pow
(so square), exp and log run and return fp32, and rms_norm too from torch 2.12 (pytorch#174824; 2.9.1 and 2.11 keep
its input's dtype), while CPU autocast leaves them in bf16; both run linear and matmul in bf16. A model that is
dtype-clean under CPU autocast can still hand a custom op mixed dtypes on a GPU.

Both tools below take CUDA's rules from CUDA's own autocast kernels, not from a copied list: a CPU-only build of
torch still registers them, and they run on fake CUDA tensors (shapes and dtypes, no data, no GPU).

  cuda_autocast_dtypes(fn, *args)   the dtypes of fn's tensor outputs under CUDA autocast (bf16), run on fake CUDA
                                    copies of args; no gradients (autograd on fake CUDA tensors needs a GPU).
  emulate_cuda_autocast()           a context for real CPU computation: CPU autocast (bf16), and every torch
                                    function whose output dtype differs from what CUDA autocast gives is re-run with
                                    its float inputs cast to CUDA's dtype and autocast off. Gradients flow as usual.
                                    Functions the fake CUDA tensors cannot run (SDPA picks a CUDA backend) keep the
                                    CPU result; `UNPROBED` names them.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

AUTOCAST_DTYPE = torch.bfloat16
UNPROBED: set[str] = set()
_CACHE: dict[tuple, tuple[torch.dtype, ...] | None] = {}


def _signature(x: Any) -> Any:
    """What decides a function's output dtype: a tensor's shape and dtype, any other argument's value."""
    return ("T", tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else repr(x)


def _tensor_dtypes(out: Any) -> tuple[torch.dtype, ...]:
    return tuple(t.dtype for t in tree_leaves(out) if isinstance(t, torch.Tensor))


@contextlib.contextmanager
def _cuda_autocast_on_fakes() -> Iterator[FakeTensorMode]:
    """A fake-tensor mode with CUDA autocast switched on directly (torch.autocast("cuda") refuses without CUDA)."""
    before = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    with FakeTensorMode() as mode, torch.no_grad():
        torch.set_autocast_enabled("cuda", True)
        torch.set_autocast_dtype("cuda", AUTOCAST_DTYPE)
        try:
            yield mode
        finally:
            torch.set_autocast_enabled("cuda", before[0])
            torch.set_autocast_dtype("cuda", before[1])


def cuda_autocast_dtypes(fn: Callable, *args: Any, **kwargs: Any) -> tuple[torch.dtype, ...]:
    """Output dtypes of fn(*args, **kwargs) under CUDA autocast, from CUDA's own autocast kernels."""
    with _cuda_autocast_on_fakes():
        fake = tree_map(lambda x: torch.empty(x.shape, dtype=x.dtype, device="cuda") if isinstance(x, torch.Tensor) else x,
                        (args, kwargs))
        return _tensor_dtypes(fn(*fake[0], **fake[1]))


def _probe(func: Callable, args: tuple, kwargs: dict) -> tuple[torch.dtype, ...] | None:
    key = (func, repr(tree_map(_signature, (args, kwargs))))
    if key not in _CACHE:
        try:
            _CACHE[key] = cuda_autocast_dtypes(func, *args, **kwargs)
        except Exception:  # noqa: BLE001 - a function fake CUDA tensors cannot run: keep the CPU result
            _CACHE[key] = None
            UNPROBED.add(getattr(func, "__name__", repr(func)))
    return _CACHE[key]


class _CudaPolicy(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        got = _tensor_dtypes(out)
        if not torch.is_autocast_enabled("cpu") or not any(d.is_floating_point for d in got):
            return out
        want = _probe(func, args, kwargs)
        if want is None or want == got:
            return out
        targets = {d for d in want if d.is_floating_point}
        if len(targets) != 1:
            UNPROBED.add(getattr(func, "__name__", repr(func)))
            return out
        (target,) = targets
        cast = lambda x: x.to(target) if isinstance(x, torch.Tensor) and x.is_floating_point() else x  # noqa: E731
        with torch.autocast("cpu", enabled=False):
            return func(*tree_map(cast, args), **tree_map(cast, kwargs))


@contextlib.contextmanager
def emulate_cuda_autocast() -> Iterator[None]:
    """CPU autocast to bf16 with CUDA autocast's output dtypes (see the module docstring)."""
    with torch.autocast("cpu", dtype=AUTOCAST_DTYPE), _CudaPolicy():
        yield
