"""Programs built on the trainers and the library: generate, the demo, the ablations, tools."""
