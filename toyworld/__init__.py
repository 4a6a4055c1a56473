"""The toy world: synthetic grounded scenes and the small LMM and SAM pretrained on them."""
