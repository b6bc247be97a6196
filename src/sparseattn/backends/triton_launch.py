"""Launching a Triton kernel's compiled binary directly, for kernels launched on every attention call.

Triton's ``JITFunction.run`` binds the arguments, specializes each one, builds a cache key with the options'
string form, checks the kernel's globals, evaluates the grid and builds launch metadata for its hooks before the
compiled launcher runs: more than half of a launch's host time (docs/benchmarks.md, twentieth and thirty-third
rounds). A training step launches six such kernels per layer and a decoding step two, and an eager or compiled step
at long lengths waits on that host time. `DirectLaunch` keeps only what decides which binary runs: each runtime
argument specialized by Triton's own function (dtype, 16-byte alignment, an integer equal to 1 or divisible by 16, as
``JITFunction`` does), the compile-time constants and the options. The first launch of a key goes through the JIT
(which compiles or finds the binary and returns it); later ones call the binary's launcher with the arguments in the
kernel's order.

Where launching this way could differ from the JIT it is not used: under Triton's interpreter, with launch hooks
installed (a profiler such as Proton), with the JIT's pre-run hooks, or for kernels whose parameters carry type
annotations (specialized differently). ``SPARSEATTN_TRITON_DIRECT=0`` launches everything through the JIT. Triton's
debug and instrumentation modes are read when a binary is first compiled: switching them on later in the process
does not recompile what this has kept.
"""

from __future__ import annotations

import functools
import os

import torch

try:  # Triton's internals as of 3.6; a Triton without them launches through its JIT (``_SUPPORTED``)
    import triton
    from triton import knobs
    from triton._C.libtriton import native_specialize_impl

    _SUPPORTED = hasattr(knobs.runtime.launch_enter_hook, "calls") and hasattr(knobs.runtime.launch_exit_hook, "calls")
except ImportError:  # pragma: no cover - the CPU-only install has no Triton
    triton, _SUPPORTED = None, False


def direct_enabled() -> bool:
    return os.environ.get("SPARSEATTN_TRITON_DIRECT", "1") != "0" and os.environ.get("TRITON_INTERPRET", "0") != "1"


def on_device_of_first_input(fn):
    """``fn(x, ...)`` run with ``x``'s CUDA device current. Triton compiles for and launches on the *current* device,
    not on the one its arguments live on; a model spread over GPUs (transformers' ``device_map="auto"``) calls a
    layer on cuda:1 while cuda:0 is current, and a kernel launched there reads another GPU's memory (an error, or
    wrong numbers). The guard is entered only where the devices differ: one query of the current device a call."""

    @functools.wraps(fn)
    def run(x, *args, **kwargs):
        index = x.device.index
        if x.device.type == "cuda" and index is not None and index != torch.cuda.current_device():
            with torch.cuda.device(index):
                return fn(x, *args, **kwargs)
        return fn(x, *args, **kwargs)

    return run


def _current_device() -> int:
    return triton.runtime.driver.active.get_current_device()


def _current_stream(device: int) -> int:
    return triton.runtime.driver.active.get_current_stream(device)


class DirectLaunch:
    """``DirectLaunch(jit_fn)[grid](*runtime_args, **constexprs_and_options)``, as ``jit_fn[grid](...)``.
    Runtime arguments are passed by position and compile-time constants by keyword (every call site in this
    package does); a grid is a tuple or a function of the constants, as Triton's."""

    def __init__(self, fn):
        self.fn = fn
        self.names = fn.arg_names
        params = getattr(fn, "params", [])  # none where the interpreter's function stands in: JIT launches only
        # (is_const, specialize, align) per runtime parameter, as create_function_from_signature passes them
        self._flags = [(p.is_const, not p.do_not_specialize, not p.do_not_specialize_on_alignment)
                       for p in params if not p.is_constexpr]
        self._n_runtime = len(self._flags)
        self._constants = tuple(self.names[self._n_runtime:])  # the parameters after the runtime ones, in order
        self._plain = (bool(params) and _SUPPORTED and hasattr(fn, "device_caches")
                       and all(not p.is_constexpr for p in params[:self._n_runtime])
                       and not any(p.annotation_type for p in params))
        self._binaries: dict = {}
        self.direct_launches = 0  # launches that took the binary's launcher (the tests check the path is taken)

    def _key(self, device: int, args, kwargs):
        """What decides the binary: the arguments' specialization by the device's backend, constants and options;
        None before the JIT has set up its caches for the device."""
        caches = self.fn.device_caches.get(device)
        if caches is None:
            return None
        backend = caches[3]
        spec = tuple([native_specialize_impl(backend, a, c, s, al) for a, (c, s, al) in zip(args, self._flags)])
        return device, spec, tuple(kwargs.items())

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(grid, args, kwargs)

    def run(self, grid, args, kwargs):
        if (not self._plain or len(args) != self._n_runtime or self.fn.pre_run_hooks
                or knobs.runtime.launch_enter_hook.calls or knobs.runtime.launch_exit_hook.calls
                or not direct_enabled()):
            return self.fn[grid](*args, **kwargs)
        device = _current_device()
        key = self._key(device, args, kwargs)
        binary = self._binaries.get(key) if key is not None else None
        if binary is None:  # compiled (or found in Triton's cache) and launched by the JIT, which returns it
            binary = self.fn[grid](*args, **kwargs)
            key = key if key is not None else self._key(device, args, kwargs)  # the device's first launch
            # a constant left to its default is not in kwargs: such a call stays with the JIT
            if (key is not None and hasattr(binary, "packed_metadata")
                    and all(n in kwargs for n in self._constants)):
                self._binaries[key] = binary
            return binary
        if callable(grid):
            grid = grid(kwargs)
        stream = _current_stream(device)
        binary.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                   binary.function, binary.packed_metadata, None, None, None,
                   *args, *[kwargs[name] for name in self._constants])
        self.direct_launches += 1
        return binary
