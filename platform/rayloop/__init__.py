"""rayloop: reinforcement tuning on Ray Train and autoscaled vLLM serving on Ray Serve, in one loop."""

__version__ = "0.1.0"
