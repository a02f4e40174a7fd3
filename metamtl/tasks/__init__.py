"""Episodes and task sampling (datasets -> tasks)."""
from .episode import Episode, TaskBatch
from .sampler import (
    EpisodeSampler,
    MetaBatchIndexSampler,
    MixedTasks,
    TaskSource,
    episode_generator,
    episode_seed,
    fixed_episodes,
    mixture_weights,
    task_batches,
)

__all__ = [
    "Episode", "TaskBatch", "EpisodeSampler", "MixedTasks", "TaskSource", "MetaBatchIndexSampler",
    "episode_generator", "episode_seed", "fixed_episodes", "mixture_weights", "task_batches",
]
