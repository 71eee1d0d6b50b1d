"""Shared fixtures: a tiny synthetic COCO-format dataset, generated once per test session."""
import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_report_header(config) -> list[str]:
    """Say up front which torch runs the tests and whether torchvision, the oracle, is there."""
    try:
        import torchvision

        oracle = f"torchvision {torchvision.__version__}: the tests against it run"
    except Exception as error:  # absent, or a build that does not match this torch
        oracle = f"torchvision not importable ({type(error).__name__}): the tests against it skip"
    return [f"torch {torch.__version__}, CUDA {'yes' if torch.cuda.is_available() else 'no'}; {oracle}"]


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory):
    """The ``tiny`` preset of ``mrcnn_edu.data.shapes`` (64 px images), written to a temp folder.

    Returns ``{"root": Path, "train": json path, "val": json path}``; images are in
    ``root / "train"`` and ``root / "val"``.
    """
    from mrcnn_edu.data.shapes import generate

    root = tmp_path_factory.mktemp("tiny_shapes")
    paths = generate(str(root), seed=0, preset="tiny")
    return {"root": root, **paths}


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield
