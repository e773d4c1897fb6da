"""The old path of `chameleon.serve.adapter`, kept for users' scripts (`from chameleon.serving import Adapter`)."""
from chameleon.serve.adapter import *  # noqa: F401,F403
