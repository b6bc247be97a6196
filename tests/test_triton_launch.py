"""`triton_launch.DirectLaunch`: which launches take a kernel's compiled binary directly, and with which arguments.

The binary's launcher is Triton's, so on the CPU it is replaced by a recorder; the kernels' outputs through the direct
path are checked on the GPU (test_block_gpu.py, test_decode_kernel.py)."""

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.runtime.jit import JITFunction  # noqa: E402

from sparseattn.backends import decode_kernel, triton_kernel, triton_launch  # noqa: E402
from sparseattn.backends.triton_launch import DirectLaunch, native_specialize_impl  # noqa: E402

# the specializer's first call imports Triton's Gluon, which checks the interpreter setting of the kernels defined so
# far (the suite's: on); the tests below switch the setting off for the launcher, so that import happens here
native_specialize_impl(triton.backends.compiler.BaseBackend, torch.zeros(1), False, True, True)


def _toy(X, Y, n, scale, BS: "tl.constexpr", FLAG: "tl.constexpr"):  # noqa: F821 - the signature is what is read
    pass


class _Binary:
    """A compiled kernel's stand-in: records each launch's grid and arguments."""

    packed_metadata = "meta"
    function = "fn"

    def __init__(self):
        self.launches = []

    def run(self, g0, g1, g2, stream, function, meta, launch_meta, enter, exit_, *args):
        self.launches.append(((g0, g1, g2), stream, args))


class _Jit:
    """A JITFunction's stand-in with _toy's parameters: each call through it compiles a new binary."""

    def __init__(self):
        real = JITFunction(_toy)
        self.params, self.arg_names, self.pre_run_hooks = real.params, real.arg_names, []
        self.device_caches = {}
        self.jit_calls = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.device_caches.setdefault(0, (None, None, None, triton.backends.compiler.BaseBackend, None))
            self.jit_calls.append((grid, args, kwargs))
            return _Binary()
        return run


@pytest.fixture
def launch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(triton_launch, "_current_device", lambda: 0)
    monkeypatch.setattr(triton_launch, "_current_stream", lambda device: 77)
    return DirectLaunch(_Jit())


def _args(n=64, offset=0):
    x = torch.zeros(64)
    return (x[offset:], torch.zeros(8), n, 0.5)


def test_the_second_launch_of_a_specialization_calls_the_binary_with_constants_in_the_kernels_order(launch):
    first = launch[lambda meta: (meta["BS"] * 2, 3)](*_args(), FLAG=True, BS=4)
    assert len(launch.fn.jit_calls) == 1 and not first.launches and launch.direct_launches == 0
    args = _args()
    binary = launch[lambda meta: (meta["BS"] * 2, 3)](*args, FLAG=True, BS=4)
    assert binary is first and len(launch.fn.jit_calls) == 1 and launch.direct_launches == 1
    (grid, stream, sent), = binary.launches
    assert grid == (8, 3, 1) and stream == 77
    assert sent[:4] == args and sent[4:] == (4, True)  # BS before FLAG, as the signature orders them


@pytest.mark.parametrize("change", ["alignment", "int divisible by 16", "int equal to 1", "dtype", "constant",
                                    "option"])
def test_a_different_specialization_compiles_through_the_jit(launch, change):
    launch[(1,)](*_args(), BS=4, FLAG=True)
    args, kwargs = list(_args()), dict(BS=4, FLAG=True)
    if change == "alignment":  # 4 bytes off the 16-byte boundary Triton specializes pointers on
        args[0] = _args(offset=1)[0]
    elif change == "int divisible by 16":
        args[2] = 63
    elif change == "int equal to 1":
        args[2] = 1
    elif change == "dtype":
        args[1] = torch.zeros(8, dtype=torch.bfloat16)
    elif change == "constant":
        kwargs["BS"] = 8
    else:
        kwargs["num_warps"] = 8
    launch[(1,)](*args, **kwargs)
    assert len(launch.fn.jit_calls) == 2 and launch.direct_launches == 0
    launch[(1,)](*args, **kwargs)  # the new specialization's own binary, directly
    assert len(launch.fn.jit_calls) == 2 and launch.direct_launches == 1


def test_ints_and_floats_that_keep_the_specialization_reuse_the_binary(launch):
    launch[(1,)](*_args(n=32), BS=4, FLAG=True)
    launch[(1,)](*_args(n=4096)[:3], 0.125, BS=4, FLAG=True)
    assert len(launch.fn.jit_calls) == 1 and launch.direct_launches == 1


@pytest.mark.parametrize("why", ["env", "interpreter", "hook", "pre-run hook", "constant left to its default",
                                 "constant by position"])
def test_launches_stay_with_the_jit_where_the_binary_could_differ(launch, monkeypatch, why):
    args, kwargs = _args(), dict(BS=4, FLAG=True)
    if why == "env":
        monkeypatch.setenv("SPARSEATTN_TRITON_DIRECT", "0")
    elif why == "interpreter":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    elif why == "hook":
        monkeypatch.setattr(triton.knobs.runtime.launch_enter_hook, "calls", [lambda metadata: None])
    elif why == "pre-run hook":
        launch.fn.pre_run_hooks.append(lambda *a, **k: None)
    elif why == "constant left to its default":
        kwargs.pop("FLAG")
    else:
        args, kwargs = (*args, 4), dict(FLAG=True)
    for _ in range(3):
        launch[(1,)](*args, **kwargs)
    assert launch.direct_launches == 0 and len(launch.fn.jit_calls) == 3


def test_every_kernel_the_attention_launches_qualifies_for_the_direct_path():
    """Constants last and no annotated parameters: otherwise DirectLaunch silently keeps the JIT's slower path."""
    kernels = [(triton_kernel, name) for name in ("_fwd_kernel", "_fwd_merge", "_delta_kernel", "_dkdv_kernel",
                                                  "_dq_kernel", "_scratch_kernel")]
    kernels += [(decode_kernel, name) for name in ("_decode_split", "_merge_splits")]
    for module, name in kernels:
        fn = getattr(module, name)
        launcher = DirectLaunch(fn if hasattr(fn, "params") else JITFunction(fn.fn))
        assert launcher._plain, name


def test_a_function_without_parameters_to_read_launches_through_itself(monkeypatch):
    """Triton's interpreter stands a function without ``params`` in for the JIT's: every launch goes to it."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    jit = _Jit()
    del jit.params
    launch = DirectLaunch(jit)
    for _ in range(2):
        launch[(1,)](*_args(), BS=4, FLAG=True)
    assert len(jit.jit_calls) == 2 and launch.direct_launches == 0


class _On:
    """An input's stand-in: only its device is read."""

    def __init__(self, device):
        self.device = torch.device(device)


@pytest.mark.parametrize("device, current, guarded", [("cuda:1", 0, 1), ("cuda:0", 0, None), ("cuda:2", 2, None),
                                                      ("cpu", None, None)])
def test_kernels_launch_on_their_inputs_device_not_the_current_one(monkeypatch, device, current, guarded):
    """Triton launches on the current CUDA device: a layer on cuda:1 called while cuda:0 is current (a model spread
    over GPUs with device_map="auto") must run with cuda:1 current, and a call on the current device or the CPU
    enters no guard (the CPU never asks CUDA which device is current)."""
    entered, seen = [], []

    class _Guard:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            entered.append(self.index)

        def __exit__(self, *exc):
            entered.append(("left", self.index))

    def current_device():
        assert current is not None, "asked CUDA's current device for a CPU input"
        return current

    monkeypatch.setattr(torch.cuda, "current_device", current_device)
    monkeypatch.setattr(torch.cuda, "device", _Guard)
    run = triton_launch.on_device_of_first_input(lambda x, y, scale=1.0: seen.append((list(entered), y, scale)) or 5)
    assert run(_On(device), "y", scale=2.0) == 5
    assert seen == [([guarded] if guarded is not None else [], "y", 2.0)]
    assert entered == ([guarded, ("left", guarded)] if guarded is not None else [])


def test_every_entry_that_launches_kernels_is_guarded_to_its_inputs_device():
    for fn in (triton_kernel.forward_pass, triton_kernel.backward_pass, decode_kernel._decode):
        assert fn.__code__ is triton_launch.on_device_of_first_input(lambda x: x).__code__, fn.__name__
