"""dspark_runtime: the torch-free draft/verify loop over compiled DSpark graphs."""
