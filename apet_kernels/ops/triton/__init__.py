"""Triton implementations of the op set (GPU; CPU tensors under TRITON_INTERPRET=1)."""
