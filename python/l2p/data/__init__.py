"""Training data for L2P: prompts, images rendered by the source model, the dataset that
feeds training, and a cache of the source's prompt embeddings."""
