"""The one job type: every generation request, from HTTP or the command line, becomes a `Job`.

`fields.py` is the table of request fields (type, default, bounds, choices, help) that makes the `Job`'s
defaults, the request schema, `generate`'s options and the coercion; `validation.py` has `build_job`, which
takes raw field values (typed JSON values or form / command-line strings) plus already-decoded images and
returns an immutable, fully validated `Job`, or raises `JobError` naming the offending field, before the job
is queued. Error messages show a client's value through `shown`, which never echoes more than `ECHO_CHARS`.
"""

from mlx_sd_server.engine.errors import ECHO_CHARS, JobError, shown
from mlx_sd_server.engine.families.spec import Capabilities, ModelDefaults
from mlx_sd_server.engine.sampling.samplers import SAMPLE_METHODS
from mlx_sd_server.engine.sampling.schedules import SCHEDULERS
from mlx_sd_server.job.fields import (
    FIELDS,
    IMAGE_FIELDS,
    IMAGE_LISTS,
    JOB_FIELDS,
    Field,
    Job,
    Limits,
    as_bool,
    as_float,
    as_int,
    as_str,
    check_text,
    request_schema,
)
from mlx_sd_server.job.validation import build_job, check_field_sizes, cover_size

# Capabilities, ModelDefaults, SAMPLE_METHODS and SCHEDULERS are the engine's; they are named here too
# because build_job's callers pass (and tests import) them with the job.
__all__ = [
    "ECHO_CHARS",
    "FIELDS",
    "IMAGE_FIELDS",
    "IMAGE_LISTS",
    "JOB_FIELDS",
    "SAMPLE_METHODS",
    "SCHEDULERS",
    "Capabilities",
    "Field",
    "Job",
    "JobError",
    "Limits",
    "ModelDefaults",
    "as_bool",
    "as_float",
    "as_int",
    "as_str",
    "build_job",
    "check_field_sizes",
    "check_text",
    "cover_size",
    "request_schema",
    "shown",
]
