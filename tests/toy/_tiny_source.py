"""The tiny toy source the migration-level tests train in seconds (32 px, two blocks)."""

from l2p.toy.source import ToySourceConfig

TINY = ToySourceConfig().scaled(
    image_size=32, vae_channels=(8, 16), layers=2, heads=2, head_dim=8, text_dim=16,
    text_layers=1, train_scenes=16, vae_steps=2, vae_batch=4, dit_steps=2, dit_batch=4,
    warmup_steps=1, workers=1, vae_eval_scenes=12,
)
