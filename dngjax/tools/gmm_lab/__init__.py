"""The Gaussian-mixture lab (``python -m experiments.gmm`` / ``dngjax-gmm``): the paper's figs. 1, 3 and 7-9 and the chain-length, sampler and extension studies, on analytic mixtures."""
