"""Every public op is declared once (ops._registration.declare_call) with everything the
package derives from it: explain() and info take its sample call, analysis costs it."""
import pytest
import torch
from torch import nn

from cnnkernels import _backends, analysis, ops
from cnnkernels.bench import traffic
from cnnkernels.ops._registration import PUBLIC_CALLS

PUBLIC = sorted(name for name in _backends._registry if not name.endswith("_backward"))


def test_every_registered_op_is_declared():
    assert sorted(PUBLIC_CALLS) == PUBLIC


class _Call(nn.Module):
    def __init__(self, name):
        super().__init__()
        self.name = name

    def forward(self, x):
        args, kwargs = PUBLIC_CALLS[self.name].sample("cpu")
        return getattr(torch.ops.cnnkernels, self.name)(*PUBLIC_CALLS[self.name].normalize(*args, **kwargs))


@pytest.mark.parametrize("name", PUBLIC)
def test_analysis_costs_every_op_from_its_declaration(name):
    rows = analysis.summary(_Call(name), (1, 1, 1)).rows
    assert len(rows) == 1, rows
    row = rows[0]
    assert row.bytes_unfused > row.bytes_fused > 0
    assert row.flops > 0 or row.kind.startswith("add")
    assert row.kind == "+".join(PUBLIC_CALLS[name].cost(*_values_and_result(name)).kinds)


def _values_and_result(name):
    args, kwargs = PUBLIC_CALLS[name].sample("cpu")
    schema_args = PUBLIC_CALLS[name].normalize(*args, **kwargs)
    with torch.no_grad():
        result = getattr(torch.ops.cnnkernels, name)(*schema_args)
    names = [a.name for a in getattr(torch.ops.cnnkernels, name).default._schema.arguments]
    return dict(zip(names, schema_args)), result


def test_traffic_models_come_from_the_declarations():
    assert traffic.ops() == sorted(n for n in PUBLIC if n != "bn_act_conv_into")
    for name in traffic.ops():
        assert getattr(traffic, name) is traffic.for_op(name) is PUBLIC_CALLS[name].traffic
    with pytest.raises(ValueError, match="no traffic model for 'bn_act_conv_into'"):
        traffic.for_op("bn_act_conv_into")


def test_explain_names_the_known_ops_for_an_unknown_one():
    with pytest.raises(ValueError, match="unknown op 'conv'; known: add_act, bn_act_conv"):
        ops.explain("conv", torch.randn(1))
