"""One file per op family: argument checks, custom-op registration, autograd, dispatch."""
