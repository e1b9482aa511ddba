"""Triton kernels of the ``triton`` backend, one op per module with its launcher."""
