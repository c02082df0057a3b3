import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The tests' models are tiny: one intra-op thread is faster than two, and much faster when
    other jobs share a 2-core machine. Worker processes of Ray tests set their own."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


SLOW_HINT = "mark the test @pytest.mark.slow: `pytest -m \"not slow\"` is the fast tier, which starts no Ray, " \
            "subprocess, server or browser"
_running = {"item": None}  # the test being set up, run or torn down (its fixtures' work counts as its own)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _running["item"] = item
    yield
    _running["item"] = None


def _refused_unless_slow(original, what):
    """``original``, refused inside a test not marked ``slow``, so the fast tier stays fast by construction
    rather than by a list kept by hand (a module fixture that starts Ray counts for the test that needs it)."""
    def guarded(*args, **kwargs):
        item = _running["item"]
        if item is not None and item.get_closest_marker("slow") is None:
            raise RuntimeError(f"{item.nodeid} starts {what}: {SLOW_HINT}")
        return original(*args, **kwargs)
    return guarded


def pytest_collection_finish(session):
    import socketserver
    import subprocess
    import sys

    # matplotlib builds its font cache with `fc-list` on a machine's first use (CI's fresh machine): here,
    # before the guard, rather than inside whichever fast test draws first
    import matplotlib.font_manager  # noqa: F401

    subprocess.Popen.__init__ = _refused_unless_slow(subprocess.Popen.__init__, "a subprocess")
    socketserver.BaseServer.__init__ = _refused_unless_slow(socketserver.BaseServer.__init__, "a server")
    if "ray" in sys.modules:  # the engine imports Ray at the top, so a test that can start it has it imported
        sys.modules["ray"].init = _refused_unless_slow(sys.modules["ray"].init, "Ray")
