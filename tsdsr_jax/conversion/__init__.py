"""From the official PyTorch checkpoints to our model directory: weight layouts, SD3, the LoRA
adapters, LPIPS and the prompt embeddings."""
