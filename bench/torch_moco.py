"""MoCo in plain PyTorch as the official code writes it (bench reference).

`MoCo` follows facebookresearch/moco `moco/builder.py` (momentum update
before the key forward, shuffle BN, l_pos / l_neg, enqueue after the loss)
with the one-device batch shuffle and `SplitBatchNorm` of the official
CIFAR-10 demo (`moco_cifar10_demo.ipynb`). The encoders are torchvision's
ResNet layouts (ResNet-50; a CIFAR-style ResNet-18 of a given width with a
3x3 stem and no max-pool), initialised as torchvision does. Bench-only: the
library never imports torch outside its torch backend.
"""

import math

import torch
from torch import nn
from torch.nn import functional


class SplitBatchNorm(nn.BatchNorm2d):
    """The official CIFAR demo's split BN: `num_splits` groups of the batch."""

    def __init__(self, channels, num_splits):
        super().__init__(channels)
        self.num_splits = num_splits

    def forward(self, x):
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        running_mean = self.running_mean.repeat(self.num_splits)
        running_var = self.running_var.repeat(self.num_splits)
        out = functional.batch_norm(
            x.view(-1, c * self.num_splits, h, w),
            running_mean,
            running_var,
            self.weight.repeat(self.num_splits),
            self.bias.repeat(self.num_splits),
            True,
            self.momentum,
            self.eps,
        ).view(n, c, h, w)
        self.running_mean.data.copy_(
            running_mean.view(self.num_splits, c).mean(dim=0)
        )
        self.running_var.data.copy_(
            running_var.view(self.num_splits, c).mean(dim=0)
        )
        return out


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = norm(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = norm(planes * 4)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                norm(planes * 4),
            )

    def forward(self, x):
        out = functional.relu(self.bn1(self.conv1(x)))
        out = functional.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return functional.relu(out + identity)


class Basic(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                norm(planes),
            )

    def forward(self, x):
        out = functional.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return functional.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet with MoCo's head as `fc` (v2: an MLP)."""

    def __init__(self, arch, width, bn_splits, dim=128, mlp=True):
        super().__init__()

        def norm(channels):
            return SplitBatchNorm(channels, bn_splits)

        if arch == "resnet50":
            block, layers, cifar_stem = Bottleneck, (3, 4, 6, 3), False
        elif arch == "cifar_resnet18":
            block, layers, cifar_stem = Basic, (2, 2, 2, 2), True
        else:
            raise ValueError(f"Unknown arch {arch!r}")
        if cifar_stem:
            self.stem = nn.Sequential(
                nn.Conv2d(3, width, 3, 1, 1, bias=False),
                norm(width),
                nn.ReLU(),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(3, width, 7, 2, 3, bias=False),
                norm(width),
                nn.ReLU(),
                nn.MaxPool2d(3, 2, 1),
            )
        blocks, inplanes = [], width
        for stage, count in enumerate(layers):
            planes = width * 2**stage
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(block(inplanes, planes, stride, norm))
                inplanes = planes * block.expansion
        self.layers = nn.Sequential(*blocks)
        self.feature_dim = inplanes
        if mlp:
            self.fc = nn.Sequential(
                nn.Linear(inplanes, inplanes),
                nn.ReLU(),
                nn.Linear(inplanes, dim),
            )
        else:
            self.fc = nn.Linear(inplanes, dim)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(
                    module.weight, mode="fan_out", nonlinearity="relu"
                )

    def features(self, x):
        """Pooled backbone features (what a linear classifier reads)."""
        x = self.layers(self.stem(x))
        return torch.flatten(functional.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x):
        return self.fc(self.features(x))


class MoCo(nn.Module):
    """`moco/builder.py`'s MoCo with the CIFAR demo's one-device shuffle."""

    def __init__(self, encoder_fn, dim=128, K=65536, m=0.999, T=0.07):
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.encoder_q, self.encoder_k = encoder_fn(), encoder_fn()
        for param_q, param_k in zip(
            self.encoder_q.parameters(),
            self.encoder_k.parameters(),
            strict=True,
        ):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False
        self.register_buffer(
            "queue", functional.normalize(torch.randn(dim, K), dim=0)
        )
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        for param_q, param_k in zip(
            self.encoder_q.parameters(),
            self.encoder_k.parameters(),
            strict=True,
        ):
            param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)
        assert self.K % batch_size == 0
        self.queue[:, ptr : ptr + batch_size] = keys.t()
        self.queue_ptr[0] = (ptr + batch_size) % self.K

    def forward(self, im_q, im_k):
        q = functional.normalize(self.encoder_q(im_q), dim=1)  # N x C
        with torch.no_grad():
            self._momentum_update_key_encoder()
            idx_shuffle = torch.randperm(im_k.shape[0])  # N
            idx_unshuffle = torch.argsort(idx_shuffle)  # N
            k = self.encoder_k(im_k[idx_shuffle])  # N x C
            k = functional.normalize(k, dim=1)[idx_unshuffle]  # N x C
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # N x 1
        l_neg = torch.einsum(
            "nc,ck->nk", q, self.queue.clone().detach()
        )  # N x K
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T  # N x (1+K)
        labels = torch.zeros(logits.shape[0], dtype=torch.long)  # N
        self._dequeue_and_enqueue(k)
        return logits, labels


def cosine_lr(base_lr, epoch, epochs):
    """`main_moco.py`'s `adjust_learning_rate` with `--cos`, per epoch."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
