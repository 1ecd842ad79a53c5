"""TODO."""

from pipelines.config.errors import ConfigError, Strict
from pipelines.config.data import DatasetName, AugmentConfig, AugmentSearchConfig, DataConfig, read_policy_file
from pipelines.config.training import ModelConfig, OptimConfig, TrainConfig
from pipelines.config.sources import TeacherSource, InitSource, REGISTRY_URI, library_prefix, check_source
from pipelines.config.teacher import FinetuneConfig, TeacherConfig, teacher_input_shape
from pipelines.config.students import KDConfig, Learnable, MetaDistillConfig, MamlConfig, TEACHER_METHODS, METHOD_NAMES, StudentConfig
from pipelines.config.fewshot import FewShotConfig
from pipelines.config.runtime import TrackingConfig, DistConfig
from pipelines.config.pipeline import AUGMENTATIONS, PipelineConfig, dataset_shape, MIN_TRAIN_SIZE
from pipelines.config.loader import apply_override, load_config, validate_tree, flatten

__all__ = ['ConfigError', 'Strict', 'DatasetName', 'AugmentConfig', 'AugmentSearchConfig', 'DataConfig', 'read_policy_file', 'ModelConfig', 'OptimConfig', 'TrainConfig', 'TeacherSource', 'InitSource', 'REGISTRY_URI', 'library_prefix', 'check_source', 'FinetuneConfig', 'TeacherConfig', 'teacher_input_shape', 'KDConfig', 'Learnable', 'MetaDistillConfig', 'MamlConfig', 'TEACHER_METHODS', 'METHOD_NAMES', 'StudentConfig', 'FewShotConfig', 'TrackingConfig', 'DistConfig', 'AUGMENTATIONS', 'PipelineConfig', 'dataset_shape', 'MIN_TRAIN_SIZE', 'apply_override', 'load_config', 'validate_tree', 'flatten']
