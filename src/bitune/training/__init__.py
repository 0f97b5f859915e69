"""Training a Bitune model: the Hugging Face Trainer wired for Bitune (trainer.py), its callbacks, the run
directory's guard, the optimisers, the YAML run config and TRL's SFTTrainer (trl.py, imported on its own).

    from bitune.training import load_run_config, train
    train(load_run_config("configs/quickstart.yaml"))
"""

from .run_config import RunConfig, load_run_config
from .trainer import BituneTrainer, BituneTrainerMixin, train, training_arguments

__all__ = [
    "BituneTrainer",
    "BituneTrainerMixin",
    "RunConfig",
    "load_run_config",
    "train",
    "training_arguments",
]
