"""Shared test setup.

Without a GPU the Triton kernels run in Triton's interpreter, which reads TRITON_INTERPRET when a kernel is
decorated, so it has to be set before anything imports `kernels`.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from phi3lora.phi3mini import tiny  # noqa: E402

# The `tiny` preset is sized for the README demo (256 wide, 4 layers: big enough to memorize its chats). Most tests
# only need the real code paths with Phi-3's vocabulary, so they get a smaller one; tests of the demo itself ask for
# the `demo_tiny` fixture. Subprocess runs of train.py/chat.py see the demo size.
DEMO_TINY = dict(tiny.TINY_CONFIG)
tiny.TINY_CONFIG.update(hidden_size=64, intermediate_size=192, num_hidden_layers=2)


@pytest.fixture
def demo_tiny():
    """The demo-sized tiny preset for the duration of a test."""
    small = dict(tiny.TINY_CONFIG)
    tiny.TINY_CONFIG.update(DEMO_TINY)
    yield
    tiny.TINY_CONFIG.update(small)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
