"""pipelines: applications over medvit and pointcloud (CLI, segment, train, evaluate, engine)."""
