"""Tutorial: replacing a classifier head, done right.

A common mistake when adapting a pretrained network to new classes is to change the old layer's
attribute, `model.fc.out_features = 2`. It changes a number that nothing reads: the weight matrix
keeps its 1000 rows, and the network still answers 1000 scores. The head must be a *new*
`nn.Linear` whose `in_features` match what the layer below gives. embedder finds that slot for
every supported architecture and builds the head (embedder.models.heads.replace_head).

Run:  python docs/tutorials/head_replacement.py
"""

import torch
import torchvision
from torch import nn

from embedder import get_backbone_spec
from embedder.models.heads import head_slot, replace_head

x = torch.rand(2, 3, 64, 64)

# The mistake: edit the attribute of the old layer.
model = torchvision.models.resnet18(weights=None).eval()
model.fc.out_features = 2
with torch.no_grad():
    wrong = model(x)
print(f"fc.out_features = 2:  fc.weight {tuple(model.fc.weight.shape)}, the network answers {wrong.shape[1]} scores")

# Done right, by hand: a new Linear with the right in_features.
model = torchvision.models.resnet18(weights=None).eval()
model.fc = nn.Linear(model.fc.in_features, 2)
with torch.no_grad():
    right = model(x)
print(f"new nn.Linear(512, 2): fc.weight {tuple(model.fc.weight.shape)}, the network answers {right.shape[1]} scores")

# embedder: the slot and its in_features come from the architecture, for each family.
for name in ("resnet18", "vgg16", "efficientnet_lite0"):
    spec = get_backbone_spec(name)
    path, in_features = head_slot(spec, None)
    print(f"{name:<20} head slot {path:<14} in_features {in_features}")
    if name == "resnet18":
        model = torchvision.models.resnet18(weights=None).eval()
        head, where = replace_head(model, spec, None, 2)
        with torch.no_grad():
            print(f"  replace_head(..., 2) -> {where}: {head}; the network answers {model(x).shape[1]} scores")
print(f"RESULT wrong_outputs={wrong.shape[1]}")
print(f"RESULT right_outputs={right.shape[1]}")
