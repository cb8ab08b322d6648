"""The frozen classifier and the loss: prompts split at the concept slot, prefix caches and the
slot's prior computed once, the label as an optimisable distribution, and the objective."""
