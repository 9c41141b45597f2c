import pytest
import torch


@pytest.fixture(autouse=True)
def _no_tf32():
    """GPU tests compare float32 against float64 at 1e-4: TF32 off, restored afterwards."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
