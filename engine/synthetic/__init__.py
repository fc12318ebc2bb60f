"""Synthetic tomograms with exact ground truth: scene layouts (`phantom`) and the ways of imaging them."""
