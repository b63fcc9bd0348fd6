import pytest

torch = pytest.importorskip("torch")


def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(pytest.mark.gpu)
        if not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="no CUDA GPU visible (torch.cuda.is_available() is False)"))
