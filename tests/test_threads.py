"""The default CPU thread count: one thread for small operators or a busy machine, the free cores
otherwise; never over a count the user chose."""

from __future__ import annotations

import os

import pytest
import torch

from tiaoyu_cli import device as dev


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_pick_threads_by_work_and_load():
    top = dev._TORCH_DEFAULT_THREADS
    assert dev.pick_threads(1e5, cores=16, load=0.0) == 1  # batch-1 sized operators: one thread
    assert dev.pick_threads(1e9, cores=2, load=11.0) == 1  # busy machine: one thread
    assert dev.pick_threads(1e9, cores=4, load=2.0) == min(2, top)  # the cores nobody else uses
    assert dev.pick_threads(1e9, cores=top, load=0.0) == top
    assert dev.pick_threads(1e9, cores=1, load=0.0) == 1


def test_default_threads_sets_the_pick_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(dev, "_pinned", False)
    monkeypatch.setattr(os, "getloadavg", lambda: (50.0, 50.0, 50.0))
    torch.set_num_threads(dev._TORCH_DEFAULT_THREADS)
    assert dev.default_threads(1e9) == 1 and torch.get_num_threads() == 1
    # a count someone set (not torch's default, not ours) is kept
    torch.set_num_threads(dev._TORCH_DEFAULT_THREADS + 1)
    assert dev.default_threads(1e9) is None and torch.get_num_threads() == dev._TORCH_DEFAULT_THREADS + 1
    torch.set_num_threads(dev._TORCH_DEFAULT_THREADS)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert dev.default_threads(1e9) is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    dev.pin_threads(dev._TORCH_DEFAULT_THREADS)  # --threads N
    assert dev.default_threads(1e9) is None and torch.get_num_threads() == dev._TORCH_DEFAULT_THREADS
