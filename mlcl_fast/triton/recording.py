"""The one place where kernels are launched, so that a launch can be recorded instead of run.

`bench.kernels` (the static kernel report) records the exact kernels, arguments and
meta-parameters a call would launch and compiles them ahead of time for a GPU it does not have.
"""
from __future__ import annotations

import contextlib

_recorder = None


def launch(kernel, grid, args: tuple, meta: dict, wrap=None) -> None:
    """wrap(kernel)[grid](*args, **meta) (`wrap`: torch.library.wrap_triton inside triton_op
    bodies, else none), or hand the unwrapped kernel to the active recorder."""
    if _recorder is not None:
        _recorder(kernel, grid, args, meta)
    else:
        (wrap(kernel) if wrap is not None else kernel)[grid](*args, **meta)


def active() -> bool:
    """Whether launches are being recorded (their outputs then hold no values)."""
    return _recorder is not None


@contextlib.contextmanager
def recording(recorder):
    """Within the block, launches call recorder(kernel, grid, args, meta) and run nothing: the
    outputs of the kernels stay uninitialised."""
    global _recorder
    before, _recorder = _recorder, recorder
    try:
        yield
    finally:
        _recorder = before
