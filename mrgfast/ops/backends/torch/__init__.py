"""The torch backend: the "cpu" backend of ops whose fast CPU path is PyTorch itself, fused (no native code)."""
