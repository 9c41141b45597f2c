"""cnnkernels.bench.traffic against figures counted by hand from its rules, on real
layer shapes at batch 2, float32 (4 bytes)."""
import pytest

from cnnkernels.bench import traffic

# ResNet-50 layer1.1 conv1: x [2, 256, 56, 56] -> 1x1 -> [2, 64, 56, 56].
X1 = 2 * 256 * 56 * 56 * 4  # 6_422_528
W1 = 64 * 256 * 4           # 65_536
Y1 = 2 * 64 * 56 * 56 * 4   # 1_605_632


def test_conv_bn_relu_1x1_eval():
    t = traffic.conv_bn_act((2, 256, 56, 56), (64, 256, 1, 1), mode="eval")
    # conv x,w -> y; bn y -> y; relu y -> y
    assert t.unfused_bytes == X1 + W1 + 5 * Y1 == 14_516_224
    # fold: w -> w; conv: x, w -> y
    assert t.fused_bytes == X1 + 3 * W1 + Y1 == 8_224_768
    assert t.saved_bytes == 6_291_456
    assert t.saved_fraction == pytest.approx(6_291_456 / 14_516_224)


def test_conv_bn_relu_1x1_train():
    t = traffic.conv_bn_act((2, 256, 56, 56), (64, 256, 1, 1), mode="train")
    # forward: conv (x, w -> y), stats (y), bn (y -> y), relu (y -> y);
    # backward: relu (2y -> y), bn reduce (2y), bn (2y -> y), grad x (y, w -> x), grad w (y, x -> w)
    assert t.unfused_bytes == 3 * X1 + 3 * W1 + 16 * Y1 == 45_154_304
    # forward: conv (x, w -> y), stats (y), normalize (y -> y);
    # backward: reduce (3y), elementwise (3y -> y), grad x (y, w -> x), grad w (y, x -> w)
    assert t.fused_bytes == 3 * X1 + 3 * W1 + 13 * Y1 == 40_337_408
    assert t.saved_bytes == 3 * Y1


def test_conv_bn_residual_relu_train_counts_the_residual_gradient():
    # ResNet-50 layer1.1 conv3: 64 -> 256, 1x1, + identity, relu; y is x1-sized here.
    t = traffic.conv_bn_act((2, 64, 56, 56), (256, 64, 1, 1), residual=True, mode="train")
    x, w, y = Y1, W1, X1
    # unfused adds one add pass (2y -> y) to the 16y above; the add's backward is free
    assert t.unfused_bytes == 3 * x + 3 * w + 19 * y
    # fused: the normalize pass reads the residual (+y), the elementwise backward writes
    # grad_residual (+y)
    assert t.fused_bytes == 3 * x + 3 * w + 15 * y


def test_downsample_without_activation_eval():
    # ResNet-50 layer2.0.downsample: 256 -> 512, 1x1, stride 2, conv + bn only.
    t = traffic.conv_bn_act((2, 256, 56, 56), (512, 256, 1, 1), stride=2, activation="none", mode="eval")
    x, w, y = X1, 512 * 256 * 4, 2 * 512 * 28 * 28 * 4
    assert t.unfused_bytes == x + w + 3 * y
    assert t.fused_bytes == x + 3 * w + y


def test_stem_without_input_gradient():
    # ResNet-50 conv1: 3 -> 64, 7x7, stride 2, padding 3: 224 -> 112.
    assert traffic.conv_output_shape((2, 3, 224, 224), (64, 3, 7, 7), 2, 3) == (2, 64, 112, 112)
    with_grad = traffic.conv_bn_act((2, 3, 224, 224), (64, 3, 7, 7), stride=2, padding=3, mode="train")
    without = traffic.conv_bn_act((2, 3, 224, 224), (64, 3, 7, 7), stride=2, padding=3, mode="train",
                                  input_grad=False)
    x, w, y = 2 * 3 * 224 * 224 * 4, 64 * 3 * 49 * 4, 2 * 64 * 112 * 112 * 4
    # no grad-input pass: y and w not read, x not written, in both sequences
    assert with_grad.unfused_bytes - without.unfused_bytes == y + w + x
    assert with_grad.fused_bytes - without.fused_bytes == y + w + x


def test_add_act():
    a = X1
    eval_ = traffic.add_act((2, 256, 56, 56), mode="eval")
    assert (eval_.unfused_bytes, eval_.fused_bytes) == (5 * a, 3 * a) == (32_112_640, 19_267_584)
    train = traffic.add_act((2, 256, 56, 56), mode="train")
    assert (train.unfused_bytes, train.fused_bytes) == (8 * a, 6 * a)
    none = traffic.add_act((2, 256, 56, 56), activation="none", mode="train")
    assert (none.unfused_bytes, none.fused_bytes) == (3 * a, 3 * a)


def test_se_excite_seresnext_layer1():
    # SE-ResNeXt-50 layer1: 256 channels at 56x56, reduction 16 -> 16 hidden.
    x, f = X1, 256 * 16 * 4
    eval_ = traffic.se_excite((2, 256, 56, 56), 16, mode="eval")
    # mean (x), mlp (2f), mul (x -> x), add (2x -> x), relu (x -> x)
    assert eval_.unfused_bytes == 8 * x + 2 * f == 51_412_992
    # squeeze (x), mlp (2f), scale + residual + relu (2x -> x)
    assert eval_.fused_bytes == 4 * x + 2 * f == 25_722_880
    train = traffic.se_excite((2, 256, 56, 56), 16, mode="train")
    # backward: relu (2x -> x), mul to x (x -> x), mul to gate (2x -> x), sum (x),
    # mlp (2f -> 2f), mean (-> x), accumulate (2x -> x)
    assert train.unfused_bytes == 8 * x + 2 * f + 13 * x + 4 * f
    # backward: reduce (3x), mlp (2f -> 2f), elementwise (2x -> 2x)
    assert train.fused_bytes == 4 * x + 2 * f + 7 * x + 4 * f


def test_bn_act_conv_densenet_norm2_conv2():
    # DenseNet-121 denseblock1.denselayer1 norm2/relu2/conv2: 128 -> 32, 3x3, padding 1, 56x56.
    x, w, y = 2 * 128 * 56 * 56 * 4, 32 * 128 * 9 * 4, 2 * 32 * 56 * 56 * 4
    eval_ = traffic.bn_act_conv((2, 128, 56, 56), (32, 128, 3, 3), padding=1, mode="eval")
    assert eval_.unfused_bytes == 5 * x + w + y == 17_006_592
    assert eval_.fused_bytes == x + w + y == 4_161_536
    train = traffic.bn_act_conv((2, 128, 56, 56), (32, 128, 3, 3), padding=1, mode="train")
    # unfused: stats (x), bn (x -> x), relu (x -> x), conv (x, w -> y); grad in (y, w -> x),
    # grad w (y, x -> w), relu (2x -> x), bn reduce (2x), bn (2x -> x)
    assert train.unfused_bytes == 16 * x + 3 * w + 3 * y
    # fused: stats (x), conv (x, w -> y); grad in (y, w -> x), grad w (y, x -> w), reduce (2x),
    # elementwise (2x -> x)
    assert train.fused_bytes == 9 * x + 3 * w + 3 * y


def test_itemsize_scales_every_figure():
    fp32 = traffic.conv_bn_act((2, 128, 28, 28), (128, 4, 3, 3), padding=1, mode="train")
    bf16 = traffic.conv_bn_act((2, 128, 28, 28), (128, 4, 3, 3), padding=1, mode="train", itemsize=2)
    assert (bf16.unfused_bytes * 2, bf16.fused_bytes * 2) == (fp32.unfused_bytes, fp32.fused_bytes)


def test_extra_info_and_describe_name_the_passes():
    t = traffic.add_act((2, 8, 4, 4), mode="train")
    info = t.extra_info()
    assert info["traffic_unfused_bytes"] == 8 * 2 * 8 * 16 * 4
    assert info["traffic_saved_pct"] == 25.0
    assert info["traffic_fused_passes"] == ["add_act: x, residual -> out",
                                            "add_act backward: grad_out, out -> grad_sum"]
    assert "relu backward: grad_out, out -> grad_sum" in t.describe()
    assert t.op == "add_act" and t.describe().startswith("add_act train: unfused")
    assert info["traffic_unfused_passes"] == ["add: x, residual -> sum", "relu: sum -> out",
                                              "relu backward: grad_out, out -> grad_sum"]


@pytest.mark.parametrize("kwargs, message", [({"mode": "training"}, "mode must be one of"),
                                             ({"activation": "gelu"}, "activation must be")])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        traffic.add_act((2, 8, 4, 4), **kwargs)
