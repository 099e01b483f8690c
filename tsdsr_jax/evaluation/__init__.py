"""Scoring super-resolved images against references (PSNR, SSIM, LPIPS)."""
