"""TSD-SR (one-step super-resolution distilled from Stable Diffusion 3) in JAX/Flax."""
