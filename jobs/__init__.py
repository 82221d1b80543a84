"""One file per job; each is `python -m jobs.<job> --config jobs/configs/<job>_*.yaml [--section.field=value ...]`."""

import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the driver runs in an uploaded copy of the checkout: import rayloop from
# that copy (platform/ is a source root, never a package), so the job runs the code that was submitted.
_SOURCE_ROOT = str(Path(__file__).resolve().parent.parent / "platform")
if Path(_SOURCE_ROOT, "rayloop").is_dir() and _SOURCE_ROOT not in sys.path:
    sys.path.insert(0, _SOURCE_ROOT)
