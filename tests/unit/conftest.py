"""Fixtures the unit tests share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.unit.test_engine import Rig


@pytest.fixture(scope="module")
def rig(tiny_model: Path) -> Iterator[Rig]:
    """The tiny model with its tokenizer, on one torch thread (it gains nothing from more, and the
    CI box is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Rig(tiny_model)
    torch.set_num_threads(threads)
