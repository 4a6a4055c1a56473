"""The stop-and-resume check shared by the training tests: heads trained straight through, and
heads trained the same way but stopped, checkpointed and resumed as a restarted worker does."""

from __future__ import annotations

from flmm.optim import build_optimizer
from pipeline.train import build_trainable_heads, restore_training_state, save_checkpoint


def straight_and_resumed(config, train, data, total: int, stop: int, directory):
    """(heads trained ``total`` steps straight, heads trained ``stop`` steps, checkpointed to
    ``directory``, restored into fresh heads and trained the remaining steps). ``train(heads,
    optim, schedule, config, data, first, n)`` runs steps ``first … first + n - 1``."""
    straight = build_trainable_heads(config)
    optim, schedule = build_optimizer(straight, total, config.optim)
    train(straight, optim, schedule, config, data, 0, total)

    first = build_trainable_heads(config)
    optim, schedule = build_optimizer(first, total, config.optim)
    train(first, optim, schedule, config, data, 0, stop)
    save_checkpoint(directory, first, optim, schedule, stop)
    del first, optim, schedule

    resumed = build_trainable_heads(config)  # a restarted worker: fresh heads, then the state
    state = restore_training_state(directory, resumed)
    optim, schedule = build_optimizer(resumed, total, config.optim)
    optim.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    assert state["step"] == stop and schedule.last_epoch == stop
    train(resumed, optim, schedule, config, data, stop, total - stop)
    return straight, resumed
