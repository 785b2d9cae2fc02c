"""kiln.backends: targets, lowering to kernels, wrapper codegen, graph capture."""
