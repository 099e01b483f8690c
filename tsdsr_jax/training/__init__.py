"""Training: the TSD-SR and teacher objectives, the optimiser steps, the run config,
checkpoints, preemption and the loop."""
