"""The stable import path of the policies (the controller, the simulator and users import from here);
each policy lives in its own module under gyges.policies."""

from gyges.policies import *  # noqa: F401,F403
from gyges.policies import __all__  # noqa: F401
