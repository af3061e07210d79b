"""Settings for every test suite.

No test may leave a daemon behind: ``fission run`` (and ``install``, ``repo``) would start a user
daemon after an embedded run (``fission.sdk._user_daemon``), so the suites turn that off here,
for this process and every command it starts. The tests of the feature turn it on for
themselves, with a runtime dir and socket of their own.
"""

from __future__ import annotations

import os

os.environ["FISSION_AUTOSTART"] = "0"
