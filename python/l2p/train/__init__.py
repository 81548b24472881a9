"""The L2P trainer: ``l2p-train CONFIG.yaml`` / ``torchrun -m l2p.train CONFIG.yaml``.

- ``config``: the typed run configuration (YAML in and out, ``--set`` overrides);
- ``objective``: the source's own objective on pixels (flow matching, epsilon, v);
- ``loop``: the run (source -> convert_to_pixel -> set_trainable -> train -> export);
- ``checkpoint``: atomic, pickle-free checkpoints that resume bit-exactly;
- ``distributed``: torchrun, DDP and FSDP2;
- ``ema``, ``data``, ``conditioning``, ``source``: the pieces the loop is built from.
"""

from l2p.train.config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "load_config", "train"]


def train(cfg, env=None):
    """Run the training described by ``cfg`` (a :class:`Config`); see :mod:`l2p.train.loop`."""
    from l2p.train.loop import train as _train

    return _train(cfg, env)
