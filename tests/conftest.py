"""Shared test setup.

The Triton kernels run on CPU through the interpreter, which Triton (and ``qlk.backend``) read
when they are imported: set it before any test module imports qlk. An explicit ``TRITON_INTERPRET``
is kept (``make gpu-check`` runs with ``TRITON_INTERPRET=0``); unset, it defaults to ``1`` without
CUDA and to ``0`` when CUDA is available, so that on a GPU the kernel tests test compiled kernels
(tests/test_gpu_env.py fails if they would run interpreted there).

The interpreter is slow, so the default backend of the test session is the reference path: tests
about the kernels ask for them (``qlk.kernels.*``, ``backend="triton"`` or
``qlk.use_backend("triton")``). ``QLK_BACKEND=auto pytest`` runs everything through the kernels
(on a GPU runner, say).
"""
import os

import pytest

def _default_interpret() -> str:
    try:
        import torch

        return "0" if torch.cuda.is_available() else "1"
    except Exception:  # noqa: BLE001 - no torch: nothing will run kernels anyway
        return "1"


os.environ.setdefault("TRITON_INTERPRET", _default_interpret())
os.environ.setdefault("QLK_BACKEND", "reference")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")
    parser.addoption("--fuzz-long", action="store_true", help="tests/test_fuzz.py: hypothesis profile 'long'")


def pytest_configure(config):
    if config.getoption("--fuzz-long"):
        os.environ["QLK_FUZZ_PROFILE"] = "long"
    config.addinivalue_line("markers", "slow: long tests (real model); run with --runslow")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")


#: seconds of test time per file on CI's 2 cores (round 39's --durations=0), for the files above ~15 s.
#: ``make test`` hands files to its two workers in this order, heaviest first (``--dist loadfile
#: --no-loadscope-reorder``; xdist's own order is by test count), so no long file starts last while the
#: other worker idles; the rest follow in collection order. List a new file that takes longer.
FILE_SECONDS = {
    "test_kernel_paths.py": 410, "test_moe.py": 230, "test_kernel_static.py": 150, "test_train.py": 90,
    "test_rules_family.py": 75, "test_kernels.py": 70, "test_decode_tile.py": 65, "test_bench_smoke.py": 60,
    "test_qalora_kernel.py": 40, "test_autograd.py": 30, "test_compile.py": 21, "test_fuzz.py": 17,
    "test_peft_plain.py": 15, "test_asm_emulated.py": 15,
}


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))  # stable: each file's order kept
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (make test-slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_launch_caches():
    """Every test starts with empty launch-decision caches (qlk.kernels.heuristics.LAUNCH_CACHES, the
    device facts of qlk.kernels.config): a table or device fact a test patches before its first
    launch is then what the launchers read. A test that patches one after launching clears them itself
    (``heuristics.clear_launch_caches()``)."""
    try:
        from qlk.kernels import heuristics
    except Exception:  # noqa: BLE001 - no triton: nothing caches launch decisions
        yield
        return
    heuristics.clear_launch_caches()
    yield
