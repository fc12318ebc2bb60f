"""PyTorch port of the U-Net (method.md §2.5), loading the same Keras weights, for the GPU fast path.

Runs in float16 and channels-last on CUDA; on CPU in float32. Gives a `LogitFn` like
`cryoves.engine.network.model.make_logit_fn`, so `inference.predict_tiled` takes either.
"""

from pathlib import Path

import numpy as np
import torch
from torch import nn

from cryoves.engine.errors import CryovesError
from cryoves.engine.network.model import (
    BN_EPSILON,
    LOGIT_LAYER,
    POOLING_FACTOR,
    LogitFn,
    conv_layers,
    read_model_weights,
)


class _ConvBlock(nn.Sequential):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(nn.Conv3d(c_in, c_out, 3, padding=1), nn.BatchNorm3d(c_out, eps=BN_EPSILON),
                         nn.ReLU(inplace=True))


class TorchUNet(nn.Module):
    """Same layers, order and merge ([upsampled, skip]) as `model.build_unet`; outputs logits."""

    def __init__(self, n_filter_base: int = 16) -> None:
        super().__init__()
        self.names = [name for name, _, _ in conv_layers(n_filter_base)]
        self.blocks = nn.ModuleList(_ConvBlock(c_in, c_out) for _, c_in, c_out in conv_layers(n_filter_base))
        self.head = nn.Conv3d(n_filter_base, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.blocks
        skip0 = b[1](b[0](x))
        skip1 = b[3](b[2](nn.functional.max_pool3d(skip0, 2)))
        x = b[5](b[4](nn.functional.max_pool3d(skip1, 2)))
        x = b[7](b[6](torch.cat([nn.functional.interpolate(x, scale_factor=2, mode="nearest"), skip1], 1)))
        x = b[9](b[8](torch.cat([nn.functional.interpolate(x, scale_factor=2, mode="nearest"), skip0], 1)))
        return self.head(x)

    def load_keras_weights(self, weights: dict[str, list[np.ndarray]]) -> None:
        """Copy weights keyed as `model.read_model_weights` returns them (Keras layout) into this module."""
        def conv(module: nn.Conv3d, kernel: np.ndarray, bias: np.ndarray) -> None:
            module.weight.copy_(torch.from_numpy(kernel).permute(4, 3, 0, 1, 2))
            module.bias.copy_(torch.from_numpy(bias))

        with torch.no_grad():
            for name, block in zip(self.names, self.blocks):
                conv(block[0], *weights[name])
                gamma, beta, mean, var = (torch.from_numpy(a) for a in weights[f"{name}_bn"])
                bn = block[1]
                bn.weight.copy_(gamma)
                bn.bias.copy_(beta)
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
            conv(self.head, *weights[LOGIT_LAYER])


def load_torch_unet(weights: str | Path | None = None, device: str | torch.device = "cpu") -> TorchUNet:
    """TorchUNet in eval mode (BN moving statistics) on `device`, with the weights `model.load_model`
    takes: CryoVesNet's .h5, a cryoves model folder, or (None) the bundled model."""
    net = TorchUNet()
    net.load_keras_weights(read_model_weights(weights))
    return net.eval().to(device)


def make_torch_logit_fn(net: TorchUNet, *, half: bool | None = None) -> LogitFn:
    """A `LogitFn` over `net`: float16 (default) and channels-last on CUDA, float32 NCDHW on CPU."""
    device = next(net.parameters()).device
    half = device.type == "cuda" if half is None else half
    dtype = torch.float16 if half else torch.float32
    layout = torch.channels_last_3d if device.type == "cuda" else torch.contiguous_format
    net = net.to(dtype=dtype, memory_format=layout)

    def logit_fn(tiles: np.ndarray) -> np.ndarray:
        if tiles.ndim != 4 or any(s % POOLING_FACTOR for s in tiles.shape[1:]):
            raise ValueError(f"tiles must be (B, Z, Y, X) with Z, Y, X multiples of {POOLING_FACTOR}, "
                             f"got {tiles.shape}")
        x = torch.from_numpy(np.ascontiguousarray(tiles, dtype=np.float32))[:, None]
        x = x.to(device=device, dtype=dtype).contiguous(memory_format=layout)
        with torch.inference_mode():
            return net(x)[:, 0].float().cpu().numpy()

    return logit_fn


def load_gpu_logit_fn(weights=None) -> LogitFn:
    """The float16 PyTorch network on the first CUDA GPU, with the weights `load_model(weights)` would use."""
    if not torch.cuda.is_available():
        raise CryovesError("--device gpu: PyTorch sees no CUDA GPU on this machine; use --device cpu")
    return make_torch_logit_fn(load_torch_unet(weights, device="cuda"))
