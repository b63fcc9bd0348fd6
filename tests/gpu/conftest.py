from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items):
    # a conftest hook sees the whole session's items: touch only the ones in this folder
    try:
        import torch

        reason = None if torch.cuda.is_available() else "no CUDA GPU visible (torch.cuda.is_available() is False)"
    except ImportError:
        reason = "torch is not installed"
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.gpu)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
