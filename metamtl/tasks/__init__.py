"""Episodes and task sampling (datasets -> tasks), and task families such as the sinusoid."""
from .episode import Episode, TaskBatch
from .families import TASK_FAMILIES, load_tasks
from .l2l import Learn2LearnTasks, Learn2LearnTasksets, from_learn2learn
from .sampler import (
    EpisodeSampler,
    MetaBatchIndexSampler,
    MixedTasks,
    TaskSource,
    episode_generator,
    episode_seed,
    fixed_episodes,
    mixture_weights,
    superclass_names,
    task_batches,
    check_index,
    check_positive_int,
    check_seed,
)
from .sinusoid import Sinusoid

__all__ = [
    "Episode", "TaskBatch", "EpisodeSampler", "MixedTasks", "TaskSource", "MetaBatchIndexSampler",
    "episode_generator", "episode_seed", "fixed_episodes", "mixture_weights", "superclass_names", "task_batches",
    "check_index", "check_positive_int", "check_seed", "Sinusoid", "TASK_FAMILIES", "load_tasks",
    "from_learn2learn", "Learn2LearnTasks", "Learn2LearnTasksets",
]
