"""One-step super-resolution of images: the jitted pipeline, tiling for large images, the
bicubic resize and the colour fix."""
