"""Modules built on the fused ops, with the state_dict keys of their unfused torch twins."""
from cnnkernels.nn.bn_act_conv import BNActConv
from cnnkernels.nn.conv_bn_act import ConvBNAct
from cnnkernels.nn.dense_block import DenseBlock
from cnnkernels.nn.convert import FusedSequential, Rule, convert, register_rule
from cnnkernels.nn.cpu_memory import retain_freed_cpu_memory
from cnnkernels.nn.freeze import freeze, unfreeze
from cnnkernels.nn.squeeze_excite import SqueezeExcite
from cnnkernels.nn.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

__all__ = ["BNActConv", "ConvBNAct", "DenseBlock", "FusedSequential", "Rule", "SqueezeExcite", "SyncBatchNorm",
           "convert", "convert_sync_batchnorm", "freeze", "register_rule", "retain_freed_cpu_memory",
           "unfreeze"]
