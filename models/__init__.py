"""cnnkernels.models: full networks built on cnnkernels.nn (installed from the models/
folder). The architectures arrive with the model-zoo issue; the registry starts empty."""
_REGISTRY: dict = {}


def list_models() -> list[str]:
    """Names accepted by create_model(), sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs):
    """Builds the registered model `name` with the builder's keyword arguments."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models()) or 'none yet'}")
    return _REGISTRY[name](**kwargs)
