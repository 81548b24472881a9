"""The process layout read from torchrun's environment."""

from l2p.torchrun import DistEnv


def test_without_torchrun_the_world_is_one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    env = DistEnv.from_torchrun()
    assert (env.rank, env.world_size, env.local_rank, env.enabled, env.is_main) == (0, 1, 0, False, True)


def test_torchrun_variables(monkeypatch):
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    env = DistEnv.from_torchrun()
    assert (env.rank, env.world_size, env.local_rank, env.enabled, env.is_main) == (5, 8, 1, True, False)
