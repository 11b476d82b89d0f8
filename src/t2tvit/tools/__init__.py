"""Tools built on the models: model facts, and (in later modules) benchmark, export, predict, visualize."""
