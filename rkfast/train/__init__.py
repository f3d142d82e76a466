"""Training: meta-train any registered task domain, evaluate it, checkpoint it, report and save the run.

Every run is seeded: ``seed`` fixes the initialization and the stream of training tasks; the held-out
validation tasks and the meta-test tasks come from ``test_seed`` (independent streams,
:func:`~rkfast.tasks.sampling.task_generator`), so runs with different tableaus or training seeds are tested
on the very same tasks. A run given a folder never loses its work (checkpoints, clean stops on
SIGINT/SIGTERM, resuming bit for bit on the CPU), and under ``torchrun`` every rank trains together
(``docs/training.md``).

The package, layer by layer: :mod:`~rkfast.train.optimizer` (the optimizer's learned coefficients and their
summaries), :mod:`~rkfast.train.config` (:class:`TrainConfig`), :mod:`~rkfast.train.config_file` (a run's
``config.json``: :func:`read_config`), :mod:`~rkfast.train.results`
(:class:`RunResult` and the exceptions that stop a run), :mod:`~rkfast.train.ranks` (what the ranks of a
distributed run decide together), :mod:`~rkfast.train.launch` (a process started by a launcher such as
``torchrun``: its process group and which rank says what), :mod:`~rkfast.train.checkpoint` (saving,
restoring and reading back a run), :mod:`~rkfast.train.evaluation` (meta-testing, and a saved run again:
:func:`evaluate_run`), :mod:`~rkfast.train.callbacks` and :mod:`~rkfast.train.loggers` (the hooks, the
progress display, ``metrics.jsonl`` and TensorBoard), and :mod:`~rkfast.train.loop` (:func:`train`).
"""

from ..runs import CHECKPOINT_FORMAT, load_checkpoint, write_json
from ..tasks import STREAMS, eval_pieces, task_chunks, task_generator
from .callbacks import (
    LOG_EVERY,
    Callback,
    CallbackList,
    CheckpointEvent,
    EndEvent,
    EvaluationEvent,
    ProgressCallback,
    RunStart,
    StepEvent,
)
from .checkpoint import (
    METRICS_FILE,
    RATES_PLOT,
    RESUMABLE_CHANGES,
    TABLEAU_PLOT,
    load_result,
    load_run,
    resume_config,
    run_files,
    slug,
)
from .config import (
    ResolvedSettings,
    TrainConfig,
    build_optimizer,
    check_device,
    default_select_steps,
    select_steps_among,
)
from .config_file import CONFIG_FILE, ConfigFileError, check_resolves, read_config, write_config
from .evaluation import RunEvaluation, evaluate_run, evaluate_tasks
from .launch import (
    DEFAULT_DIST_TIMEOUT_S,
    DIST_TIMEOUT_ENV,
    LaunchError,
    dist_timeout,
    launched_process_group,
    launched_world,
    lost_contact,
    reported_by_rank,
    silenced,
    use_local_gpu,
)
from .loggers import JsonLinesLogger, TensorBoardLogger, read_metrics
from .loop import train
from .optimizer import learned_tableau_info, rate_summary, rates_info, tableau_summary
from .ranks import lead_decides
from .results import (
    RunDiverged,
    RunInterrupted,
    RunResult,
    describe_learned_tableau,
    describe_rates,
    selection_warning,
)

__all__ = [
    "TrainConfig",
    "ResolvedSettings",
    "RunResult",
    "RunInterrupted",
    "RunDiverged",
    "train",
    "evaluate_tasks",
    "evaluate_run",
    "RunEvaluation",
    "task_generator",
    "load_checkpoint",
    "load_run",
    "load_result",
    "resume_config",
    "write_json",
    "slug",
    "task_chunks",
    "eval_pieces",
    "build_optimizer",
    "check_device",
    "default_select_steps",
    "select_steps_among",
    "selection_warning",
    "lead_decides",
    "launched_process_group",
    "launched_world",
    "dist_timeout",
    "use_local_gpu",
    "silenced",
    "reported_by_rank",
    "lost_contact",
    "LaunchError",
    "DIST_TIMEOUT_ENV",
    "DEFAULT_DIST_TIMEOUT_S",
    "RESUMABLE_CHANGES",
    "CHECKPOINT_FORMAT",
    "rate_summary",
    "rates_info",
    "describe_rates",
    "RATES_PLOT",
    "TABLEAU_PLOT",
    "tableau_summary",
    "learned_tableau_info",
    "describe_learned_tableau",
    "STREAMS",
    "LOG_EVERY",
    "METRICS_FILE",
    "run_files",
    "CONFIG_FILE",
    "ConfigFileError",
    "read_config",
    "write_config",
    "check_resolves",
    "Callback",
    "CallbackList",
    "ProgressCallback",
    "JsonLinesLogger",
    "TensorBoardLogger",
    "read_metrics",
    "RunStart",
    "StepEvent",
    "EvaluationEvent",
    "CheckpointEvent",
    "EndEvent",
]
