"""Recording the launches of Triton host launchers on CPU tensors, and compiling each for sm_90 exactly as the
JIT would specialize it, without a GPU.

``recording`` swaps a module's kernels for recorders: the launcher runs on CPU tensors as it would on the GPU
and each ``kernel[grid](...)`` lands in a list instead of running. ``compile_launch`` then puts a recorded launch
through Triton's own argument binder (16-byte aligned pointers and integers divisible by 16 get divisibility
hints, integers equal to 1 become constants) and compiles it to a cubin with the ptxas Triton ships.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

from .sass import resource_usage

# An H200 as the launchers see it: (SMs, registers per SM, threads per SM, shared bytes per SM).
H200 = (132, 65536, 2048, 233472)


@dataclasses.dataclass
class Launch:
    label: str
    fn: object  # the triton JITFunction
    args: tuple
    kwargs: dict
    grid: tuple


@contextlib.contextmanager
def recording(module, names: tuple[str, ...], label: Callable[[str], str] | None = None) -> Iterator[list[Launch]]:
    """Swaps ``module.<name>`` kernels for recorders while active, and makes the launchers size persistent
    grids for an H200 (its SM count, and the residency of each variant compiled here); yields the list the
    launches land in."""
    from ...triton import _helpers

    launches: list[Launch] = []
    saved = {name: getattr(module, name) for name in names}
    saved_limits, saved_resident = _helpers.device_limits, _helpers.resident_programs

    class Recorder:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            def record(*args, **kwargs):
                tag = label(self.name) if label else self.name
                launches.append(Launch(tag, self.fn, args, kwargs, tuple(grid)))

            return record

        def warmup(self, *args, grid, **kwargs):
            return compile_launch(Launch(self.name, self.fn, args, kwargs, grid))

    def resident(kernel, args, kwargs, limits):
        compiled = kernel.warmup(*args, grid=(1,), **kwargs)
        regs = resource_usage(compiled.asm["cubin"])["REG"]
        return _helpers.programs_per_sm(limits, regs, compiled.metadata.num_warps, compiled.metadata.shared)

    try:
        for name, fn in saved.items():
            setattr(module, name, Recorder(name, fn))
        _helpers.device_limits, _helpers.resident_programs = (lambda device: H200), resident
        yield launches
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)
        _helpers.device_limits, _helpers.resident_programs = saved_limits, saved_resident


def compile_launch(launch: Launch, arch: int = 90):
    """The launch's kernel compiled for ``sm_<arch>`` through the JIT's own binder and specialization."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
