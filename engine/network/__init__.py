"""The U-Net: its architecture and weights (`model`, `torch_unet`), the network input (`rescale`), tiled
inference to a probability map (`inference`) and training (`train`); the bundled model lies beside them."""
