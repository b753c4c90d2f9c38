"""The speed paths compute the same numbers as the plain ones they replace.

Inference takes shortcuts that autograd cannot (attention weights by blocks of query rows,
two-pass Swoosh, skipped all-False masks); adapter training skips gradients of frozen
weights. Each test runs both paths on the same inputs and pins them within 1e-4 (1e-5 where
the arithmetic is the same up to rounding).
"""

from __future__ import annotations

import pytest
import torch

from zipvoice.models.modules import scaling, zipformer
from zipvoice.models.modules.fastpath import OneDnnLinears, onednn_linear_available
from zipvoice.models.modules.scaling import ActivationDropoutAndLinear
from zipvoice.models.modules.zipformer import RelPositionMultiheadAttentionWeights, TTSZipformer

ATOL = 1e-4


def _attention_module(seed: int = 0) -> tuple[RelPositionMultiheadAttentionWeights, torch.Tensor]:
    torch.manual_seed(seed)
    module = RelPositionMultiheadAttentionWeights(
        embed_dim=64, pos_dim=16, num_heads=4, query_head_dim=8, pos_head_dim=4
    ).eval()
    with torch.no_grad():  # large enough scores that a misplaced offset shows
        module.linear_pos.weight.normal_(std=1.0)
    pos_encoder = zipformer.CompactRelPositionalEncoding(16, dropout_rate=0.0)
    return module, pos_encoder


@pytest.mark.parametrize("seq_len", [1, 7, 37])
@pytest.mark.parametrize("masks", ["none", "padding", "both"])
def test_blocked_attention_weights_equal_the_autograd_path(monkeypatch, seq_len, masks):
    module, pos_encoder = _attention_module()
    x = torch.randn(seq_len, 3, 64)
    pos_emb = pos_encoder(x)
    padding = attn_mask = None
    if masks != "none":
        lengths = torch.tensor([seq_len, max(1, seq_len - 3), max(1, seq_len // 2)])
        padding = torch.arange(seq_len)[None, :] >= lengths[:, None]
    if masks == "both":
        attn_mask = torch.rand(seq_len, seq_len) < 0.2
    x_grad = x.clone().requires_grad_(True)  # requires_grad: the unblocked autograd path
    reference = module(x_grad, pos_emb, key_padding_mask=padding, attn_mask=attn_mask)
    # Blocks of 1, 2 and 5 rows: every boundary case of the offset window.
    for rows in (1, 2, 5):
        monkeypatch.setattr(zipformer, "_SCORE_BLOCK_ELEMENTS", rows * 4 * 3 * seq_len)
        with torch.inference_mode():
            blocked = module(x, pos_emb, key_padding_mask=padding, attn_mask=attn_mask)
        torch.testing.assert_close(blocked, reference.detach(), atol=1e-6, rtol=1e-5)


def test_blocked_attention_without_positional_scores_matches():
    module, pos_encoder = _attention_module(seed=1)
    x = torch.randn(11, 2, 64)
    pos_emb = pos_encoder(x)
    q, k, p = torch.randn(4, 2, 11, 8), torch.randn(4, 2, 8, 11), torch.randn(4, 2, 11, 4)
    expected = torch.matmul(q, k).softmax(dim=-1)
    got = zipformer._blocked_attention_weights(q, k, p, None, None, None)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert pos_emb.shape == (1, 21, 16)


def test_exported_attention_weights_match_at_every_length_without_a_gather(tmp_path):
    """The export's positional scores (one padded column, a flat slice, no index tensor) give
    onnxruntime the autograd path's weights at lengths other than the traced one, T = 1 too."""
    import onnx
    import onnxruntime as ort

    module, pos_encoder = _attention_module(seed=2)
    x = torch.randn(9, 2, 64)
    path = tmp_path / "attention.onnx"
    torch.onnx.export(
        module,
        (x, pos_encoder(x)),
        str(path),
        dynamo=False,
        opset_version=13,
        input_names=["x", "pos_emb"],
        dynamic_axes={"x": {0: "T", 1: "B"}, "pos_emb": {1: "P"}},
    )
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "GatherElements" not in ops, ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for seq_len in (1, 2, 7, 37):
        x = torch.randn(seq_len, 3, 64)
        pos_emb = pos_encoder(x)
        reference = module(x.requires_grad_(True), pos_emb).detach()
        feeds = {"x": x.detach().numpy(), "pos_emb": pos_emb.numpy()}
        (got,) = session.run(None, feeds)
        torch.testing.assert_close(torch.from_numpy(got), reference, atol=1e-6, rtol=1e-5)


def test_exported_convolution_module_is_2d_and_matches_at_every_length(tmp_path):
    """The export writes the depthwise convolution as a 2-D one (onnxruntime's fast kernels)
    and onnxruntime computes the eager module's output at lengths other than the traced one."""
    import onnx
    import onnxruntime as ort

    torch.manual_seed(3)
    module = zipformer.ConvolutionModule(channels=32, kernel_size=7).eval()
    x = torch.randn(11, 2, 32)
    path = tmp_path / "conv.onnx"
    torch.onnx.export(
        module,
        (x,),
        str(path),
        dynamo=False,
        opset_version=13,
        input_names=["x"],
        dynamic_axes={"x": {0: "T", 1: "B"}},
    )
    graph = onnx.load(str(path)).graph
    (conv,) = [n for n in graph.node if n.op_type == "Conv"]
    kernel = [list(a.ints) for a in conv.attribute if a.name == "kernel_shape"]
    assert kernel == [[1, 7]], kernel
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for seq_len in (1, 5, 40):
        x = torch.randn(seq_len, 3, 32)
        with torch.no_grad():
            expected = module(x)
        (got,) = session.run(None, {"x": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["SwooshL", "SwooshR"])
def test_two_pass_swoosh_equals_the_formula(name):
    x = torch.cat([torch.linspace(-60.0, 60.0, 4001), torch.randn(1000) * 5])
    formula = scaling.swoosh_l_formula if name == "SwooshL" else scaling.swoosh_r_formula
    fast = scaling.swoosh_l if name == "SwooshL" else scaling.swoosh_r
    with torch.no_grad():
        torch.testing.assert_close(fast(x), formula(x), atol=1e-6, rtol=1e-6)
    value, deriv = scaling._swoosh_forward_and_deriv(x, *scaling._ACTIVATIONS[name])
    offset = scaling._ACTIVATIONS[name][0]
    torch.testing.assert_close(value, formula(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(deriv, torch.sigmoid(x - offset) - 0.08, atol=1e-7, rtol=0)


@pytest.mark.parametrize("name", ["SwooshL", "SwooshR"])
def test_export_swoosh_equals_the_formula_and_exports_eight_ops(name, tmp_path):
    """The exporters' Swoosh (LeakyRelu / Sigmoid / Log, 8 ONNX ops) equals the formula over
    a wide range, large |x| included, and onnxruntime computes the same from its graph."""
    import onnx
    import onnxruntime as ort

    x = torch.cat([torch.linspace(-1e4, 1e4, 2001), torch.linspace(-60.0, 60.0, 4001)])
    formula = scaling.swoosh_l_formula if name == "SwooshL" else scaling.swoosh_r_formula
    module = scaling.SwooshL() if name == "SwooshL" else scaling.SwooshR()
    got = scaling._swoosh_for_export(x, *scaling._ACTIVATIONS[name])
    torch.testing.assert_close(got, formula(x), atol=2e-6, rtol=1e-6)
    path = tmp_path / "swoosh.onnx"
    torch.onnx.export(module.eval(), (x,), str(path), dynamo=False, opset_version=13)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node if n.op_type != "Constant"]
    assert len(ops) == 8 and {"LeakyRelu", "Sigmoid", "Log"} <= set(ops), ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (ort_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(ort_out), formula(x), atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("activation", ["SwooshL", "SwooshR"])
def test_activation_linear_gradients_match_plain_autograd(frozen, activation):
    torch.manual_seed(0)
    module = ActivationDropoutAndLinear(24, 16, activation=activation, dropout_p=0.0).train()
    module.weight.requires_grad_(not frozen)
    module.bias.requires_grad_(not frozen)
    x = (torch.randn(5, 3, 24) * 4).requires_grad_(True)
    out_grad = torch.randn(5, 3, 16)
    module(x).backward(out_grad)  # the custom Function (recomputing in backward)
    got = [x.grad] + ([] if frozen else [module.weight.grad, module.bias.grad])

    x2 = x.detach().clone().requires_grad_(True)
    weight = module.weight.detach().clone().requires_grad_(not frozen)
    bias = module.bias.detach().clone().requires_grad_(not frozen)
    formula = scaling.swoosh_l_formula if activation == "SwooshL" else scaling.swoosh_r_formula
    torch.nn.functional.linear(formula(x2), weight, bias).backward(out_grad)
    expected = [x2.grad] + ([] if frozen else [weight.grad, bias.grad])
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if frozen:
        assert module.weight.grad is None and module.bias.grad is None


def _small_decoder() -> TTSZipformer:
    """A three-stack decoder (one downsampled) in eval mode, seeded."""
    torch.manual_seed(0)
    return TTSZipformer(
        in_dim=30,
        out_dim=10,
        downsampling_factor=(1, 2, 1),
        num_encoder_layers=(1, 1, 1),
        cnn_module_kernel=(7, 5, 7),
        encoder_dim=64,
        query_head_dim=8,
        value_head_dim=4,
        num_heads=4,
        feedforward_dim=96,
        pos_dim=16,
        time_embed_dim=32,
    ).eval()


def test_decoder_inference_path_matches_the_autograd_path():
    """The whole decoder: eval forward under inference_mode (blocked attention, two-pass
    Swoosh, mask skipping) against the same forward with autograd recording."""
    decoder = _small_decoder()
    x, t = torch.randn(2, 45, 30), torch.tensor([0.3, 0.8])
    padded = torch.arange(45)[None, :] >= torch.tensor([45, 31])[:, None]
    for mask in (padded, torch.zeros_like(padded)):
        x_grad = x.clone().requires_grad_(True)
        reference = decoder(x_grad, t=t, padding_mask=mask).detach()
        with torch.inference_mode():
            fast = decoder(x, t=t, padding_mask=mask)
        torch.testing.assert_close(fast, reference, atol=ATOL, rtol=0)


def _scaled_adam_run(foreach: bool, compiled: bool | None = False) -> list[torch.Tensor]:
    """Twelve ScaledAdam steps on mixed shapes and dtypes (matrices, vectors, scalars, a
    float64 matrix, a tensor whose gradient is missing on some steps), with gradient clipping
    active on two of them."""
    from zipvoice.utils.optim import ScaledAdam

    torch.manual_seed(0)
    shapes = [(64, 32), (32,), (1,), (7, 3, 5), (300, 40), (40,), (1,), (20, 30), (9, 9)]
    params = [
        torch.nn.Parameter(torch.randn(shape) * (2.0 if i % 3 == 0 else 0.05))
        for i, shape in enumerate(shapes)
    ]
    params[7].data = params[7].data.double()  # a float64 tensor among float32 ones
    optimizer = ScaledAdam(params, lr=0.02, clipping_scale=2.0, foreach=foreach, compiled=compiled)
    generator = torch.Generator().manual_seed(1)
    for step in range(12):
        scale = 1e-2 if step in (5, 9) else 1e-3  # large gradients: clipped
        for i, p in enumerate(params):
            missing = i == len(params) - 1 and step in (2, 3, 4)
            grad = torch.randn(p.shape, generator=generator) * scale
            p.grad = None if missing else grad.to(p.dtype)
        optimizer.step()
    assert optimizer._num_clipped == 2
    return [p.detach() for p in params]


@pytest.mark.parametrize("chunk_elements", [None, 1000])
def test_fused_scaled_adam_equals_the_per_tensor_loop(chunk_elements, monkeypatch):
    """The torch._foreach_* update (reductions in another order, clipping and bias
    correction folded into scalars) against the plain per-tensor loop: the same parameters up
    to float rounding, also when tensors are cut into pieces across chunks (1000 elements:
    the (64, 32) and (300, 40) matrices span several)."""
    import zipvoice.utils.optim as optim

    if chunk_elements is not None:
        monkeypatch.setattr(optim, "_FOREACH_CHUNK_ELEMENTS", chunk_elements)
    fused, loop = _scaled_adam_run(True), _scaled_adam_run(False)
    for a, b in zip(fused, loop, strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)
    torch.manual_seed(0)
    moved = torch.randn(64, 32) * 2.0
    assert (fused[0] - moved).abs().max() > 1e-3  # the steps did move the weights


def test_compiled_scaled_adam_equals_the_per_tensor_loop(monkeypatch):
    """The compiled update (inductor) of large tensors, here those of 1000 elements or more
    (the (64, 32) and (300, 40) matrices; the others take the foreach ops in the same step),
    against the plain loop; and it is on by default only for large groups on the CPU."""
    import zipvoice.utils.optim as optim

    monkeypatch.setattr(optim, "_COMPILED_MIN_TENSOR", 1000)
    kernel = optim._compiled_tensor_update("cpu")
    assert kernel is not None, "inductor could not build the update on this machine"
    calls = []

    def counted(*args):
        calls.append(args[0].numel())
        return kernel(*args)

    monkeypatch.setattr(optim, "_compiled_tensor_update", lambda device_type: counted)
    compiled, loop = _scaled_adam_run(True, compiled=True), _scaled_adam_run(False)
    assert sorted(set(calls)) == [2048, 12000] and len(calls) == 24
    for a, b in zip(compiled, loop, strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)

    params = [torch.nn.Parameter(torch.zeros(4000))]
    default = optim.ScaledAdam(params)
    assert default._compiled_update(params) is None  # 4000 elements: not worth compiling
    monkeypatch.setattr(optim, "_COMPILED_MIN_ELEMENTS", 4000)
    assert default._compiled_update(params) is counted
    assert optim.ScaledAdam(params, compiled=False)._compiled_update(params) is None


@pytest.mark.parametrize("kernel", [31, 7])
@pytest.mark.parametrize("padded", [False, True])
def test_channels_last_depthwise_conv_equals_conv1d(kernel, padded):
    """The convolution module's inference layout against Conv1d on (B, C, T)."""
    from zipvoice.models.modules.fastpath import gated_depthwise_conv

    torch.manual_seed(0)
    conv = torch.nn.Conv1d(24, 24, kernel, groups=24, padding=kernel // 2)
    x, gate = torch.randn(40, 3, 24), torch.rand(40, 3, 24)
    mask = torch.arange(40)[None, :] >= torch.tensor([40, 33, 5])[:, None] if padded else None
    plain = (x * gate).permute(1, 2, 0)
    if mask is not None:
        plain = plain.masked_fill(mask.unsqueeze(1), 0.0)
    with torch.no_grad():
        expected = conv(plain)
        got = gated_depthwise_conv(conv, x, gate, mask)
    assert got.shape == expected.shape == (3, 24, 40)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("training", [True, False])
def test_activation_linear_on_a_permuted_input_with_a_frozen_weight(batch, training):
    """The convolution module's case: (T, B, C) viewed from (B, C, T), weight frozen; one 2-D
    product (not matmul's per-frame products) with the same values and input gradient."""
    torch.manual_seed(0)
    module = ActivationDropoutAndLinear(24, 16, activation="SwooshR", dropout_p=0.0)
    module.train(training).requires_grad_(False)
    x = (torch.randn(batch, 24, 30) * 3).permute(2, 0, 1).requires_grad_(training)
    out = module(x)
    expected = torch.nn.functional.linear(scaling.swoosh_r_formula(x), module.weight, module.bias)
    assert out.shape == (30, batch, 16)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    if training:
        out_grad = torch.randn(30, batch, 16)
        (got,) = torch.autograd.grad(out, x, out_grad)
        (want,) = torch.autograd.grad(expected, x, out_grad)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _autograd_whitening_metric(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """The whitening metric as upstream writes it, for autograd to differentiate."""
    x = x.reshape(-1, x.shape[-1])
    frames, channels = x.shape
    x = x.reshape(frames, num_groups, channels // num_groups).transpose(0, 1)
    x = x - x.mean(dim=1, keepdim=True)
    covar = torch.matmul(x.transpose(1, 2), x)
    mean_diag = torch.diagonal(covar, dim1=1, dim2=2).mean()
    return (covar**2).sum() / (num_groups * x.shape[2]) / (mean_diag**2 + 1.0e-20)


@pytest.mark.parametrize("num_groups", [1, 4])
@pytest.mark.parametrize("frames", [50, 3], ids=["covariance", "gram"])
def test_written_out_whitening_gradient_equals_autograd(num_groups, frames):
    """Whiten's backward computes the metric's gradient by hand (one product fewer), from the
    covariance or, with fewer frames than channels per group (2 x 3 = 6 against 8 or 32), from
    the frames' Gram matrix: either must equal autograd's through the plain formula, and be
    skipped below the limit."""
    from zipvoice.models.modules.scaling import _whitening_penalty

    torch.manual_seed(0)
    mixing = torch.randn(32, 32) + 3 * torch.eye(32)  # correlated channels: far from white
    x = (torch.randn(frames, 2, 32) @ mixing + 0.5).requires_grad_(True)
    reference = _autograd_whitening_metric(x, num_groups)
    reference.backward()
    metric, grad = _whitening_penalty(x.detach(), num_groups, limit=1.0)
    assert metric == pytest.approx(float(reference.detach()), rel=1e-5)
    assert grad is not None and grad.shape == x.shape
    torch.testing.assert_close(grad, x.grad, rtol=1e-4, atol=1e-7 * float(x.grad.abs().max()))
    assert _whitening_penalty(x.detach(), num_groups, limit=metric * 1.01) == (metric, None)


def _autograd_balancer_grad(x, x_grad, min_mean, max_mean, min_rms, max_rms, scale, dim):
    """The Balancer's edited gradient as upstream computes it: autograd through the loss on
    the whole tensor."""
    x = x.detach().requires_grad_(True)
    mean_dims = [i for i in range(x.ndim) if i != dim % x.ndim]
    uncentered_var = (x**2).mean(dim=mean_dims, keepdim=True)
    mean = x.mean(dim=mean_dims, keepdim=True)
    stddev = (uncentered_var - mean * mean).clamp(min=1.0e-20).sqrt()
    rms = uncentered_var.clamp(min=1.0e-20).sqrt()
    m = mean / stddev
    m_loss = (m - m.clamp(min=min_mean, max=max_mean)).abs()
    r_loss = (rms.clamp(min=min_rms, max=max_rms) / rms).log().abs()
    (m_loss + r_loss).sum().backward()
    loss_rms = (x.grad**2).mean(dim=mean_dims, keepdim=True).sqrt().clamp(min=1.0e-20)
    return x_grad + x_grad.abs() * x.grad * (scale / loss_rms)


@pytest.mark.parametrize("channel_dim", [-1, 1])
def test_balancer_gradient_from_channel_statistics_equals_autograd(channel_dim):
    """Balancer's backward differentiates its loss through the per-channel mean and mean
    square only: the same edited gradient as autograd through the whole tensor."""
    from zipvoice.models.modules.scaling import _BalancerFunction

    torch.manual_seed(0)
    x = torch.randn(30, 3, 16)
    # Channels out of range both ways: shifted means (sign balance), tiny and huge rms.
    x = x * torch.logspace(-2, 1.5, 16) + torch.linspace(-3, 3, 16)
    if channel_dim == 1:
        x = x.transpose(1, 2).contiguous()  # (30, 16, 3)
    x_grad = torch.randn(x.shape)
    settings = (-0.5, 0.5, 0.2, 4.0, 0.04, channel_dim)
    leaf = x.clone().requires_grad_(True)
    _BalancerFunction.apply(leaf, *settings).backward(x_grad)
    reference = _autograd_balancer_grad(x, x_grad, *settings)
    assert (leaf.grad - x_grad).abs().max() > 1e-3  # the edit is there
    torch.testing.assert_close(leaf.grad, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", [31, 7])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("permuted", [False, True])
def test_channels_last_depthwise_conv_training_equals_conv1d(kernel, batch, permuted):
    """The training path's depthwise convolution (channels-last forward, hand-written
    backward) against Conv1d and its autograd: output, input, weight and bias gradients, for
    a contiguous input and for the convolution module's (T, B, C) permuted to (B, C, T)."""
    from zipvoice.models.modules.fastpath import depthwise_conv1d, use_channels_last_conv

    torch.manual_seed(0)
    conv = torch.nn.Conv1d(24, 24, kernel, groups=24, padding=kernel // 2)
    x = torch.randn(40, batch, 24).permute(1, 2, 0) if permuted else torch.randn(batch, 24, 40)
    grad = torch.randn(batch, 24, 40)
    assert use_channels_last_conv(conv, x)
    results = []
    for fast in (True, False):
        leaf = x.clone().requires_grad_(True)
        conv.zero_grad(set_to_none=True)
        out = depthwise_conv1d(conv, leaf) if fast else conv(leaf)
        out.backward(grad)
        results.append((out.detach(), leaf.grad, conv.weight.grad, conv.bias.grad))
    for fast, plain in zip(*results, strict=True):
        torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    strided = torch.nn.Conv1d(24, 24, kernel, groups=24, padding=kernel // 2, stride=2)
    assert not use_channels_last_conv(strided, x)


onednn = pytest.mark.skipif(
    not onednn_linear_available(), reason="this torch build has no oneDNN linear operator"
)


def _linear_ops_run(fn) -> set[str]:
    """The names of the linear operators that fn() dispatched."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    names = {event.key for event in profile.key_averages()}
    return {name for name in names if "linear" in name or name in ("aten::addmm", "aten::mm")}


@onednn
def test_onednn_linears_route_inference_products_and_match_the_decoder():
    """Within the mode the decoder's products run on oneDNN (profiled), and its output stays
    within 1e-4 of MKL's."""
    decoder = _small_decoder()
    x, t = torch.randn(2, 80, 30), torch.tensor([0.3, 0.8])
    with torch.inference_mode():
        reference = decoder(x, t=t)
        with OneDnnLinears():
            ops = _linear_ops_run(lambda: decoder(x, t=t))
            fast = decoder(x, t=t)
    assert "mkldnn::_linear_pointwise" in ops
    torch.testing.assert_close(fast, reference, atol=ATOL, rtol=0)


@onednn
def test_onednn_linears_leave_what_they_cannot_run_to_f_linear():
    """Autograd, float64, autocast and products of a few rows keep F.linear's own path."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 24)
    x = torch.randn(64, 48)
    with OneDnnLinears():
        graph_ops = _linear_ops_run(lambda: layer(x).sum().backward())
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
        with torch.no_grad():
            assert "mkldnn::_linear_pointwise" in _linear_ops_run(lambda: layer(x))
            few_rows = _linear_ops_run(lambda: layer(x[:4]))
            double = layer.double()(x.double())
            with torch.autocast("cpu", dtype=torch.bfloat16):
                autocast_out = layer.float()(x)
    assert "mkldnn::_linear_pointwise" not in graph_ops | few_rows
    assert double.dtype == torch.float64
    assert autocast_out.dtype == torch.bfloat16


@onednn
def test_fast_linears_stay_off_for_compiled_and_non_cpu_modules():
    import contextlib

    from zipvoice.inference.torch_backend import fast_linears

    module = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert isinstance(fast_linears(module, "cpu"), OneDnnLinears)
    assert isinstance(fast_linears(module, "cuda"), contextlib.nullcontext)
    module[0].compile()  # marks the module; nothing is compiled until it is called
    assert isinstance(fast_linears(module, "cpu"), contextlib.nullcontext)
