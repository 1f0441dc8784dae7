"""Channels-last training: which models the trainer converts, and that conversion changes the layout only."""
from __future__ import annotations

import torch

import mlmi_zoo
from mlmi_zoo._weights import save_weights
from mlmi_zoo.training._device import channels_last, prefers_channels_last


def test_depthwise_models_prefer_channels_last_and_resnets_do_not():
    lite0 = mlmi_zoo.create_model("baseline_tf_efficientnet_lite0", label_names=["a", "b"], img_size=[64, 64])
    resnet = mlmi_zoo.create_model("protopnet_resnet8", label_names=["a", "b"], img_size=[28, 28])
    resnet3d = mlmi_zoo.create_model("baseline_resnet8", label_names=["a", "b"], img_size=[16, 16, 16],
                                     spatial_dims=3)
    assert prefers_channels_last(lite0)
    assert not prefers_channels_last(resnet) and not prefers_channels_last(resnet3d)


def test_conversion_keeps_parameters_values_and_outputs(tmp_path):
    torch.manual_seed(0)
    model = mlmi_zoo.create_model("protopnet_resnet8", label_names=["a", "b"], img_size=[28, 28]).eval()
    model3d = mlmi_zoo.create_model("baseline_resnet8", label_names=["a", "b"], img_size=[16, 16, 16],
                                    spatial_dims=3).eval()
    for m, x in ((model, torch.rand(2, 1, 28, 28)), (model3d, torch.rand(2, 1, 16, 16, 16))):
        params = dict(m.named_parameters())
        before = {k: v.detach().clone() for k, v in m.state_dict().items()}
        with torch.no_grad():
            out = m(x)
        channels_last(m)  # a 2-D model holds 4-D prototypes, a 3-D one 5-D convolutions: both are handled
        assert all(params[k] is p for k, p in m.named_parameters())  # an optimiser built before still sees them
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}
        assert all(p.is_contiguous(memory_format=fmt[p.dim()]) for p in m.parameters() if p.dim() in fmt)
        assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
        with torch.no_grad():
            again = m(x)
        logits = (lambda o: o["logits"] if isinstance(o, dict) else getattr(o, "logits", o))
        torch.testing.assert_close(logits(again), logits(out), rtol=1e-4, atol=1e-5)
        save_weights(m.state_dict(), tmp_path / f"w{x.dim()}.safetensors")  # saved contiguous: safetensors accepts it
