"""One module per pipeline stage (sft/rm, ppo, generate, prepare, label) and their dispatch."""
