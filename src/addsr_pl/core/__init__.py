"""What training and inference share, below both: the one student sampler and the exported-student format."""
