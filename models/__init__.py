"""cnnkernels.models: full networks whose layers run the cnnkernels fused ops (installed
from the models/ folder). One family per file; every builder registers itself:

    from cnnkernels import models
    net = models.resnext50(num_classes=10)        # every registered name is a builder here too
    models.list_models()                          # every name, aliases included
    net = models.create_model("resnet50", num_classes=10)
    models.load_weights(net, "resnet50.pth")      # torchvision / timm checkpoint, strict

Where torchvision has the architecture, the state_dict keys and shapes are torchvision's;
the SE models use timm's seresnet / seresnext keys. Nothing is ever downloaded.
"""
from ._registry import create_model, extract_state_dict, is_model, list_models, load_weights, register_model

__all__ = ["create_model", "extract_state_dict", "is_model", "list_models", "load_weights", "register_model"]

# The families register their builders on import.
from . import resnet  # noqa: E402,F401
from . import preact_resnet  # noqa: E402,F401
from . import senet  # noqa: E402,F401
from . import alexnet  # noqa: E402,F401
from . import vgg  # noqa: E402,F401
from . import googlenet  # noqa: E402,F401
from . import inception  # noqa: E402,F401
from . import densenet  # noqa: E402,F401
from . import resnet_convert  # noqa: E402,F401  (cnnkernels.nn.convert's ResNet rules)


# Every registered name is a builder attribute too, as in torchvision.models: models.resnext50()
# (for alexnet and googlenet this shadows the submodule of the same name, as torchvision's does).
from ._registry import _REGISTRY  # noqa: E402
globals().update(_REGISTRY)
__all__ += list_models()
