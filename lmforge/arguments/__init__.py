"""Argument dataclasses, grouped as the data path is: model, data, template, tuner, train, rlhf, infer, deploy,
sample, rollout, export, and the browser pages."""
from lmforge.arguments.base import ArgumentError, from_dict, parse_args, read_args_json, save_args, to_dict
from lmforge.arguments.infer import DeployArguments, ExportArguments, GenerationArguments, InferArguments
from lmforge.arguments.eval import EvalArguments
from lmforge.arguments.model import DataArguments, ModelArguments, TemplateArguments
from lmforge.arguments.rlhf import GrpoArguments, RlhfArguments, RolloutArguments
from lmforge.arguments.sample import RewardArguments, SampleArguments
from lmforge.arguments.toolkit import (AgentArguments, EnvArguments, PreferenceArguments, PresetsArguments,
                                      RagIndexArguments, RagQueryArguments)
from lmforge.arguments.train import PtArguments, TrainArguments, TunerArguments
from lmforge.arguments.ui import AppArguments, UIArguments, WebUIArguments

__all__ = [
    "ArgumentError", "from_dict", "parse_args", "read_args_json", "save_args", "to_dict",
    "ModelArguments", "DataArguments", "TemplateArguments", "TunerArguments", "TrainArguments", "PtArguments",
    "RlhfArguments", "GrpoArguments", "RewardArguments", "RolloutArguments", "SampleArguments",
    "GenerationArguments", "InferArguments", "DeployArguments", "ExportArguments",
    "EvalArguments", "EnvArguments", "PresetsArguments", "RagIndexArguments", "RagQueryArguments",
    "AgentArguments", "PreferenceArguments",
    "UIArguments", "AppArguments", "WebUIArguments",
]
