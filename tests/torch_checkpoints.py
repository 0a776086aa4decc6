"""Checkpoints as the official PyTorch code and PaddleFleetX write them,
built in plain PyTorch for the converter and export tests: torchvision's
ResNet layout (the residual blocks of the plain-PyTorch reference,
`bench/torch_moco.py`) with random weights and BN statistics, and the
files' formats."""

import pickle

import torch
from torch import nn

# bench/torch_moco.py, the official code's blocks (bench/ is on pytest's
# path, pyproject.toml).
from torch_moco import Basic
from torch_moco import Bottleneck


class TorchResNet(nn.Module):
    """torchvision's ResNet (names and layout), `fc` given by `head`."""

    def __init__(self, depth=50, width=64, head=None, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        block, counts = {
            18: (Basic, (2, 2, 2, 2)),
            34: (Basic, (3, 4, 6, 3)),
            50: (Bottleneck, (3, 4, 6, 3)),
        }[depth]
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = width
        for stage, count in enumerate(counts):
            planes = width * 2**stage
            blocks = []
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(block(inplanes, planes, stride, nn.BatchNorm2d))
                inplanes = planes * block.expansion
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.feature_dim = inplanes
        self.fc = head(inplanes) if head else nn.Linear(inplanes, 1000)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    c = module.num_features
                    module.running_mean.normal_(0, 0.1, generator=generator)
                    module.running_var.uniform_(0.5, 1.5, generator=generator)
                    module.weight.uniform_(0.5, 1.5, generator=generator)
                    module.bias.normal_(0, 0.1, generator=generator)
                    assert module.weight.shape == (c,)
        self.eval()

    def features(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        for stage in range(1, 5):
            x = getattr(self, f"layer{stage}")(x)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x):
        return self.fc(self.features(x))


def v1_head(features):
    return nn.Linear(features, 128)


def v2_head(features):
    return nn.Sequential(
        nn.Linear(features, features), nn.ReLU(), nn.Linear(features, 128)
    )


def official_state(q, k, queue, ptr, prefix="module."):
    state = {}
    for side, net in (("q", q), ("k", k)):
        for name, value in net.state_dict().items():
            state[f"{prefix}encoder_{side}.{name}"] = value
    state[f"{prefix}queue"] = torch.from_numpy(queue)
    state[f"{prefix}queue_ptr"] = torch.tensor([ptr])
    return state


def save_official(path, state, arch="resnet50"):
    torch.save(
        {"epoch": 200, "arch": arch, "state_dict": state, "optimizer": {}},
        path,
    )


def paddle_names(net):
    """The backbone of `net` under PaddleFleetX's names (no fc)."""
    renamed = {"running_mean": "_mean", "running_var": "_variance"}
    state = {}
    for name, value in net.state_dict().items():
        if name.startswith("fc.") or name.endswith("num_batches_tracked"):
            continue
        prefix, _, last = name.rpartition(".")
        state[f"{prefix}.{renamed.get(last, last)}"] = value.numpy()
    return state


def save_pdparams(path, state):
    state = {**state, "StructuredToParameterName@@": {"x": "y"}}
    with open(path, "wb") as f:
        pickle.dump(state, f, protocol=4)


def classifier_head(features):
    return nn.Linear(features, 10)
