"""kiln.frontends: capture PyTorch programs into kiln IR (dynamo/AOTAutograd, torch.export)
and load models (HF directories, GGUF files, the default SmolLM2)."""
