"""Process plumbing: distributed start-up, meshes, atomic writes, metrics, plugins, clocks, progress."""
