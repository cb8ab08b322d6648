"""The built-in features' records (``<name>.jsonl``), shipped with the package."""
