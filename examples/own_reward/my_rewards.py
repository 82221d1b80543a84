"""A user's own reward for rayloop's GRPO job: 1.0 when the completion contains the row's `target` text.

TRL's reward signature: prompts and completions, plus every other column of the dataset (`target` here) and TRL's
own keywords, hence **kwargs. Each call prints the node it ran on, so the job's log shows every worker using it.
"""

import os


def contains_target(prompts, completions, target, **kwargs):
    import ray

    print(f"contains_target: {len(completions)} completions on node {ray.get_runtime_context().get_node_id()} "
          f"(pid {os.getpid()})", flush=True)
    return [float(t in completion) for completion, t in zip(completions, target)]
