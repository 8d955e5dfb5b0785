"""Writes tiny_torch_checkpoint.pth with torch.save (run once with torch 2.13.0 CPU):
the reading of PyTorch's file format without torch is tested on a file torch wrote.

    python tests/interop/data/make_torch_fixture.py

Every tensor's values are a formula the test repeats; the file exercises a nested
checkpoint (model_state_dict under "backbone." and "module." prefixes, as DataParallel
saves), a Module's state_dict (with its _metadata), a non-contiguous view, two tensors
sharing one storage at an offset, float16, bfloat16, int64 scalars and a Parameter.
"""
import collections
import os

import torch

torch.manual_seed(0)
net = torch.nn.Sequential(collections.OrderedDict(
    conv1=torch.nn.Conv2d(3, 4, 3, bias=False), bn1=torch.nn.BatchNorm2d(4)))
with torch.no_grad():
  net.conv1.weight.copy_(torch.arange(108, dtype=torch.float32).reshape(4, 3, 3, 3) / 7)
  net.bn1.weight.copy_(torch.tensor([1.5, -2.0, 0.25, 3.0]))
  net.bn1.running_var.copy_(torch.tensor([0.5, 1.0, 2.0, 4.0]))
net.bn1.num_batches_tracked.fill_(7)
backbone = net.state_dict()
model_state = collections.OrderedDict(
    [(f"module.backbone.{k}", v) for k, v in backbone.items()]
    + [("module.projector.0.weight", torch.ones(2, 4))])
shared = torch.arange(10, dtype=torch.float32)
extras = {
    "transposed": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),
    "shared": shared, "shared_tail": shared[4:],
    "half": torch.tensor([0.5, -1.25, 65504.0], dtype=torch.float16),
    "bfloat16": torch.tensor([1.0, -3.5, 1e30], dtype=torch.bfloat16),
    "parameter": torch.nn.Parameter(torch.full((2,), 0.75)),
    "long": torch.tensor(-5, dtype=torch.int64),
    "module_state_dict": backbone,  # an OrderedDict with _metadata, as Module saves it
}
torch.save({"epoch": 3, "model_state_dict": model_state, "extras": extras,
            "note": "fixture"},
           os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        "tiny_torch_checkpoint.pth"))
