"""What a MoE model is, for every layer that needs to know: its shape and experts read
from a Hugging Face config.json (`spec.MoESpec`, `hf_config`), and how its router turns
logits into top-k ids and weights (`routing`). The runtime and the planner both build on
it; it depends on neither.
"""
