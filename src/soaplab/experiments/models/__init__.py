"""The two models of the experiments: a nanoGPT and a small colorization U-Net."""
