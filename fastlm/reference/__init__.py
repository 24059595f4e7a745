"""Plain-PyTorch implementations: the oracle every kernel is tested against and the CPU path."""
