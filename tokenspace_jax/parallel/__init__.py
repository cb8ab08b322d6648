"""Device meshes: sharding rules, the example layout across data shards, the data-parallel step,
and multi-host wiring. The model and the engine's step know nothing of meshes beyond this."""
