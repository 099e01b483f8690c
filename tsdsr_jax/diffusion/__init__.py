"""The flow-matching view of the SD3 transformer: the noise schedule, the velocity and its
guidance, the one-step student, and Euler sampling."""
