"""Triton kernels and their launchers, one op per file. Imported lazily by the ops, so
that cnnkernels works where triton is not installed."""
