"""Human labeling: a task of prompts with responses stored in SQLite (store), the prompt each labeler sees next
(assign), the checks of every submission (validate), the labeling service (service) behind a web app for people
(app, static/), and the agreement between labelers (agreement). `python -m rlhf_jax.label serve|stats RUN_DIR`."""
