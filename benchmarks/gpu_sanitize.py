"""A tiny call of every GPU kernel, for ``compute-sanitizer`` (memcheck): the Triton verify and
sample kernels (with and without draft probs, top-p on) and the CUDA cache kernels (fp16/bf16,
odd head dim, append / rollback / gather / select_rows).

    compute-sanitizer --tool memcheck python benchmarks/gpu_sanitize.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import specdec
from specdec.cache import KVStore

dev = "cuda"
B, K, V = 3, 3, 777  # V not a multiple of any tile
logits = torch.randn(B, K + 1, V, device=dev)
ids = torch.tensor([[1, 2, 3], [4, -1, -1], [776, 5, 6]], device=dev)
q = torch.softmax(torch.randn(B, K, V, device=dev), -1)
for dt in (torch.float32, torch.bfloat16, torch.float16):
    specdec.verify(logits.to(dt), ids, q, temperature=0.8, seed=1, backend="triton")
    specdec.verify(logits.to(dt), ids, None, temperature=0.8, top_p=0.9, top_k=20, seed=1, backend="triton")
    specdec.sample(logits[:, 0].to(dt), temperature=0.7, top_p=0.9, seed=2, backend="triton")
torch.cuda.synchronize()
print("triton kernels ok")
if torch.ops.specdec_cpp.has_cuda_kernels():
    for dt in (torch.float16, torch.bfloat16):
        s = KVStore(2, 4, 2, 7, 16, dtype=dt, backend="cpp", device=dev)  # odd head dim 7
        new = torch.randn(2, 4, 2, 5, 7, device=dev, dtype=dt)
        s.append(new, new * 2)
        s.rollback(torch.tensor([2, 5, 1, 3], device=dev))
        s.gather(torch.tensor([[1, 0], [4, 2], [0, 0], [2, 1]]), torch.tensor([2, 2, 1, 2]),
                 torch.tensor([0, 1, 0, 0]))
        s.select_rows(torch.tensor([3, 0, 1], device=dev))
        s.append(torch.randn(2, 3, 2, 9, 7, device=dev, dtype=dt), torch.randn(2, 3, 2, 9, 7, device=dev, dtype=dt))
    torch.cuda.synchronize()
    print("cache kernels ok")
else:
    print("cache kernels: extension built without CUDA kernels, skipped")
