"""The kernels behind the ops, one package per kind, one module per op (ops/<op>.py picks the module).

- `triton/`: Triton kernels (the "triton" backend): compiled on CUDA tensors, interpreted on CPU ones.
- `native/`: mrgfast._C (csrc/, kernels/): its C++ OpenMP kernels for CPU tensors ("cpu"), its CUDA kernels
  for CUDA tensors ("cuda"), chosen by the tensors' device.
- `torch/`: fused PyTorch code for ops whose "cpu" backend needs no native kernel (chunked, block-wise).
"""
