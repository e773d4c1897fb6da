"""The old path of `chameleon.experiments.compare`, kept for users' scripts (`from chameleon.compare import compare`)."""
from chameleon.experiments.compare import *  # noqa: F401,F403
