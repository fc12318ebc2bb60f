"""The command line and the Ray scheduler that spreads engine stages over GPUs, CPUs and nodes."""
