"""The `torch` backend: plain PyTorch on any device and dtype. It is the reference of every op and the oracle of
every backend's tests; nothing here is tuned at the expense of clarity."""
