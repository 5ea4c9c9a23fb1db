"""The project's experiments (the Gaussian-mixture lab in experiments.gmm)."""
