"""The typed configuration tree: one schema module per section, presets, and the loader.

Owns: ``ConfigError`` and every ``*Config`` schema (``data``, ``training``, ``teacher``,
``students``, ``fewshot``, ``runtime``, ``sources``), the cross-field checks and the data
set shapes (``pipeline``), the presets (``presets``), and preset -> file -> ``--set``
loading (``loader``).  This module re-exports the public names, so
``from pipelines.config import load_config`` works.
May import: ``pipelines.common``, ``models`` and ``meta`` (to check architectures and
augmentation ops before any work).
"""

from pipelines.config.data import AugmentConfig, AugmentSearchConfig, DataConfig, DatasetName, read_policy_file
from pipelines.config.errors import ConfigError, Strict
from pipelines.config.fewshot import FewShotConfig
from pipelines.config.loader import apply_override, flatten, load_config, validate_tree
from pipelines.config.pipeline import MIN_TRAIN_SIZE, PipelineConfig, dataset_shape
from pipelines.config.runtime import DistConfig, TrackingConfig
from pipelines.config.sources import REGISTRY_URI, InitSource, TeacherSource, check_source, library_prefix
from pipelines.config.students import (
    METHOD_NAMES,
    TEACHER_METHODS,
    KDConfig,
    Learnable,
    MamlConfig,
    MetaDistillConfig,
    StudentConfig,
)
from pipelines.config.teacher import FinetuneConfig, ImproveConfig, TeacherConfig, teacher_input_shape
from pipelines.config.training import ModelConfig, OptimConfig, TrainConfig

__all__ = [
    'ConfigError',
    'Strict',
    'DatasetName',
    'AugmentConfig',
    'AugmentSearchConfig',
    'DataConfig',
    'read_policy_file',
    'ModelConfig',
    'OptimConfig',
    'TrainConfig',
    'TeacherSource',
    'InitSource',
    'REGISTRY_URI',
    'library_prefix',
    'check_source',
    'FinetuneConfig',
    'ImproveConfig',
    'TeacherConfig',
    'teacher_input_shape',
    'KDConfig',
    'Learnable',
    'MetaDistillConfig',
    'MamlConfig',
    'TEACHER_METHODS',
    'METHOD_NAMES',
    'StudentConfig',
    'FewShotConfig',
    'TrackingConfig',
    'DistConfig',
    'PipelineConfig',
    'dataset_shape',
    'MIN_TRAIN_SIZE',
    'apply_override',
    'load_config',
    'validate_tree',
    'flatten',
]
