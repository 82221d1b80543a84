"""Ray Serve applications of rayloop: vLLM behind `ray.serve.llm`, OpenAI-compatible (see the serving issue)."""

import sys
from pathlib import Path

# As in jobs/: under `ray job submit --working-dir .` import rayloop from the uploaded copy of the checkout.
_SOURCE_ROOT = str(Path(__file__).resolve().parent.parent / "platform")
if Path(_SOURCE_ROOT, "rayloop").is_dir() and _SOURCE_ROOT not in sys.path:
    sys.path.insert(0, _SOURCE_ROOT)
