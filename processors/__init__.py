"""GLUE task readers and feature conversion (see `processors/glue.py`)."""
from processors.glue import (
    TASKS,
    EvalSplit,
    Features,
    GlueDataError,
    GlueTask,
    InputExample,
    TestSplit,
    convert_examples_to_features,
    get_task,
)

__all__ = ["TASKS", "EvalSplit", "Features", "GlueDataError", "GlueTask", "InputExample", "TestSplit",
           "convert_examples_to_features", "get_task"]
