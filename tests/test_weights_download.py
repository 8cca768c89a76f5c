"""Weights download when the network is there, the way each library does it, with the offline errors kept.

  * timm names: huggingface_hub's hf_hub_download into the hub cache (what timm.create_model(pretrained=True)
    does), tested against a loopback stand-in for the hub through the library's own setting, HF_ENDPOINT
    (read when huggingface_hub is imported: so in a subprocess);
  * torchvision: the weights' URL into $TORCH_HOME/hub/checkpoints (torch.hub, hash checked), tested with a
    WeightsEnum whose URL is the loopback server (the real enums name download.pytorch.org).
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys

import pytest
import torch

from embedder.errors import WeightsUnavailableError
from tests.conftest import REPO
from tests.hub import LoopbackHub
from tests.loopback import LoopbackServer

TAG = "resnet18.a1_in1k"
BUILD = """
import sys, torch
from embedder.models.backbone import build_model
from embedder.models.registry import get_backbone_spec
from embedder.models.weights import resolve_weights
spec = get_backbone_spec("timm:{tag}")
torch.save(build_model(spec, resolve_weights(spec.weights, "DEFAULT")).state_dict(), sys.argv[1])
print(spec.weights.location())
"""


def _run(env: dict, out) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-c", BUILD.format(tag=TAG), str(out)], env=env, capture_output=True,
                          text=True, timeout=600, check=False)


def test_timm_weights_download_from_the_hub_into_its_cache_and_are_read_from_it_offline(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    state = timm.create_model("resnet18").state_dict()
    (tmp_path / "hub" / "timm" / TAG).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "hub" / "timm" / TAG / "model.safetensors")
    home = tmp_path / "hf_home"
    with LoopbackHub(tmp_path / "hub") as hub:
        done = _run({"HF_ENDPOINT": hub.base, "HF_HOME": str(home), "HF_HUB_OFFLINE": "0"}, tmp_path / "a.pt")
        assert done.returncode == 0, done.stderr[-2000:]
        gets = [path for (method, path), n in hub.hits.items() if method == "GET" and "/resolve/" in path]
        assert gets == [f"/timm/{TAG}/resolve/main/model.safetensors"]
    assert done.stdout.strip().startswith(str(home / "hub" / f"models--timm--{TAG}" / "snapshots"))
    got = torch.load(tmp_path / "a.pt", weights_only=True)
    assert all(torch.equal(got[k], v) for k, v in state.items())
    # The hub gone and offline mode on: the downloaded file is read from the cache.
    again = _run({"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}, tmp_path / "b.pt")
    assert again.returncode == 0, again.stderr[-2000:]
    # An empty cache offline: the clear error, naming the hub file, the cache folder and the ways out.
    empty = _run({"HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}, tmp_path / "c.pt")
    assert empty.returncode != 0
    assert "WeightsUnavailableError" in empty.stderr and f"timm/{TAG}" in empty.stderr
    assert "HF_HOME" in empty.stderr and "--weights none" in empty.stderr


def test_torchvision_weights_download_from_their_url_into_torch_home_then_work_offline(tmp_path):
    import torchvision
    from torchvision.models._api import Weights, WeightsEnum

    from embedder.models.weights import TorchvisionWeights

    torch.manual_seed(4)
    state = torchvision.models.resnet18().state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    name = f"resnet18-{hashlib.sha256(data).hexdigest()[:8]}.pth"  # torch.hub checks this hash prefix
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / name).write_bytes(data)
    with LoopbackServer(tmp_path / "srv") as server:
        url = server.url("img", name)
        members = WeightsEnum("Served", {"V1": Weights(url=url, meta={},
                                                       transforms=torchvision.models.ResNet18_Weights.DEFAULT.transforms)})
        source = TorchvisionWeights(members.V1)
        assert not source.available_offline()
        got = source.state_dict()
        assert server.hits[f"/img/{name}"] == 1
    assert source.available_offline() and source.location().startswith(os.environ["TORCH_HOME"])
    assert all(torch.equal(got[k], v) for k, v in state.items())
    assert all(torch.equal(source.state_dict()[k], v) for k, v in state.items())  # the server is gone: read offline
    os.remove(source.location())
    with pytest.raises(WeightsUnavailableError, match=f"Download {url} on a machine with network access"):
        source.state_dict()
