"""The SD3 networks in Flax linen: the MMDiT transformer, the VAE, and LoRA layers."""
