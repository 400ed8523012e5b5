"""The benchmarks' thread count is restored after a command, and their progress bar keeps a width
in a terminal that reports none."""

import io
import os
import re
import shutil

import pytest
import torch

pytest.importorskip("tqdm", reason="the bench extra")

from directpred_plugin.benchmarks.runtime import progress_bar, torch_threads  # noqa: E402


def test_torch_threads_are_set_inside_the_block_and_restored_after_it_even_on_error():
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    with pytest.raises(RuntimeError):
        with torch_threads(wanted):
            assert torch.get_num_threads() == wanted
            raise RuntimeError
    assert torch.get_num_threads() == before
    with torch_threads(0):
        assert torch.get_num_threads() == before


def test_progress_bar_in_a_terminal_of_unknown_width(monkeypatch):
    monkeypatch.setattr(shutil, "get_terminal_size", lambda fallback=(0, 0): os.terminal_size((0, 0)))
    out = io.StringIO()
    bar = progress_bar(range(4), desc="runs", file=out, mininterval=0)
    for _ in bar:
        pass
    bar.close()
    last = out.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert re.search(r"\|[#█]{30,}\|", last) and last.endswith("]"), last
