"""After a study: held-out re-evaluation and honest choice (`heldout`), writing chosen trials as loadable
model folders (`write`), and the `python -m optimizer.export` command (`cli`).

Builds on `optimizer.session`; the study loop (`optimizer.runner`) calls into it, never the reverse.
"""
