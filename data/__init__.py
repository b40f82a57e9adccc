"""Task generators and dataset I/O. Pure Python + numpy/pyarrow: no torch, no Ray."""
