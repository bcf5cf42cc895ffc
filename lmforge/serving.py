"""The pyfunc models' old import path (before lmforge/registry/): MLflow pickles a registered
model's wrapper class by module path, so versions registered earlier name `lmforge.serving`.
This keeps them loadable; new code imports lmforge.registry.serving."""

from lmforge.registry.serving import *  # noqa: F401,F403
from lmforge.registry.serving import TextClassifier, TextGenerator  # noqa: F401
