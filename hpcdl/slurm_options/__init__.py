"""Extra sbatch options of jobs (:mod:`.options`) and the site policy on them (:mod:`.policy`)."""

from hpcdl.slurm_options.notify import Notify
from hpcdl.slurm_options.options import (
    NAMED,
    RESERVED,
    OptionValue,
    SbatchOptions,
    constraint_features,
    generic_key,
    option_key,
)
from hpcdl.slurm_options.policy import PartitionPolicy, check_job_options, feature_problems

__all__ = [
    "NAMED",
    "RESERVED",
    "Notify",
    "OptionValue",
    "PartitionPolicy",
    "SbatchOptions",
    "check_job_options",
    "constraint_features",
    "feature_problems",
    "generic_key",
    "option_key",
]
