"""Modules built on the fused ops, with the state_dict keys of their unfused torch twins."""
from cnnkernels.nn.conv_bn_act import ConvBNAct

__all__ = ["ConvBNAct"]
