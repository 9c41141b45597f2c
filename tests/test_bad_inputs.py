"""Bad input everywhere a user reaches outside the ops (whose argument errors are
tests/ops/test_bad_arguments.py): model builders, load_weights, the nn modules and
helpers, analysis.summary, eval.multi_crop and the bench CLI. Each case must raise the
named exception with a message naming the argument and what was expected; none may
crash the process, hang or return a result."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import cnnkernels
from cnnkernels import analysis, models
from cnnkernels import eval as cn_eval
from cnnkernels import nn as cnn


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    torch.save(models.resnet18(num_classes=4).state_dict(), folder / "resnet18.pth")
    torch.save(models.alexnet(num_classes=4).state_dict(), folder / "alexnet.pth")
    data = (folder / "resnet18.pth").read_bytes()
    (folder / "truncated.pth").write_bytes(data[: len(data) // 2])
    (folder / "text.pth").write_text("not a checkpoint")
    torch.save(torch.randn(3), folder / "tensor.pth")
    return folder


def _resnet():
    return models.resnet18(num_classes=4)


CASES = {
    # model builders and the registry
    "unknown model name": (lambda f: models.create_model("resnet19"), ValueError, "unknown model 'resnet19'.*resnet18"),
    "num_classes zero": (lambda f: models.resnet18(num_classes=0), ValueError, "num_classes must be a positive int"),
    "num_classes a string": (lambda f: models.vgg11(num_classes="10"), ValueError,
                             "num_classes must be a positive int"),
    "num_classes a bool": (lambda f: models.densenet121(num_classes=True), ValueError,
                           "num_classes must be a positive"),
    "weights of a wrong type": (lambda f: models.resnet18(weights=3), TypeError, "weights must be a checkpoint path"),
    "unknown builder argument": (lambda f: models.resnet18(foo=1), TypeError, "unexpected keyword argument 'foo'"),
    "fixed ResNeXt groups changed": (lambda f: models.resnext50_32x4d(groups=8), ValueError, "fixes groups=32"),
    # load_weights
    "checkpoint file missing": (lambda f: models.load_weights(_resnet(), f / "nope.pth"), FileNotFoundError,
                                "does not exist"),
    "truncated checkpoint": (lambda f: models.load_weights(_resnet(), f / "truncated.pth"), ValueError,
                             "cannot read checkpoint.*truncated"),
    "a text file as checkpoint": (lambda f: models.load_weights(_resnet(), f / "text.pth"), ValueError,
                                  "cannot read checkpoint"),
    "a checkpoint holding a tensor": (lambda f: models.load_weights(_resnet(), f / "tensor.pth"), TypeError,
                                      "holds a Tensor, not a state_dict"),
    "checkpoint of another architecture": (lambda f: models.load_weights(_resnet(), f / "alexnet.pth"), KeyError,
                                           "another architecture"),
    "checkpoint with other num_classes": (lambda f: models.load_weights(models.resnet18(num_classes=7),
                                                                        f / "resnet18.pth"),
                                          ValueError, r"fc.weight: checkpoint \(4, 512\) vs model \(7, 512\)"),
    "state_dict with no tensors": (lambda f: models.load_weights(_resnet(), {"epoch": 3}), ValueError,
                                   "no state_dict found"),
    # models run on bad input
    "model input not 4-D": (lambda f: _resnet()(torch.randn(3, 32, 32)), ValueError, "x must be 4-D"),
    "model input with wrong channels": (lambda f: _resnet()(torch.randn(1, 1, 32, 32)), ValueError,
                                        "x has 1 channels but weight expects 3"),
    "model input of integers": (lambda f: _resnet()(torch.randint(0, 9, (1, 3, 32, 32))), TypeError,
                                "x must be a floating tensor"),
    "training on one value per channel": (lambda f: _resnet()(torch.randn(1, 3, 1, 1)), ValueError,
                                          "more than 1 value per channel"),
    # nn modules and helpers
    "module activation unknown": (lambda f: cnn.ConvBNAct(3, 4, 3, activation="gelu")(torch.randn(1, 3, 8, 8)),
                                  ValueError, "activation must be one of"),
    "module groups not dividing": (lambda f: cnn.ConvBNAct(3, 4, 3, groups=2), ValueError, "divisible by groups"),
    "SE gate on other channels": (lambda f: cnn.SqueezeExcite(8)(torch.randn(1, 4, 8, 8)), ValueError,
                                  "fc1_weight must have shape"),
    "dense block on other channels": (lambda f: cnn.DenseBlock(2, 8, 4, 4)(torch.randn(1, 5, 8, 8)), ValueError,
                                      r"x must be \[N, 8, H, W\]"),
    "fused pair of mismatched modules": (lambda f: cnn.ConvBNAct.from_modules(torch.nn.Conv2d(3, 4, 3),
                                                                              torch.nn.BatchNorm2d(5)),
                                         ValueError, "bn has 5 features but conv has 4 output channels"),
    "fused conv with reflect padding": (lambda f: cnn.BNActConv.from_modules(
        torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")), ValueError,
        "integer zero padding"),
    "convert a non-module": (lambda f: cnn.convert("resnet"), TypeError, "model must be a torch.nn.Module"),
    "freeze a non-module": (lambda f: cnn.freeze(3), TypeError, "model must be a torch.nn.Module"),
    # analysis and eval
    "summary of a non-module": (lambda f: analysis.summary("resnet", (3, 32, 32)), TypeError,
                                "model must be a torch.nn.Module"),
    "summary with a 2-D input size": (lambda f: analysis.summary(_resnet(), (3, 32)), ValueError,
                                      r"input_size must be \(C, H, W\) or \(N, C, H, W\)"),
    "summary with a negative size": (lambda f: analysis.summary(_resnet(), (3, -1, 32)), ValueError,
                                     "must be positive"),
    "summary with a non-int size": (lambda f: analysis.summary(_resnet(), (3, 32.5, 32)), TypeError,
                                    "input_size must be a sequence of ints"),
    "summary with two batch sizes": (lambda f: analysis.summary(_resnet(), (2, 3, 32, 32), batch_size=4),
                                     ValueError, "give one of them"),
    "multi_crop of a 3-D image": (lambda f: cn_eval.multi_crop(_resnet(), torch.randn(3, 32, 32), crop_size=16),
                                  ValueError, r"images must be a floating \[N, C, H, W\] tensor, got a 3-D"),
    "multi_crop of integer images": (lambda f: cn_eval.multi_crop(_resnet(), torch.zeros(1, 3, 32, 32,
                                                                                           dtype=torch.uint8),
                                                                  crop_size=16), ValueError, "floating"),
    "multi_crop with 5 crops": (lambda f: cn_eval.multi_crop(_resnet(), torch.randn(1, 3, 32, 32), crops=5),
                                ValueError, "crops must be 10 or 144"),
    "multi_crop crop larger than image": (lambda f: cn_eval.multi_crop(_resnet(), torch.randn(1, 3, 32, 32),
                                                                       crop_size=64, resize=None),
                                          ValueError, "crop size 64 is larger than the image 32x32"),
    "ensemble of nothing": (lambda f: cn_eval.ensemble([]), ValueError, "at least one model"),
    "forcing an unknown backend": (lambda f: cnnkernels.use_backend("tpu").__enter__(), cnnkernels.BackendError,
                                   "tpu"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_raises_a_clear_error(case, checkpoints):
    call, error, match = CASES[case]
    with pytest.raises(error, match=match):
        call(checkpoints)


@pytest.mark.parametrize("args, match", [
    (["--models", "resnet9"], "--models: unknown model 'resnet9'"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--dtype", "float8"], "--dtype 'float8': choose from"),
])
def test_bench_cli_rejects_bad_arguments_with_usage(args, match):
    result = subprocess.run([sys.executable, "-m", "cnnkernels.bench", *args], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and match in result.stderr, result.stderr[-2000:]
