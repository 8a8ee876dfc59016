"""Triton kernels, installed as ``turbolm.kernels``. One file per op family."""
