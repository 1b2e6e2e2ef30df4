"""The adapted network as one ONNX graph with its weights and BatchNorm statistics as graph inputs
("functional ONNX"), so the adapted weights of any task run in ONNX Runtime or Triton without
re-exporting: ``network.onnx`` of an inner-loop bundle, and what ``fewshot eval`` runs.
"""

from __future__ import annotations

import io
import warnings

import torch
from torch import nn

from fewshot.models.features import ONNX_OPSET
from fewshot.models.inner_loop.network import MetaConv4


def network_input_names(net: MetaConv4, step: int) -> list[str]:
    """Names of the weight inputs of ``network.onnx`` (after ``images``), in order."""
    suffix = f".{min(step, net.per_step_bn - 1)}" if net.per_step_bn else ""
    names = []
    for l in range(4):
        names += [f"conv{l}.weight", f"bn{l}.weight{suffix}", f"bn{l}.bias{suffix}", f"bn{l}.running_mean", f"bn{l}.running_var"]
    return names + ["head.weight", "head.bias"] + (["center"] if net.transform == "CL2N" else [])


def network_inputs(net: MetaConv4, params: dict[str, torch.Tensor], stats, step: int) -> dict[str, torch.Tensor]:
    """The weight inputs of ``network.onnx`` for adapted ``params`` and ``support`` BatchNorm ``stats``."""
    out = {}
    for name in network_input_names(net, step):
        if name.endswith("running_mean") or name.endswith("running_var"):
            layer = int(name[2])
            out[name] = stats[layer][0 if name.endswith("mean") else 1]
        else:
            out[name] = params[name]
    return out


class FunctionalNetwork(nn.Module):
    """``forward(images, *weights)`` -> logits, the weights in :func:`network_input_names` order."""

    def __init__(self, net: MetaConv4, step: int) -> None:
        super().__init__()
        self.net, self.step, self.names = net, step, network_input_names(net, step)

    def forward(self, images: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        named = dict(zip(self.names, weights))
        stats = [(named[f"bn{l}.running_mean"], named[f"bn{l}.running_var"]) for l in range(4)]
        return self.net.forward(named, images, stats, step=self.step)


def network_to_onnx(net: MetaConv4, example: dict[str, torch.Tensor], step: int) -> bytes:
    """Serialise the classifier with BatchNorm in ``support`` mode; inputs ``images`` (dynamic batch)
    and the weights of :func:`network_input_names` (the head's ``ways`` rows dynamic: any number of
    classes); output ``logits`` ``(batch, ways)``."""
    module = FunctionalNetwork(net, step).eval()
    names = module.names
    images = torch.zeros(2, net.in_channels, net.image_size, net.image_size)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (images, *[example[n].detach().float() for n in names]),
            buf,  # type: ignore[arg-type]  # torch's stub: the TorchScript exporter takes a file object too
            dynamo=False,
            input_names=["images", *names],
            output_names=["logits"],
            opset_version=ONNX_OPSET,
            dynamic_axes={"images": {0: "batch"}, "head.weight": {0: "ways"}, "head.bias": {0: "ways"}, "logits": {0: "batch", 1: "ways"}},
        )
    return buf.getvalue()
