"""Experiment reporting: HTML reports and plots, W&B logging (``wandb`` imported lazily)."""
from .report import HTMLReport, load_run, write_comparison, write_report
from .wandb_logger import WandbLogger
from .wandb_offline import read_offline_run

__all__ = ["HTMLReport", "WandbLogger", "load_run", "read_offline_run", "write_comparison", "write_report"]
