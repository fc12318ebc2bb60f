"""Accuracy against ground truth: one-to-one vesicle matching and Dice (`matching`), and `cryoves evaluate`
over files (`evaluate`)."""
