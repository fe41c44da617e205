"""The demo: every stage of the recipe at toy scale on the embedded shapes world, and its report."""
